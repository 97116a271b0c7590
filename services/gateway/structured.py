"""A request's output constraint → `StructuredOutputsParams`, or a 400 saying what is wrong.

Accepted spellings (one per request; two at once is a 400, never a silent pick):
- OpenAI `response_format`: `{"type": "json_object"}`, `{"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}` (`text` means no constraint);
- vLLM `structured_outputs`: `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`
  (plus `disable_any_whitespace`);
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`;
- a forced tool call (`tool_choice` "required" or a named function: see tools.py).

The spec's grammar is built here (xgrammar, no tokenizer: cheap), so an invalid schema,
regex or grammar is a 400 before anything is queued or streamed.
"""

from __future__ import annotations

import json

from services.gateway.errors import BadRequestError
from services.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from shared.structured_outputs import StructuredOutputsParams

_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_FIELDS = ("json", "json_object", "regex", "choice", "grammar", "disable_any_whitespace")


def structured_outputs(
    req: CompletionRequest | ChatCompletionRequest, tool_constraint: StructuredOutputsParams | None = None
) -> StructuredOutputsParams | None:
    """`tool_constraint`: a forced tool call's schema (tools.py), one more source."""
    found: list[tuple[str, dict | StructuredOutputsParams]] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        else:
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise BadRequestError(
                    'response_format of type "json_schema" needs json_schema.schema.', "response_format"
                )
            found.append(("response_format", {"json": rf.json_schema.schema_}))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        unknown = sorted(set(so) - set(_FIELDS))
        if unknown:
            raise BadRequestError(f"structured_outputs: unknown field(s) {unknown}.", "structured_outputs")
        found.append(("structured_outputs", dict(so)))
    extra = req.model_extra or {}
    for name, field in _GUIDED.items():
        if extra.get(name) is not None:
            found.append((name, {field: extra[name]}))
    if tool_constraint is not None:
        found.append(("tool_choice", tool_constraint))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise BadRequestError(f"only one output constraint may be given, got {names}.", found[1][0])
    param, spec = found[0]
    if isinstance(spec, StructuredOutputsParams):  # a forced tool call's schema
        why = spec.check()
        if why is not None:
            raise BadRequestError(f"a tool's parameters: {why}", "tools")
        return spec
    if isinstance(spec.get("json"), dict | bool):
        spec["json"] = json.dumps(spec["json"])
    try:
        params = StructuredOutputsParams(**spec)
    except (TypeError, ValueError) as e:
        raise BadRequestError(str(e), param) from None
    why = params.check()
    if why is not None:
        raise BadRequestError(why, param)
    return params
