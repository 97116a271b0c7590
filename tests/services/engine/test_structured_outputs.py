"""Structured outputs in the in-process engine: a request whose grammar is still compiling
never holds up the rest of the batch."""

from __future__ import annotations

import threading

from services.engine import LLM, SamplingParams
from shared.structured_outputs import StructuredOutputsParams


def test_a_compiling_grammar_defers_only_its_request(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="float32")
    cache = llm.engine.runner.grammars.cache
    # The first compile loads the tokenizer on the worker thread: hold it there, as a
    # large schema would hold it, and see the batch run on without the request.
    gate = threading.Event()
    load = cache._load_tokenizer
    cache._load_tokenizer = lambda: (gate.wait(60), load())[1]

    def prompt(text: str) -> list[int]:
        return llm.render_chat([{"role": "user", "content": text}])

    constrained = SamplingParams(
        temperature=0.0, max_tokens=16, structured_outputs=StructuredOutputsParams(choice=["cat", "dog"])
    )
    llm.add_request("free", prompt("Count from one to ten."), SamplingParams(temperature=0.0, max_tokens=6))
    llm.add_request("pet", prompt("Which pet purrs, a cat or a dog?"), constrained)
    outs: dict[str, object] = {}
    for _ in range(30):
        for out in llm.step():
            outs[out.request_id] = out
        if "free" in outs and outs["free"].finished:
            break
    assert outs["free"].finished and len(outs["free"].token_ids) == 6
    assert "pet" not in outs  # no token yet, and not aborted: it waits for its grammar
    assert llm.engine.stats().num_running == 1
    gate.set()
    while llm.has_unfinished_requests():
        for out in llm.step():
            outs[out.request_id] = out
    pet = outs["pet"]
    assert pet.finished and pet.outputs[0].text in ("cat", "dog")
    # The deferred request's tokens are those of the same request with its grammar ready.
    (again,) = llm.generate([prompt("Which pet purrs, a cat or a dog?")], constrained)
    assert again.outputs[0].token_ids == pet.outputs[0].token_ids
    assert llm.engine.stats().kv_cache_usage == 0.0
