"""freeze_startup_heap: the startup heap is frozen, and unfrozen at exit so that cycles
created before the freeze are still freed when the interpreter finishes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

PROGRAM = """
import gc
from shared.gc_heap import freeze_startup_heap

class Cycle:
    def __del__(self):
        print("freed", flush=True)

c = Cycle()
c.self = c  # a reference cycle: only the collector frees it
del c
gc.disable()  # nothing collects it before the freeze does
{freeze}
print("frozen", gc.get_freeze_count() > 0, flush=True)
"""


def run(freeze: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROGRAM.format(freeze=freeze)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[:-1]


def test_frozen_heap_is_unfrozen_at_exit():
    # The freeze collects first: startup garbage is freed, not frozen.
    assert run("freeze_startup_heap(); freeze_startup_heap()") == ["freed", "frozen True"]
    # A cycle that survived into the frozen heap is freed at exit (unfreeze registered once).
    freeze = "c2 = Cycle(); c2.self = c2; gc.collect(); gc.freeze(); del c2; freeze_startup_heap()"
    assert run(freeze) == ["freed", "frozen True", "freed"]
