"""Forming one engine's tensor-parallel group: every rank of the engine, one torch.distributed
process group.

    group = form_tp_group(config, tp_rank)                          # tcp://HOST:PORT rendezvous
    group = form_tp_group(config, tp_rank, rendezvous=RedisRendezvous(url, namespace, engine_id))
    runner = ModelRunner(config, resolved, tp_rank=tp_rank, tp_group=group)
    ...
    group.destroy()                                                 # safe to call twice

Rank 0 serves a `torch.distributed.TCPStore`; the other ranks connect to it and the group is
initialised over it (gloo on CPU or when `distributed_backend="gloo"`, nccl on CUDA). The
group has a timeout (the config's step timeout), so a collective whose peer died raises
instead of hanging forever. When every rank is on this host and on CPU (hostname, boot id
and pid namespace agree), `group.shm_all_reduce(max_bytes)` (ModelRunner calls it once it
knows the model's sizes) sets up the shared-memory all-reduce of `shm_allreduce.py`; it is
closed by `destroy()`.

Rendezvous (how joiners find rank 0's store):
- `config.distributed_init_method = "tcp://HOST:PORT"`: rank 0 binds PORT, the others
  connect (k8s with a fixed service address; the in-process LLM with a free local port).
- `RedisRendezvous`: rank 0 binds a free port and publishes `{"host", "port", "nonce"}`
  under `{namespace}:engine:{engine_id}:tp_rendezvous` with a TTL that a small thread
  refreshes while rank 0 lives. Stale groups are never joined:

      rank 0 (re)starts ──▶ new store, new nonce ──SET (overwrites any stale key)──▶ Redis
      joiner ──GET──▶ {host, port, nonce} ──connect──▶ store.get("nonce") == nonce?
             └─ store.add("claim/rank{r}") == 1?   (no: this nonce's group already had a
                                                    rank r — we are its restart — wait for
                                                    a newer nonce)
             any failure (refused, timeout, mismatch) ──▶ poll again

  A crashed rank 0's key expires with its TTL (and is overwritten by its restart), and the
  store is prefixed by the nonce, so a group never mixes ranks of two incarnations.

One process holds at most one group (it is torch.distributed's default group): an engine's
ranks are separate processes.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from services.executor.shm_allreduce import ShmAllReduce, all_on_one_host
from shared.config import ConfigError, EngineConfig

log = logging.getLogger(__name__)

RENDEZVOUS_TTL_S = 10.0
CONNECT_TIMEOUT_S = 5.0  # one attempt to reach a published store
POLL_INTERVAL_S = 0.2


@dataclass(frozen=True)
class RedisRendezvous:
    """Find rank 0's store through Redis (plain arguments: no dependency on the async Bus)."""

    url: str
    namespace: str
    engine_id: str
    # The address joiners use to reach rank 0; None: this host's address (rank 0 only).
    advertise_host: str | None = None
    ttl_s: float = RENDEZVOUS_TTL_S

    @property
    def key(self) -> str:
        return f"{self.namespace}:engine:{self.engine_id}:tp_rendezvous"


@dataclass
class TPGroup:
    """One rank's membership of its engine's tensor-parallel group."""

    rank: int
    size: int
    backend: str  # "gloo" or "nccl"
    device: torch.device  # this rank's device: cuda:{rank % device_count}, or cpu
    nonce: str  # identifies this incarnation of the group
    group: dist.ProcessGroup | None = None  # the default group (None once destroyed)
    same_host: bool = False  # every rank on this host, on CPU (gloo): shared memory possible
    timeout_s: float = 0.0  # the group's timeout
    _shm: ShmAllReduce | None = field(default=None, repr=False)
    _store: dist.Store | None = field(default=None, repr=False)
    _refresher: _KeyRefresher | None = field(default=None, repr=False)

    def destroy(self) -> None:
        """Leave the group (and, on rank 0, withdraw the rendezvous key). Safe to call twice."""
        if self._refresher is not None:
            self._refresher.stop()
            self._refresher = None
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self.group is not None:
            if dist.is_initialized():
                dist.destroy_process_group()
            self.group = None
        self._store = None

    def shm_all_reduce(self, max_bytes: int) -> ShmAllReduce | None:
        """Collective (every rank, same `max_bytes`): the shared-memory all-reduce for
        tensors up to max_bytes (one per group: a second call replaces the first), or None
        when the ranks are not all on one CPU host or the segment cannot be made."""
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self.same_host:
            self._shm = ShmAllReduce.create(self.rank, self.size, max_bytes, timeout_s=self.timeout_s)
        return self._shm


def tp_backend(config: EngineConfig, device: torch.device) -> str:
    if config.distributed_backend != "auto":
        if config.distributed_backend == "nccl" and device.type != "cuda":
            raise ConfigError("distributed_backend: 'nccl' needs CUDA devices")
        return config.distributed_backend
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(config: EngineConfig, tp_rank: int) -> torch.device:
    """cuda:{rank % visible devices} (CUDA_VISIBLE_DEVICES narrows them), else cpu."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device")
    return torch.device("cuda", tp_rank % torch.cuda.device_count())


def form_tp_group(
    config: EngineConfig, tp_rank: int, *, rendezvous: RedisRendezvous | None = None
) -> TPGroup:
    """Join (rank 0: open) this engine's group; returns once every rank has joined.

    Without `rendezvous`, `config.distributed_init_method` (tcp://HOST:PORT) is required.
    Raises TimeoutError / RuntimeError when the group does not form within the config's
    step timeout.
    """
    size = config.tensor_parallel_size
    if not 0 <= tp_rank < size:
        raise ValueError(f"tensor-parallel rank {tp_rank} out of range for size {size}")
    device = rank_device(config, tp_rank)
    backend = tp_backend(config, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=config.resolved_step_timeout())
    refresher = None
    if rendezvous is None:
        host, port = _parse_init_method(config.distributed_init_method)
        store = dist.TCPStore(host, port, size, tp_rank == 0, timeout, wait_for_workers=False)
        nonce = "tcp"
    elif tp_rank == 0:
        store, nonce, refresher = _publish(rendezvous, size, timeout)
    else:
        store, nonce = _join(rendezvous, tp_rank, timeout)
    try:
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"folio/{nonce}/", store),
            rank=tp_rank,
            world_size=size,
            timeout=timeout,
        )
    except BaseException:
        if refresher is not None:
            refresher.stop()
        raise
    # Same host: the shared-memory all-reduce is possible (ModelRunner sizes it).
    same_host = backend == "gloo" and device.type == "cpu" and all_on_one_host()
    log.info(
        "tensor-parallel group formed: rank %d of %d, %s on %s%s",
        tp_rank,
        size,
        backend,
        device,
        ", all on this host" if same_host else "",
    )
    return TPGroup(
        tp_rank,
        size,
        backend,
        device,
        nonce,
        dist.group.WORLD,
        same_host,
        timeout.total_seconds(),
        _store=store,
        _refresher=refresher,
    )


def _parse_init_method(init_method: str | None) -> tuple[str, int]:
    if init_method is None:
        raise ConfigError("distributed_init_method: tcp://HOST:PORT is needed without a Redis rendezvous")
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- Redis rendezvous
def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=CONNECT_TIMEOUT_S)


def _local_address() -> str:
    """This host's address as other hosts see it (the pod IP in k8s)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _publish(rv: RedisRendezvous, size: int, timeout: timedelta) -> tuple[dist.Store, str, _KeyRefresher]:
    store = dist.TCPStore("0.0.0.0", 0, size, True, timeout, wait_for_workers=False)
    nonce = uuid.uuid4().hex
    store.set("nonce", nonce)  # before publishing: a joiner checks it first
    value = json.dumps({"host": rv.advertise_host or _local_address(), "port": store.port, "nonce": nonce})
    client = _redis(rv.url)
    client.set(rv.key, value, px=int(rv.ttl_s * 1000))  # overwrites a stale incarnation's key
    refresher = _KeyRefresher(client, rv.key, value, rv.ttl_s)
    refresher.start()
    return store, nonce, refresher


def _join(rv: RedisRendezvous, rank: int, timeout: timedelta) -> tuple[dist.Store, str]:
    """Poll the key until a store answers with the published nonce and this rank's slot in
    it is free; stale keys (dead store, an earlier incarnation) are skipped."""
    client = _redis(rv.url)
    deadline = time.monotonic() + timeout.total_seconds()
    failed: str | None = None  # the last value that did not work: wait for a different one
    try:
        while time.monotonic() < deadline:
            raw = client.get(rv.key)
            value = raw.decode() if raw is not None else None
            if value is None or value == failed:
                time.sleep(POLL_INTERVAL_S)
                continue
            info = json.loads(value)
            try:
                store = dist.TCPStore(
                    info["host"], info["port"], None, False, timedelta(seconds=CONNECT_TIMEOUT_S)
                )
                if store.get("nonce").decode() != info["nonce"]:
                    raise RuntimeError("the store at that address belongs to another incarnation")
                if store.add(f"claim/rank{rank}", 1) != 1:
                    raise RuntimeError(f"rank {rank} of this group already joined (we are its restart)")
            except (RuntimeError, OSError) as e:  # torch raises DistNetworkError/DistStoreError
                log.info("tensor-parallel rendezvous %s not usable (%s); waiting for a newer one", value, e)
                failed = value
                continue
            store.set_timeout(timeout)
            return store, info["nonce"]
    finally:
        client.close()
    raise TimeoutError(f"no tensor-parallel rendezvous at {rv.key} within {timeout.total_seconds():.0f}s")


class _KeyRefresher(threading.Thread):
    """Keeps rank 0's rendezvous key alive while the group lives; stops refreshing (and
    leaves the key alone) once another incarnation has overwritten it."""

    # Extend the TTL only if the key still holds our value; on stop, delete it only if ours.
    _IF_OURS = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call({}) end return 0"
    _REFRESH = _IF_OURS.format("'PEXPIRE', KEYS[1], ARGV[2]")
    _DELETE = _IF_OURS.format("'DEL', KEYS[1]")

    def __init__(self, client, key: str, value: str, ttl_s: float) -> None:
        super().__init__(name="folio-tp-rendezvous", daemon=True)
        self._client, self._key, self._value = client, key, value
        self._ttl_ms = int(ttl_s * 1000)
        self._interval_s = ttl_s / 3
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                if not self._client.eval(self._REFRESH, 1, self._key, self._value, self._ttl_ms):
                    log.warning("tensor-parallel rendezvous key %s was taken over; not refreshing", self._key)
                    return
            except Exception as e:  # a Redis hiccup must not kill the rank; the next beat retries
                log.warning("refreshing %s failed: %s", self._key, e)

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=5)
        try:
            self._client.eval(self._DELETE, 1, self._key, self._value)
        except Exception as e:  # the key expires by its TTL anyway
            log.warning("withdrawing %s failed: %s", self._key, e)
        self._client.close()
