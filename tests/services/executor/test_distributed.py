"""form_tp_group through Redis: a restarted rank never joins a stale group, and joiners use
the nonce the live rank 0 published (real redis-server, real gloo group, two processes)."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import uuid
from datetime import timedelta

import pytest
import redis
import torch
import torch.distributed as dist

from services.executor.distributed import RedisRendezvous, form_tp_group
from shared.config import EngineConfig

pytestmark = pytest.mark.slow

CONFIG = EngineConfig(tensor_parallel_size=2, device="cpu", step_timeout=60)


def _join_and_report(rendezvous: RedisRendezvous, queue) -> None:
    group = form_tp_group(CONFIG, 1, rendezvous=rendezvous)
    total = torch.tensor([2.0])
    dist.all_reduce(total)
    queue.put((group.nonce, total.item()))
    group.destroy()


def test_restarted_rank_joins_the_fresh_group_not_the_stale_one(redis_url):
    rv = RedisRendezvous(redis_url, f"t{uuid.uuid4().hex[:8]}", "e0", advertise_host="127.0.0.1")
    client = redis.Redis.from_url(redis_url)
    # The previous incarnation: rank 0's store still answers (nonce "old") and rank 1 of
    # that group already joined it. The process we start next is rank 1's restart.
    old = dist.TCPStore("127.0.0.1", 0, 2, True, timedelta(seconds=30), wait_for_workers=False)
    old.set("nonce", "old")
    old.add("claim/rank1", 1)
    client.set(rv.key, json.dumps({"host": "127.0.0.1", "port": old.port, "nonce": "old"}), px=60_000)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    joiner = ctx.Process(target=_join_and_report, args=(rv, queue), daemon=True)
    joiner.start()
    try:
        deadline = time.monotonic() + 60
        while old.add("claim/rank1", 0) < 2:  # the restart tried the stale group, was refused
            assert time.monotonic() < deadline and joiner.is_alive()
            time.sleep(0.1)
        # Rank 0 restarts: a fresh store and nonce overwrite the stale key.
        group = form_tp_group(CONFIG, 0, rendezvous=rv)
        try:
            assert group.nonce != "old"
            assert json.loads(client.get(rv.key))["nonce"] == group.nonce
            total = torch.tensor([1.0])
            dist.all_reduce(total)
            assert total.item() == 3.0
            assert queue.get(timeout=30) == (group.nonce, 3.0)
        finally:
            group.destroy()
            group.destroy()  # idempotent
        assert client.get(rv.key) is None  # withdrawn on a clean teardown
        joiner.join(30)
        assert joiner.exitcode == 0
    finally:
        if joiner.is_alive():
            joiner.kill()
        client.close()
