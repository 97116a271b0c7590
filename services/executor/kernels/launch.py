"""Launch Triton kernels compiled on CUDA, or through Triton's interpreter on CPU.

`triton.jit` decides between compiling and interpreting when a kernel module is *imported*
(it reads TRITON_INTERPRET then), so a process that imported our kernels before setting the
variable could never run them on CPU tensors. Instead each kernel keeps both forms and picks
one per launch from the tensors' device: CPU tensors can only run interpreted, CUDA tensors
run compiled unless TRITON_INTERPRET=1 asks for the interpreter there too.

NOTE: `@triton.jit` helpers called from a kernel (triton.language's own `tl.sum`, `tl.cdiv`, ...)
were also bound to one form when triton was imported. If that form is the compiled one,
calling it from interpreted code raises, so while an interpreted kernel runs, JIT helpers are
made callable by interpreting them too (`_interpretable_jit_helpers`). Compiled launches never
call a helper through Python, so the patch cannot change them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import triton


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_interpreter(device: torch.device) -> bool:
    return device.type != "cuda" or interpret_requested()


_patch_lock = threading.RLock()
_interpreted_helpers: dict[Callable[..., Any], Any] = {}


@contextmanager
def _interpretable_jit_helpers() -> Iterator[None]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def call_interpreted(self: Any, *args: Any, **kwargs: Any) -> Any:
        helper = _interpreted_helpers.get(self.fn)
        if helper is None:
            helper = _interpreted_helpers[self.fn] = InterpretedFunction(self.fn)
        return helper(*args, **kwargs)

    with _patch_lock:
        original = JITFunction.__call__
        JITFunction.__call__ = call_interpreted  # type: ignore[method-assign]
        try:
            yield
        finally:
            JITFunction.__call__ = original  # type: ignore[method-assign]


class DualKernel:
    """A Triton kernel that runs compiled on CUDA tensors and interpreted on CPU tensors."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: Any = None

    def _pick(self, device: torch.device) -> Any:
        if use_interpreter(device):
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.jit(self.fn)
        return self._compiled

    def launch(self, grid: Sequence[int], device: torch.device, *args: Any, **kwargs: Any) -> None:
        kernel = self._pick(device)
        if use_interpreter(device):
            with _interpretable_jit_helpers():
                kernel[tuple(grid)](*args, **kwargs)
        else:
            kernel[tuple(grid)](*args, **kwargs)


def dual_kernel(fn: Callable[..., Any]) -> DualKernel:
    return DualKernel(fn)
