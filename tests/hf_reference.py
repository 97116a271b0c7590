"""Reference outputs from Hugging Face transformers, for token-for-token comparisons."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=2)
def _model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_greedy(path: str | Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt, one at a time, cut after the first EOS (as folio stops)."""
    model = _model(str(path), torch.float32)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            ids = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),  # else tokens equal to pad_token_id are masked
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )[0, len(p) :].tolist()
            for i, t in enumerate(ids):
                if t in eos_ids:
                    ids = ids[: i + 1]
                    break
            outs.append(ids)
    return outs
