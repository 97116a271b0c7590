"""`folio serve --speculative-config` as users run it: OpenAI SDK streaming chat, greedy
text equal to plain decoding, and vLLM's spec-decode counters on /metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from services.engine import LLM, SamplingParams
from tests.services.engine.test_spec_decode import COPY_TASKS, NGRAM, OPEN_QUESTIONS
from tests.services.serve_process import ServeProcess

pytestmark = pytest.mark.slow


async def test_streaming_chat_through_the_server_is_exact(smollm2_dir):
    questions = COPY_TASKS[:2] + OPEN_QUESTIONS
    ref = LLM(str(smollm2_dir), dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=40)
    expected = [o.text for o in ref.chat([[{"role": "user", "content": q}] for q in questions], params)]
    del ref
    serve = ServeProcess(
        smollm2_dir,
        "--dtype",
        "float32",
        "--served-model-name",
        "smol",
        "--speculative-config",
        json.dumps(NGRAM),
    )
    try:
        serve.wait_ready()
        client = serve.client()

        async def one(q: str) -> tuple[str, int]:
            stream = await client.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": q}],
                max_tokens=40,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = [], 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            return "".join(text), usage

        replies = await asyncio.gather(*(one(q) for q in questions))
        assert [t for t, _ in replies] == expected
        await client.close()
        with urllib.request.urlopen(f"{serve.base}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        values = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("folio:spec_decode") and "position" not in line
        }
        assert values["folio:spec_decode_num_drafts_total"] > 0
        assert (
            0
            < values["folio:spec_decode_num_accepted_tokens_total"]
            <= values["folio:spec_decode_num_draft_tokens_total"]
        )
        per_pos = [line for line in metrics.splitlines()
                   if line.startswith("folio:spec_decode_num_accepted_tokens_per_pos_total{")]
        assert any('model_name="smol"' in line and 'position="0"' in line for line in per_pos), per_pos
    finally:
        serve.stop()
