"""--speculative-config parsing: vLLM's keys, clear errors, and the CLI round trip."""

import pytest

from shared.cli_args import engine_args_to_argv
from shared.config import ConfigError, EngineConfig
from shared.speculative_config import SpeculativeConfig, SpeculativeConfigError


def test_ngram_and_defaults():
    s = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}')
    assert (s.method, s.num_speculative_tokens, s.prompt_lookup_min, s.prompt_lookup_max) == (
        "ngram",
        4,
        4,
        4,
    )
    assert s.num_lookahead_slots == 0 and s.backoff
    s = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2})
    assert (s.prompt_lookup_min, s.prompt_lookup_max) == (2, 4)


def test_draft_model_is_implied_by_model():
    s = SpeculativeConfig.parse({"model": "smollm2-135m-instruct", "num_speculative_tokens": 3})
    assert s.uses_draft_model and s.model == "smollm2-135m-instruct" and s.num_lookahead_slots == 3


@pytest.mark.parametrize(
    "value, words",
    [
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_mn": 1}, "prompt_lookup_mn"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
            "<=",
        ),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
        ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "ngram"),
        ("[1]", "JSON object"),
        ("{not json", "JSON"),
    ],
)
def test_errors_name_the_problem(value, words):
    with pytest.raises(SpeculativeConfigError, match=words):
        SpeculativeConfig.parse(value)


def test_engine_config_validates_and_round_trips_through_flags():
    with pytest.raises(ConfigError, match="speculative_config"):
        EngineConfig(speculative_config={"method": "ngram"})
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(speculative_config={"model": "m", "num_speculative_tokens": 2}, tensor_parallel_size=2)
    c = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    argv = engine_args_to_argv(c)
    i = argv.index("--speculative-config")
    assert SpeculativeConfig.parse(argv[i + 1]) == c.speculative()
    assert EngineConfig().speculative() is None
