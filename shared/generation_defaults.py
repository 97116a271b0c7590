"""A model's own sampling defaults, from its folder's generation_config.json (as vLLM).

`--generation-config auto` (the default) reads the model folder's file, `vllm` ignores it,
any other value is a folder holding a generation_config.json. Only these fields become
defaults, and only for requests that do not set them:

    temperature, top_p, top_k, min_p, repetition_penalty   (same names)
    max_new_tokens → max_tokens                            (a cap on the default length)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model_dir: str | Path | None, generation_config: str = "auto") -> dict:
    """{SamplingParams field: value} from generation_config.json; {} when there is none."""
    if generation_config == "vllm":
        return {}
    folder = model_dir if generation_config == "auto" else generation_config
    if folder is None:
        return {}
    path = Path(folder) / "generation_config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    out = {k: data[k] for k in FIELDS if data.get(k) is not None}
    if data.get("max_new_tokens") is not None:
        out["max_tokens"] = int(data["max_new_tokens"])
    if out:
        log.info("sampling defaults from %s: %s (--generation-config vllm ignores them)", path, out)
    return out
