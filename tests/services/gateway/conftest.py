"""A real `folio serve` (Redis, scheduler, executor, gateway) for the gateway's API tests.

Started once per session on a free port with SmolLM2 and torn down at the end; the
OpenAI Python SDK is the client, as users have it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

API_KEY = "test-key"
MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = 300
ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    api_key: str
    model: str
    proc: subprocess.Popen
    log_path: str

    def log_tail(self, n: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def run_server(*extra_args: str, api_key: str = API_KEY):
    """`folio serve` SmolLM2 on a free port with these extra flags; yields a healthy Server."""
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="folio-serve-", suffix=".log", delete=False)
    cmd = [
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--api-key",
        api_key,
        # The dense float32 model: tests here compare against transformers and the in-process
        # engine in float32 (`dtype=auto` would pick bfloat16 and packed weights on CPUs with
        # native bf16, which are not batch-invariant).
        "--dtype",
        "float32",
        *extra_args,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FOLIO_API_KEY", None)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    srv = Server(f"http://127.0.0.1:{port}", api_key, MODEL, proc, log.name)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(srv.url):
            if proc.poll() is not None:
                pytest.fail(f"folio serve exited with {proc.returncode}:\n{srv.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"folio serve not healthy after {STARTUP_TIMEOUT_S}s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="session")
def server():
    # A tool-call parser, so tool_choice "auto" is served (test_tool_calls.py).
    with run_server("--enable-auto-tool-choice", "--tool-call-parser", "hermes") as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=300)


@pytest.fixture
def aclient(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def tokenizer():
    from services.executor.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(MODEL).path)
