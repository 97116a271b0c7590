"""All-reduce through shared memory for the ranks of one group that all live on one host
(what vLLM's CPU shared-memory communicator does): gloo over loopback TCP moves a 2048-token
prefill chunk's 4.7 MB in ~40 ms on a 2-core machine under load; through shared memory the
same all-reduce takes 0.7 ms (2 ranks) to 2 ms (3 ranks on 2 cores).

    comm = ShmAllReduce.create(rank, size, slot_bytes, timeout_s=...)  # collective; None: not possible
    if comm is not None and comm.supports(x):
        comm.all_reduce(x)                                              # in place, every rank
    comm.close()                                                        # on TPGroup.destroy()

One segment, mapped by every rank (rank 0 creates a file in /dev/shm, the others open it,
and rank 0 unlinks it as soon as all have mapped it, so no crash can leak it):

    ┌ control: one 64-byte line per rank (its barrier counter), one for the abort word ┐
    ├ slot 0 (slot_bytes) ┼ slot 1 ┼ … ┼ slot N-1                                      ┘

all_reduce(x), on every rank:
    copy x into its own slot ── barrier ── x = slot 0 + slot 1 + … + slot N-1 ── barrier
                                            (fixed order, in x's dtype, as gloo does: every
                                             rank computes the same bits)
The second barrier keeps a fast rank from overwriting its slot (next call) while a slow one
is still summing. NOTE: at N >= 3 gloo's ring sums each chunk starting at a different rank,
so its result may differ from ours in the last bit; at N = 2 a + b = b + a and both agree
exactly.

Barrier: each rank bumps its own counter (an aligned int64 store: atomic, and on x86 (TSO)
the slot's bytes written before it are visible before it) and waits until every counter
reaches the same generation: ~200 spins, then naps of 50 us (on a machine with fewer cores
than ranks a spinning or sched_yield-ing rank steals the core its peer needs: TP=3 on 2 cores
lost 10 points of throughput to 2 ms of yielding). Only on x86, whose TSO keeps stores in
order; a weakly ordered CPU would need fences, so it gets gloo. A waiting rank raises
instead of hanging when a peer's process is gone, when a peer closed the segment (it left
the group), or at the group's timeout.
"""

from __future__ import annotations

import logging
import mmap
import os
import platform
import socket
import time
import uuid

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Shared memory beat gloo at every size measured (docs/benchmarks.md); the floor keeps the
# step's first collective, the tiny failure-flag vector, on gloo: ranks reach it skewed by
# plan delivery, and a blocking socket wait burns no CPU while a peer catches up.
MIN_BYTES = 1024
SHM_DIR = "/dev/shm"
_LINE = 64  # bytes per control line
_STRIDE = _LINE // 8  # int64 words per control line
_SPIN_CHECKS = 200  # pure spinning first (~20 us)
_NAP_S = 0.00005  # then sleep in naps of this length (~100 us with timer slack)
_LIVENESS_EVERY_S = 0.2  # how often a sleeping waiter checks its peers' processes


def host_identity() -> tuple[str, str, int]:
    """(hostname, boot id, pid namespace): equal for two processes that can see each
    other's /dev/shm and pids (the segment's opening is still checked)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = -1
    return socket.gethostname(), boot_id, pidns


def all_on_one_host(group: dist.ProcessGroup | None = None) -> bool:
    """Collective: True on every rank when all ranks of `group` run on this host."""
    ids: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(ids, host_identity(), group=group)
    return all(i == ids[0] for i in ids) and bool(host_identity()[1])


class ShmAllReduce:
    """One rank's view of the group's shared segment (from `create`)."""

    def __init__(
        self,
        mm: mmap.mmap,
        path: str,
        rank: int,
        size: int,
        slot_bytes: int,
        pids: list[int],
        timeout_s: float,
    ) -> None:
        self.path = path  # unlinked once every rank has mapped it
        self.rank, self.size, self.slot_bytes = rank, size, slot_bytes
        self._mm = mm
        self._pids = pids
        self._timeout_s = timeout_s
        self._ctl = memoryview(mm)[: _ctl_bytes(size)].cast("q")
        self._abort = size * _STRIDE  # index of the abort word
        data = torch.frombuffer(mm, dtype=torch.uint8)
        start = _ctl_bytes(size)
        self._slots = [data[start + r * slot_bytes : start + (r + 1) * slot_bytes] for r in range(size)]
        self._gen = 0  # barriers passed; the same on every rank
        self._closed = False

    @classmethod
    def create(
        cls,
        rank: int,
        size: int,
        slot_bytes: int,
        *,
        timeout_s: float,
        group: dist.ProcessGroup | None = None,
    ) -> ShmAllReduce | None:
        """Collective over `group` (gloo): every rank maps one new segment, or every rank
        gets None (a rank could not open it: another /dev/shm, no space; not x86)."""
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return None  # the barrier relies on TSO; every rank (one host) returns here
        slot_bytes = -(-slot_bytes // _LINE) * _LINE
        total = _ctl_bytes(size) + size * slot_bytes
        name = [os.path.join(SHM_DIR, f"folio-tp-{uuid.uuid4().hex}")] if rank == 0 else [None]
        mm: mmap.mmap | None = None
        error = ""
        if rank == 0:
            try:
                mm = _map(name[0], total, create=True)
            except OSError as e:
                error = f"rank 0: {e}"
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        if rank != 0:
            try:
                mm = _map(name[0], total, create=False)
            except OSError as e:
                error = f"rank {rank}: {e}"
        # Everyone has tried: the file can go (mappings outlive it), and nothing leaks if a
        # rank dies from here on.
        outcome: list[object] = [None] * size
        dist.all_gather_object(outcome, (error, os.getpid()), group=group)
        if rank == 0:
            try:
                os.unlink(name[0])
            except OSError:
                pass
        dist.barrier(group=group)  # returns on every rank with the file gone
        errors = [e for e, _ in outcome if e]  # type: ignore[misc]
        if errors:
            if mm is not None:
                mm.close()
            log.warning("shared-memory all-reduce unavailable (%s); using gloo", "; ".join(errors))
            return None
        assert mm is not None
        return cls(mm, name[0], rank, size, slot_bytes, [p for _, p in outcome], timeout_s)  # type: ignore[misc]

    def supports(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and MIN_BYTES <= x.nbytes <= self.slot_bytes and not self._closed

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` across ranks, in place (any layout); the same bits on every rank."""
        n = x.numel()
        slots = [s[: x.nbytes].view(x.dtype)[:n].view(x.shape) for s in self._slots]
        slots[self.rank].copy_(x)
        self._barrier()
        torch.add(slots[0], slots[1], out=x)
        for s in slots[2:]:
            x.add_(s)
        self._barrier()  # no rank overwrites its slot before every rank has read it
        return x

    def close(self) -> None:
        """Unmap; peers still waiting in a barrier see the abort word and raise."""
        if self._closed:
            return
        self._closed = True
        self._ctl[self._abort] = 1
        self._ctl.release()
        self._slots = []
        try:
            self._mm.close()
        except BufferError:  # a tensor view is still alive somewhere: the GC unmaps it later
            pass

    # ------------------------------------------------------------------ barrier
    def _barrier(self) -> None:
        self._gen += 1
        gen, ctl, stride = self._gen, self._ctl, _STRIDE
        ctl[self.rank * stride] = gen
        waiting = [r for r in range(self.size) if r != self.rank]
        checks = 0
        start = 0.0
        next_liveness = 0.0
        while waiting:
            waiting = [r for r in waiting if ctl[r * stride] < gen]
            if not waiting:
                return
            if ctl[self._abort]:
                raise RuntimeError("tensor-parallel all-reduce: a peer rank left the group")
            checks += 1
            if checks < _SPIN_CHECKS:
                continue
            now = time.monotonic()
            if checks == _SPIN_CHECKS:
                start, next_liveness = now, now + _LIVENESS_EVERY_S
            time.sleep(_NAP_S)
            if now >= next_liveness:
                next_liveness = now + _LIVENESS_EVERY_S
                self._check_peers(waiting, now - start)

    def _check_peers(self, waiting: list[int], waited_s: float) -> None:
        for r in waiting:
            if not _alive(self._pids[r]):
                raise RuntimeError(f"tensor-parallel rank {r} (pid {self._pids[r]}) died in an all-reduce")
        if waited_s > self._timeout_s:
            raise TimeoutError(f"tensor-parallel all-reduce: ranks {waiting} late by {waited_s:.0f}s")


def _ctl_bytes(size: int) -> int:
    return (size + 1) * _LINE


def _map(path: str, nbytes: int, *, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now, not SIGBUS on a later write
        elif os.fstat(fd).st_size != nbytes:
            raise OSError(f"{path} has {os.fstat(fd).st_size} bytes, expected {nbytes}")
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """False once the process is gone or a zombie (a dead child not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
