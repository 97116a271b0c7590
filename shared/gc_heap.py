"""Keep the garbage collector's full collections off the request path.

A service's heap after startup is hundreds of thousands of objects that live as long as the
process (torch, transformers, the tokenizer, FastAPI's routes, the model's modules): a full
(generation 2) collection walks all of them, ~180 ms in the gateway on a 2-core Xeon, and
CPython starts one whenever enough new objects have survived, e.g. in a burst of requests.
That stalled a 500-request burst's 429s by the same amount, and would stall a decode step or
a token stream. Freezing the startup heap moves it to the permanent generation, which
collections skip; objects created later are collected as before. (vLLM freezes its startup
heap for the same reason.)

At exit the heap is unfrozen again, so the interpreter's last collections free its cycles:
frozen, they outlived the extension modules, and nanobind (Triton's bindings) printed a
screen of "leaked instance/type/function" warnings at every exit.
"""

from __future__ import annotations

import atexit
import gc

_unfreeze_registered = False


def freeze_startup_heap() -> None:
    """Call once startup is done: collect what startup left behind, then freeze the rest."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True
