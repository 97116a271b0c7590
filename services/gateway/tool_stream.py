"""Streaming a chat reply that may hold tool calls: what goes out as content, and when.

    named function                  the call's id and name with the first text, then the
                                    arguments as they are decoded (the output is the arguments)
    required                        nothing while decoding; at the finish the calls, whole
    auto (a --tool-call-parser)     text before a call's start marker goes out as content
                                    (holding back an end that could begin a marker); from
                                    the marker on, nothing until the finish, then the calls
                                    (or, when the text held no complete call, the rest as
                                    content)

The finish goes through `ToolPlan.reply`, the same function the non-streaming response
uses, so the streamed calls reassemble to the non-streamed ones.
"""

from __future__ import annotations

from services.gateway.generation import Choice
from services.gateway.tools import ToolPlan, tool_call


class ToolStream:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._sent: dict[int, int] = {}  # choice index → characters already sent
        self._in_call: set[int] = set()
        self._call_ids: dict[int, str] = {}  # named: choice index → the call's id, once sent

    def delta(self, c: Choice) -> dict:
        """What of the choice's text may go out now: content (auto), arguments (named)."""
        if self.plan.mode == "named":
            return self._arguments(c, c.text)
        text = self._content(c)
        return {"content": text} if text else {}

    def _content(self, c: Choice) -> str:
        parser = self.plan.parser
        if parser is None or c.index in self._in_call:
            return ""
        sent = self._sent.get(c.index, 0)
        at = parser.start(c.text, sent)
        if at >= 0:
            self._in_call.add(c.index)
            end = at
        else:
            end = len(c.text) - parser.holdback(c.text, sent)
        self._sent[c.index] = max(sent, end)
        return c.text[sent:end]

    def _arguments(self, c: Choice, text: str, call: dict | None = None) -> dict:
        sent = self._sent.get(c.index, 0)
        new = text[sent:]
        if not new and c.index in self._call_ids:
            return {}
        self._sent[c.index] = len(text)
        if c.index in self._call_ids:
            return {"tool_calls": [{"index": 0, "function": {"arguments": new}}]}
        call = call or tool_call(self.plan.name, "")
        self._call_ids[c.index] = call["id"]
        return {"tool_calls": [{"index": 0, **call, "function": {"name": self.plan.name, "arguments": new}}]}

    def finish(self, c: Choice) -> tuple[dict, str | None]:
        """The finished choice's last delta and its finish reason (call `delta` first)."""
        reply = self.plan.reply(c.text, c.finish_reason)
        if reply is None:
            return {"content": c.text[self._sent.get(c.index, 0) :]}, c.finish_reason
        _, calls, reason = reply
        if self.plan.mode == "named":
            return self._arguments(c, c.text, calls[0]), reason
        return {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}, reason
