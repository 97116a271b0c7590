"""OpenMP waiting, set for every folio process before torch loads (libgomp reads it then).

After a parallel region torch's OpenMP threads wait for the next one. Waiting forever in
a busy loop (libgomp's default spin of 300,000 rounds, or OMP_WAIT_POLICY=ACTIVE) makes
two torch processes on a small machine (an executor and a test or client, two
tensor-parallel ranks) stall each other by 10x or more. Sleeping at once (PASSIVE alone,
spin count 0) makes every small op of a decode step pay a futex wake-up: on the 2-core
EPYC a batch-1 bfloat16 SmolLM2 step took 27 ms so, against 15 ms spinning 10,000 rounds
(about 0.3 ms of CPU after the step's last op before the threads sleep; measured in
docs/benchmarks.md). Both are only defaults: a value already in the environment wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}


def set_openmp_waits(env: MutableMapping[str, str] = os.environ) -> None:
    for key, value in OPENMP_ENV.items():
        env.setdefault(key, value)
