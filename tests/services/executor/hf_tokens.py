"""transformers greedy continuations that ignore EOS, for comparing every generated token.

Tiny random models hit their EOS ids by chance; ignoring EOS on both sides keeps all
tokens of every prompt in the comparison.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy_no_eos(path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = hf_model(str(path))
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(out[0, len(p) :].tolist())
    return outs
