"""`folio serve` as a subprocess for end-to-end tests: started on a free port, its merged
output collected, readiness awaited, stopped with SIGTERM (SIGKILL as a last resort)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

from tests.services.test_cli_serve import ROOT, _descendants, _free_port, _kill_tree


class ServeProcess:
    def __init__(self, model: Path | str, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.model = str(model)
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "services.cli", "serve", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", *flags]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        if "--redis-url" not in flags:
            full_env.pop("FOLIO_REDIS_URL", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT, env=full_env, start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "is ready" in line:
                self.ready.set()

    def output(self) -> str:
        """The last 80 lines, for failure messages."""
        return "".join(self.lines[-80:])

    def everything(self) -> str:
        """All it printed, for checks of what it said (a killed rank's peer's traceback alone
        can push a message out of the last 80 lines)."""
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.5):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key="x", max_retries=0, timeout=120)

    def health(self) -> int:
        """/health's status code (0: no answer)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.base}/health", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def pid_of(self, role: str, engine_id: str) -> int:
        [pid] = [p for p, cmd in _descendants(self.proc.pid).items()
                 if f"services.cli {role} --engine-id {engine_id} " in cmd]
        return pid

    def stop(self) -> None:
        """SIGTERM, and it must exit 0 within 30 s; whatever is left is killed regardless."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(30) == 0, self.output()
        finally:
            if self.proc.poll() is None:
                _kill_tree(self.proc)
