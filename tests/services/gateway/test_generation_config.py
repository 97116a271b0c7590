"""`folio serve --generation-config FOLDER`: the folder's sampling defaults fill what a request
leaves unset (vLLM's behaviour; `auto`, the default, reads the model folder's own file)."""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.services.gateway.conftest import run_server
from tests.tiny_models import write_generation_config

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Tell me a story about a dragon."}]


@pytest.fixture(scope="module")
def client_and_model(tmp_path_factory):
    folder = write_generation_config(tmp_path_factory.mktemp("gen"), temperature=0.0, max_new_tokens=5)
    with run_server("--generation-config", str(folder)) as srv:
        yield OpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key, max_retries=0, timeout=120), srv.model


def test_defaults_fill_unset_fields_only(client_and_model):
    client, model = client_and_model
    # Unset temperature and max_tokens: greedy (temperature 0) and 5 tokens, for both choices.
    out = client.chat.completions.create(model=model, messages=MSGS, n=2)
    assert out.usage.completion_tokens == 10
    assert out.choices[0].message.content == out.choices[1].message.content
    explicit = client.chat.completions.create(model=model, messages=MSGS, temperature=0, max_tokens=5)
    assert explicit.choices[0].message.content == out.choices[0].message.content
    # A request's own values win.
    longer = client.chat.completions.create(model=model, messages=MSGS, max_tokens=8)
    assert longer.usage.completion_tokens == 8
    text = client.completions.create(model=model, prompt="Once upon a time")
    assert text.usage.completion_tokens == 5


def test_defaults_apply_to_responses_too(client_and_model):
    """The Responses endpoint fills what a request leaves unset the same way."""
    client, model = client_and_model
    resp = client.responses.create(model=model, input="Tell me a story about a dragon.")
    assert resp.usage.output_tokens == 5 and resp.max_output_tokens is None
    assert resp.temperature == 0.0
    explicit = client.responses.create(
        model=model, input="Tell me a story about a dragon.", temperature=0, max_output_tokens=5
    )
    assert resp.output_text == explicit.output_text
