"""A local Hugging Face model folder: config, architecture check, weights and tokenizer.

Everything that reads a library file here turns the library's error into a
ModelSourceError naming the file, so a corrupt download reads as such and not as a
traceback from deep inside safetensors or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from services.executor.models.registry import SUPPORTED_ARCHITECTURES

from .errors import ModelSourceError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# NOTE: nothing here imports torch or transformers at module level: `folio serve` checks the
# model (read_config_json, check_architecture, check_weights) before starting its children,
# and those imports would delay every start by seconds.

# Files a folder may hold instead of safetensors; named in the error so the user knows why.
_UNSUPPORTED_WEIGHT_GLOBS = ("*.bin", "*.pt", "*.pth", "*.gguf")


def _require_config(path: Path) -> None:
    if not (path / "config.json").is_file():
        hint = ""
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            hint = f" (it holds {ggufs[0].name}: pass the .gguf file itself to convert it)"
        raise ModelSourceError(f"model folder {path} has no config.json{hint}")


def read_config_json(path: Path) -> dict:
    """The folder's config.json as plain JSON (no transformers); raises if absent or unreadable."""
    _require_config(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"cannot read {path / 'config.json'}: {e}") from e
    if not isinstance(config, dict):
        raise ModelSourceError(f"cannot read {path / 'config.json'}: not a JSON object")
    return config


def load_config(path: Path) -> PretrainedConfig:
    """The folder's config.json as a transformers config; raises if absent or unreadable."""
    from transformers import AutoConfig

    _require_config(path)
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises ValueError/OSError/JSONDecodeError/KeyError
        raise ModelSourceError(f"cannot read {path / 'config.json'}: {e}") from e


def check_architecture(config: dict, path: Path) -> str:
    """The architecture name of a config.json (read_config_json), if folio has model code for it."""
    names = list(config.get("architectures") or [])
    if not names:
        raise ModelSourceError(
            f"{path / 'config.json'} names no architecture (no 'architectures' list); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise ModelSourceError(
        f"unsupported architecture {', '.join(names)} in {path / 'config.json'}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def weight_files(path: Path) -> list[Path]:
    """All *.safetensors files of the folder, sorted (shards in order)."""
    return sorted(p for p in path.glob("*.safetensors") if p.is_file())


def check_weights(path: Path) -> list[Path]:
    """The folder's safetensors files, each with a readable header; raises if none or corrupt.

    Only headers are read (cheap), but safetensors checks there that the file is long
    enough for every tensor it declares, which catches truncated downloads too.
    """
    files = weight_files(path)
    if not files:
        others = sorted(p.name for g in _UNSUPPORTED_WEIGHT_GLOBS for p in path.glob(g))
        found = f"; found only {', '.join(others)} (folio loads *.safetensors)" if others else ""
        raise ModelSourceError(
            f"model folder {path} has no *.safetensors weights{found}; "
            "use load_format='dummy' to run with random weights"
        )
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:  # the header only: no torch needed
                f.keys()
        except Exception as e:  # SafetensorError derives from Exception only
            raise ModelSourceError(f"corrupt safetensors file {file}: {e}") from e
    return files


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face tensor name, tensor) for every tensor in every *.safetensors of the folder."""
    path = Path(path)
    files = weight_files(path)
    if not files:
        raise ModelSourceError(f"model folder {path} has no *.safetensors weights")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ModelSourceError:
            raise
        except Exception as e:
            raise ModelSourceError(f"cannot read weights from {file}: {e}") from e


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """The folder's tokenizer (with its chat template) via AutoTokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelSourceError(f"cannot load a tokenizer from {path}: {e}") from e
