"""`--tool-call-parser`: find tool calls in a model's free text (tool_choice "auto").

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call> (any number; text
                 before the first one is the message content) — Hermes, Qwen2.5/3 templates
    llama3_json  the whole reply is {"name": ..., "parameters": {...}} (several joined by
                 ";"), optionally after <|python_tag|> — Llama 3.x templates

A parser answers three questions: where a call starts in the text (streaming sends text
before that point as content), how much of the text's end to hold back because it could
be the start of a call, and, once the reply is complete, which calls it holds (None: it
holds none, and the whole reply is content).
"""

from __future__ import annotations

import json
import re

Call = tuple[str, str]  # (function name, arguments as JSON text)


class ToolCallParser:
    name = ""

    def start(self, text: str, sent: int) -> int:
        """Index in `text` (at or after `sent`) where tool calls begin, else -1."""
        raise NotImplementedError

    def holdback(self, text: str, sent: int) -> int:
        """How many characters at the end of `text` must not be sent yet as content."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[Call]] | None:
        """(content before the calls, calls), or None when `text` holds no complete call."""
        raise NotImplementedError


def _arguments(obj: dict, key: str) -> Call | None:
    name, args = obj.get("name"), obj.get(key, obj.get("arguments", obj.get("parameters")))
    if not isinstance(name, str) or not isinstance(args, dict | str):
        return None
    return name, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


class HermesParser(ToolCallParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def start(self, text: str, sent: int) -> int:
        return text.find(self.OPEN, sent)

    def holdback(self, text: str, sent: int) -> int:
        for k in range(min(len(self.OPEN) - 1, len(text) - sent), 0, -1):
            if self.OPEN.startswith(text[-k:]):
                return k
        return 0

    def parse(self, text: str) -> tuple[str | None, list[Call]] | None:
        at = text.find(self.OPEN)
        if at < 0:
            return None
        calls = []
        for body in self._CALL.findall(text[at:]):
            try:
                obj = json.loads(body)
            except ValueError:
                return None
            call = _arguments(obj, "arguments") if isinstance(obj, dict) else None
            if call is None:
                return None
            calls.append(call)
        content = text[:at]
        return (content if content.strip() else None), calls


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def start(self, text: str, sent: int) -> int:
        # Only a reply that *is* calls: nothing but whitespace may come before them.
        head = text.lstrip()
        if sent == 0 and (head.startswith("{") or head.startswith(self.TAG)):
            return 0
        return -1

    def holdback(self, text: str, sent: int) -> int:
        return len(text) - sent if sent == 0 and self.TAG.startswith(text.lstrip()) else 0

    def parse(self, text: str) -> tuple[str | None, list[Call]] | None:
        rest = text.strip().removeprefix(self.TAG).strip()
        if not rest.startswith("{"):
            return None
        decoder = json.JSONDecoder()
        calls = []
        while rest:
            try:
                obj, end = decoder.raw_decode(rest)
            except ValueError:
                return None
            call = _arguments(obj, "parameters") if isinstance(obj, dict) else None
            if call is None:
                return None
            calls.append(call)
            rest = rest[end:].strip().removeprefix(";").strip()
        return None, calls


PARSERS: dict[str, type[ToolCallParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}


def get_parser(name: str) -> ToolCallParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose from {sorted(PARSERS)}") from None


def auto_tool_parser(args) -> str | None:
    """The gateway's parser for tool_choice "auto", from --tool-call-parser and vLLM's
    --enable-auto-tool-choice: the flag without a parser is an error (as in vLLM); a
    parser alone enables "auto" too, so command lines written for either server work."""
    name = getattr(args, "tool_call_parser", None)
    if getattr(args, "enable_auto_tool_choice", False) and name is None:
        raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser (one of {sorted(PARSERS)})")
    return name

