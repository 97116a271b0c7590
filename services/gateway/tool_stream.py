"""Streaming a chat reply that may hold tool calls: what goes out as content, and when.

    forced call (required / named)  nothing while decoding; at the finish the calls, whole
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
from services.gateway.tools import ToolPlan


class ToolStream:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._sent: dict[int, int] = {}  # choice index → characters already sent as content
        self._in_call: set[int] = set()

    def content(self, c: Choice) -> str:
        """The part of the choice's text that may go out as content now."""
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

    def finish(self, c: Choice) -> tuple[dict, str | None]:
        """The finished choice's last delta and its finish reason (call `content` first)."""
        reply = self.plan.reply(c.text) if c.finish_reason == "stop" else None
        if reply is None:
            return {"content": c.text[self._sent.get(c.index, 0) :]}, c.finish_reason
        _, calls = reply
        return {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}, "tool_calls"
