"""OpenAI tool calling on chat completions: `tools`, `tool_choice`, `parallel_tool_calls`.

    tool_choice "none"            ─▶ tools go to the chat template only; plain text back
    a named function              ─▶ output constrained to that function's parameter schema;
                                     the output *is* the call's `arguments`
    "required"                    ─▶ output constrained to a JSON array of
                                     {"name": <one of the tools>, "parameters": <its schema>}
                                     (one item when parallel_tool_calls is false)
    "auto" (the default with tools) ─▶ free text, searched for calls by the gateway's
                                     --tool-call-parser (tool_parsers.py); without one, a 400

Calls come back as `message.tool_calls` (ids `call_…`; `content` null, or the text before
an auto call) with `finish_reason: "tool_calls"`. A required or auto call cut by max_tokens
stays text with "length"; a named call keeps its partial arguments with "length" (its
arguments stream as they are decoded, see tool_stream.py).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from services.gateway.errors import BadRequestError
from services.gateway.openai_protocol import ChatCompletionRequest
from services.gateway.tool_parsers import ToolCallParser, get_parser
from shared.structured_outputs import StructuredOutputsParams


@dataclass(frozen=True, slots=True)
class ToolPlan:
    mode: str  # "none" | "auto" | "named" | "required"
    schemas: dict[str, dict]  # function name → parameters schema
    name: str | None = None  # the named function
    parallel: bool = True
    parser: ToolCallParser | None = None  # for "auto"

    @property
    def forced(self) -> bool:
        return self.mode in ("named", "required")

    def constraint(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            return _compact(self.schemas[self.name])
        if self.mode == "required":
            item = {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"name": {"type": "string", "enum": [n]}, "parameters": s},
                        "required": ["name", "parameters"],
                    }
                    for n, s in self.schemas.items()
                ]
            }
            array = {"type": "array", "items": item, "minItems": 1}
            if not self.parallel:
                array["maxItems"] = 1
            return _compact(array)
        return None

    def reply(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None] | None:
        """(content, tool calls, finish reason) of a finished output, or None when it holds
        no call (then it is plain text with its own finish reason)."""
        if self.mode == "named":
            # The output *is* the arguments, sent as the grammar produced them (streamed
            # piece by piece, so both responses carry the same text). Cut by max_tokens, the
            # call keeps its partial arguments and "length", as OpenAI reports it.
            reason = "tool_calls" if finish_reason == "stop" else finish_reason
            return None, [tool_call(self.name, text)], reason
        if finish_reason != "stop":  # calls only from a completed reply
            return None
        if self.mode == "auto":
            assert self.parser is not None
            found = self.parser.parse(text)
            if found is None or not found[1]:
                return None
            content, calls = found
            if not self.parallel:  # the model was told one call; keep only the first
                calls = calls[:1]
            return content, [tool_call(name, args) for name, args in calls], "tool_calls"
        if self.mode != "required":
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        calls = [tool_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]
        return None, calls, "tool_calls"


def _compact(schema: dict) -> StructuredOutputsParams:
    # No free whitespace: a small model otherwise spends its max_tokens on newlines between
    # keys (arguments are re-serialized anyway, so layout carries nothing).
    return StructuredOutputsParams(json=json.dumps(schema), disable_any_whitespace=True)


def tool_call(name: str, arguments: str) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def tool_plan(req: ChatCompletionRequest, parser: str | None = None) -> ToolPlan | None:
    """What the request's tools ask for (None without tools); malformed ones are 400s."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise BadRequestError("tool_choice needs `tools`.", "tool_choice")
        return None
    schemas: dict[str, dict] = {}
    for i, tool in enumerate(req.tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequestError(
                f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}.',
                "tools",
            )
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise BadRequestError(f"tools[{i}].function.parameters must be a JSON schema object.", "tools")
        schemas[fn["name"]] = params
    parallel = req.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan("none", schemas, parallel=parallel)
    if choice == "required":
        return ToolPlan("required", schemas, parallel=parallel)
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in schemas:
            raise BadRequestError(
                f"tool_choice names function {name!r}, which is not among the tools.", "tool_choice"
            )
        return ToolPlan("named", schemas, name=name, parallel=parallel)
    if choice in (None, "auto"):
        if parser is None:
            raise BadRequestError(
                'tool_choice "auto" needs the server to run with --tool-call-parser; use "required", '
                'a named function or "none".',
                "tool_choice",
            )
        return ToolPlan("auto", schemas, parallel=parallel, parser=get_parser(parser))
    raise BadRequestError(
        f"tool_choice must be none, auto, required or a named function, got {choice!r}.", "tool_choice"
    )
