"""Structured outputs (vLLM's `StructuredOutputsParams`): the constraint one request decodes under.

Exactly one of `json` (a JSON schema, as JSON text), `json_object` (any JSON object),
`regex`, `choice` (one of these strings) or `grammar` (xgrammar's EBNF) is set. It rides
inside SamplingParams to the executor, which compiles it once per process (cached by
`key()`) and masks each step's logits with it; the spec is small, so no vocabulary-sized
mask ever crosses Redis.

`check()` compiles the spec's grammar (no tokenizer needed, cheap) so that a bad schema,
regex or grammar is rejected where the request enters (gateway 400, `LLM` ValueError),
never first discovered in the middle of a batch. xgrammar is imported lazily: the
scheduler decodes these structs but never needs it.
"""

from __future__ import annotations

import hashlib
import json as _json
import re
from typing import Any

import msgspec


class StructuredOutputsParams(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    json: str | None = None  # JSON schema text (a dict given in-process is dumped in order)
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF in xgrammar's dialect
    # vLLM's flag: JSON without free whitespace between tokens (compact separators).
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):  # offline API convenience; property order is kept
            self.json = _json.dumps(self.json)
        kinds = self.kinds()
        if len(kinds) != 1:
            raise ValueError(
                "structured_outputs: exactly one of json, json_object, regex, choice, grammar must be "
                f"set, got {kinds or 'none'}."
            )
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs: choice must list at least one string.")

    def kinds(self) -> list[str]:
        return [
            k
            for k, v in (
                ("json", self.json),
                ("json_object", self.json_object or None),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
            )
            if v is not None
        ]

    def key(self) -> str:
        """Cache key: a hash of the whole spec (equal specs share one compiled grammar)."""
        return hashlib.sha256(msgspec.msgpack.encode(self)).hexdigest()

    def build_grammar(self) -> Any:
        """The xgrammar `Grammar` (raises ValueError-like errors from xgrammar when invalid)."""
        import xgrammar as xgr

        if self.json is not None:
            return xgr.Grammar.from_json_schema(self.json, **self.json_options())
        if self.json_object:
            return xgr.Grammar.from_json_schema('{"type": "object"}', **self.json_options())
        if self.regex is not None:
            return xgr.Grammar.from_regex(self.regex)
        if self.choice is not None:
            return xgr.Grammar.from_ebnf(choice_ebnf(self.choice))
        return xgr.Grammar.from_ebnf(self.grammar)

    def json_options(self) -> dict:
        if self.disable_any_whitespace:
            return {"any_whitespace": False}
        # Free whitespace, but bounded: a small model left free to emit spaces can fill
        # max_tokens with them and never close the object.
        return {"any_whitespace": True, "max_whitespace_cnt": 8}

    def check(self) -> str | None:
        """None when the spec compiles, else what is wrong with it (for a 400)."""
        if self.json is not None:
            try:
                schema = _json.loads(self.json)
            except ValueError as e:
                return f"the JSON schema is not valid JSON: {e}"
            if not isinstance(schema, dict | bool):
                return "the JSON schema must be an object."
        try:
            self.build_grammar()
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            # Drop xgrammar's "[time] file.cc:line: " prefix: the client needs only the reason.
            why = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip()) or type(e).__name__
            return f"invalid {self.kinds()[0]} for structured outputs: {why}"
        return None


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF root that matches exactly one of `choices` (JSON string literals are valid
    EBNF literals in xgrammar's dialect: same escapes)."""
    return "root ::= " + " | ".join(_json.dumps(c, ensure_ascii=False) for c in choices)
