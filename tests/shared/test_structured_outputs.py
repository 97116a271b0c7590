"""StructuredOutputsParams: one constraint per request, cache keys, what a bad spec says."""

from __future__ import annotations

import msgspec
import pytest

from shared.sampling_params import SamplingParams
from shared.stop import check_stop
from shared.structured_outputs import StructuredOutputsParams as S


def test_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        S()
    with pytest.raises(ValueError, match="exactly one"):
        S(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="at least one"):
        S(choice=[])


def test_schema_dict_keeps_property_order_and_round_trips_the_wire():
    s = S(json={"type": "object", "properties": {"b": {}, "a": {}}})
    assert s.json.index('"b"') < s.json.index('"a"')
    params = SamplingParams(structured_outputs=s)
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert wire.structured_outputs == s and wire.structured_outputs.key() == s.key()
    assert S(json=s.json, disable_any_whitespace=True).key() != s.key()


@pytest.mark.parametrize(
    "spec, words",
    [
        (S(json='{"type": "nope"}'), 'invalid json for structured outputs: Unsupported type "nope"'),
        (S(json="{"), "not valid JSON"),
        (S(json="[1]"), "must be an object"),
        (S(regex="[a-"), "invalid regex for structured outputs: Regex parsing error"),
        (S(grammar='root ::= "a" |'), "invalid grammar for structured outputs"),
    ],
)
def test_check_says_what_is_wrong(spec, words):
    assert words in spec.check()


def test_valid_specs_check_clean():
    for spec in (S(json_object=True), S(choice=['a"b', "c\\d"]), S(grammar='root ::= "x"+'), S(regex=r"\d+")):
        assert spec.check() is None


def test_a_terminated_grammar_stops_even_with_ignore_eos():
    params = SamplingParams(ignore_eos=True, max_tokens=10)
    assert check_stop([5], 3, params, {2}, 100) is None
    assert check_stop([5], 3, params, {2}, 100, grammar_terminated=True) == 1
