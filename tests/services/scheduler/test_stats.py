"""The request stream's backlog a scheduler publishes: entries no engine has claimed."""

from __future__ import annotations

from services.scheduler.service import SchedulerService
from shared.bus import Bus
from shared.config import EngineConfig
from shared.protocol import GenerateRequest
from shared.sampling_params import SamplingParams


async def test_stream_unclaimed_counts_what_no_engine_claimed(redis_url):
    bus = Bus(redis_url, "tbacklog")
    service = SchedulerService(bus, "e0", EngineConfig(model="unused"))
    try:
        assert await service._stream_unclaimed() == -1  # no stream yet: Redis cannot say
        await bus.ensure_group()
        assert await service._stream_unclaimed() == 0
        for i in range(3):
            await bus.submit(GenerateRequest(req_id=f"r{i}", prompt_token_ids=[1, 2],
                                             sampling_params=SamplingParams(max_tokens=1)))
        assert await service._stream_unclaimed() == 3
        claimed = await bus.claim_requests("e0", count=1)
        assert await service._stream_unclaimed() == 2  # claimed, unfinished: the engine's now
        await bus.retire_requests(claimed[0][0])
        assert await service._stream_unclaimed() == 2  # finished: gone from the stream
        await bus.claim_requests("e1", count=5)
        assert await service._stream_unclaimed() == 0
    finally:
        await bus.close()
