"""Tensor-parallel ranks 1..N-1 of the in-process engine, as worker processes.

    EngineCore (rank 0, this process) ──encoded StepPlan──▶ pipe ──▶ worker rank r (spawned)
           │ runner.execute(plan)                                    runner.execute(plan)
           └──────────── torch.distributed group (gloo/nccl, tcp://127.0.0.1:PORT) ──────┘

Each worker forms the group, builds its own ModelRunner and executes every plan rank 0
sends, in the same order (lock-step); only rank 0's results are used, so a worker sends
nothing back but one message once it has imported its modules (rank 0 waits for those while
watching that the workers live: a worker that cannot even start is reported at once
instead of after the group's timeout). A plan with `shutdown=True` (or the pipe closing,
when this process dies) ends a worker.

Threads: each rank runs `threads_per_rank` torch threads (with shared/openmp.py's bounded
OpenMP spinning, so ranks sharing cores do not stall each other spinning), and rank 0
sets the same thread count for this process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import weakref
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import msgspec
import torch

from shared.config import EngineConfig
from shared.openmp import OPENMP_ENV
from shared.protocol import StepPlan, encode

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0
START_TIMEOUT_S = 120.0
_STARTED = b"started"
_SHUTDOWN = encode(StepPlan(step_id=-1, shutdown=True))


def free_local_init_method() -> str:
    """tcp://127.0.0.1:PORT on a port free right now (rank 0's store binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class TPWorkers:
    """Ranks 1..N-1 of one engine. `config.distributed_init_method` must be set."""

    def __init__(self, config: EngineConfig, threads_per_rank: int) -> None:
        ctx = mp.get_context("spawn")
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        # A spawned child starts from this process's environment: set what must be in place
        # before the child imports torch, just for the start.
        env = {**OPENMP_ENV, "OMP_NUM_THREADS": str(threads_per_rank)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            for rank in range(1, config.tensor_parallel_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(config, rank, child, threads_per_rank),
                    name=f"folio-tp-rank{rank}",
                    daemon=True,  # never outlives this process
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        # Stops the workers when this object is collected or at interpreter exit.
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)

    def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Return once every worker has started (and is about to join the group)."""
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True), start=1):
            waited = 0.0
            while not conn.poll(0.1):
                waited += 0.1
                if not proc.is_alive() or waited > timeout_s:
                    raise self.dead_worker_error() or RuntimeError(f"tensor-parallel rank {rank} hangs")
            if conn.recv_bytes() != _STARTED:
                raise RuntimeError(f"tensor-parallel rank {rank} sent an unexpected start-up message")

    def send(self, plan: StepPlan) -> None:
        """Hand a plan to every worker (before rank 0 executes it). Raises if one has died."""
        data = encode(plan)
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as e:
                raise self.dead_worker_error() or RuntimeError(f"tensor-parallel rank {rank}: {e}") from e

    def dead_worker_error(self, wait_s: float = 0.0) -> RuntimeError | None:
        """An error naming the workers that have exited (waiting up to wait_s for them: a
        failed collective may be seen before its peer has finished exiting), or None."""
        for proc in self._procs:
            proc.join(wait_s / len(self._procs))
        dead = [(r, p.exitcode) for r, p in enumerate(self._procs, start=1) if not p.is_alive()]
        if not dead:
            return None
        names = ", ".join(f"rank {r} (exit code {code})" for r, code in dead)
        return RuntimeError(f"tensor-parallel worker process died: {names}; the engine cannot continue")

    def shutdown(self) -> None:
        self._finalizer()


def _stop(procs: list[BaseProcess], conns: list[Connection]) -> None:
    for conn in conns:
        try:
            conn.send_bytes(_SHUTDOWN)
        except OSError:
            pass  # already gone
    for proc in procs:
        proc.join(JOIN_TIMEOUT_S)
        if proc.is_alive():  # stuck in a collective whose peer is gone
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


def _worker_main(config: EngineConfig, rank: int, conn: Connection, threads: int) -> None:
    from services.executor.distributed import form_tp_group
    from services.executor.model_runner import ModelRunner

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s tp-rank{rank} %(name)s: %(message)s")
    torch.set_num_threads(threads)
    conn.send_bytes(_STARTED)
    group = form_tp_group(config, rank)
    decoder = msgspec.msgpack.Decoder(StepPlan)
    try:
        runner = ModelRunner(config, tp_rank=rank, tp_group=group)
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:  # rank 0's process is gone
                return
            plan = decoder.decode(data)
            if plan.shutdown:
                return
            runner.execute(plan)
    finally:
        group.destroy()
