"""Bounded admission, deadlines and drain for the generation endpoints.

    AdmissionMiddleware ── draining? 503 ── queue full? 429 + Retry-After ── else a Ticket
         │                     (before the body is read: no parsing, no tokenizing, no Redis)
         ▼
    handler: prompts tokenized ── admit(k engine requests, their prompt tokens) ── 429/400 or go
         ▼
    EngineClient.submit: each engine request's route holds the ticket; its first delta (or
         its end) releases its share; the ticket's deadline arms one timer for the stream

"Queued" means: this gateway's engine requests (n choices × prompts) that have not had
their first token yet, whether they still wait in the shared request stream, in a
scheduler's waiting queue or in their prefill. The gateway counts them itself, exactly and
without a round trip: the schedulers' published `EngineStats.num_waiting` is up to 0.5 s
old (a burst would be admitted whole before it moved), does not count entries no
scheduler has claimed yet (a scheduler claims only what it can run), and cannot tell this
gateway's requests from others'. So the bounds are per gateway replica: with G gateways
the cluster queues at most G × the bound, as with any per-instance limit behind a load
balancer.
"""

from __future__ import annotations

import asyncio
import contextvars
import time

from services.gateway.errors import APIError, BadRequestError, ServiceUnavailableError

# Seconds a 429 or a drain 503 asks the client to wait: the OpenAI SDK honours Retry-After
# up to 60 s (otherwise it backs off 0.5 s, 1 s, ... itself). One second is about how long a
# queued request waits for its first token on a loaded CPU engine.
RETRY_AFTER_S = 1


class RateLimitError(APIError):
    status = 429
    type = "RateLimitError"
    headers = {"Retry-After": str(RETRY_AFTER_S)}


class DeadlineExceededError(APIError):
    status = 504
    type = "TimeoutError"


class Ticket:
    """One HTTP request's share of the queue, and its deadline."""

    __slots__ = ("admission", "reqs", "tokens", "arrival", "timeout_s", "timer", "closed")

    def __init__(self, admission: Admission, timeout_s: float | None) -> None:
        self.admission = admission
        self.reqs = 1  # reserved at once, so a burst cannot pass the check before anyone counts
        self.tokens = 0
        self.arrival = time.monotonic()
        self.timeout_s = timeout_s
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def narrow_timeout(self, timeout_s: float | None) -> None:
        """A request's own timeout: it may shorten the server's, never lengthen it."""
        if timeout_s is not None and (self.timeout_s is None or timeout_s < self.timeout_s):
            self.timeout_s = timeout_s

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_s is None else self.arrival + self.timeout_s

    def started(self, tokens: int) -> None:
        """One engine request had its first token (or ended): it no longer queues."""
        if self.reqs > 0:
            self.reqs -= 1
            self.admission.queued_reqs -= 1
        take = min(tokens, self.tokens)
        self.tokens -= take
        self.admission.queued_tokens -= take

    def close(self) -> None:
        """The HTTP request is over: give back whatever it still holds (idempotent)."""
        if self.closed:
            return
        self.closed = True
        a = self.admission
        a.queued_reqs -= self.reqs
        a.queued_tokens -= self.tokens
        self.reqs = self.tokens = 0
        if self.timer is not None:
            self.timer.cancel()
        a.in_flight -= 1
        if a.in_flight == 0:
            a.idle.set()


class Admission:
    def __init__(self, max_reqs: int | None, max_tokens: int | None,
                 request_timeout_s: float | None = None) -> None:
        self.max_reqs = max_reqs
        self.max_tokens = max_tokens
        self.request_timeout_s = request_timeout_s
        self.queued_reqs = 0
        self.queued_tokens = 0
        self.in_flight = 0  # generation HTTP requests being served (streams included)
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        # Requests refused before reaching an engine, by reason, and deadlines that passed:
        # counted here, rendered by metrics.AdmissionCollector at scrape time.
        self.refused = {"queue_full": 0, "shutting_down": 0}
        self.deadlines_exceeded = 0

    def enter(self) -> Ticket:
        """A new generation request, before its body is read; raises 503 or 429."""
        if self.draining:
            self.refused["shutting_down"] += 1
            raise ServiceUnavailableError("The server is shutting down; retry on another replica.")
        if self.max_reqs is not None and self.queued_reqs >= self.max_reqs:
            self.refused["queue_full"] += 1
            raise RateLimitError(
                f"The server is overloaded: {self.queued_reqs} requests are waiting for their first "
                f"token (--max-num-queued-reqs {self.max_reqs}). Retry after {RETRY_AFTER_S}s."
            )
        self.queued_reqs += 1
        self.in_flight += 1
        self.idle.clear()
        return Ticket(self, self.request_timeout_s)

    def admit(self, ticket: Ticket, reqs: int, tokens: int) -> None:
        """Grow the ticket's reservation to `reqs` engine requests of `tokens` prompt tokens."""
        if self.max_reqs is not None and reqs > self.max_reqs:
            raise BadRequestError(
                f"This request asks for {reqs} completions (prompts × n) but the server queues at "
                f"most {self.max_reqs}.", "n")
        others_reqs = self.queued_reqs - ticket.reqs
        others_tokens = self.queued_tokens - ticket.tokens
        over_reqs = self.max_reqs is not None and others_reqs + reqs > self.max_reqs
        # A request larger than the token bound alone still gets in when nothing else queues
        # (it fits max_model_len, checked before): otherwise it could never be served.
        over_tokens = (self.max_tokens is not None and others_tokens > 0
                       and others_tokens + tokens > self.max_tokens)
        if over_reqs or over_tokens:
            self.refused["queue_full"] += 1
            what = (f"{others_reqs} requests" if over_reqs else f"{others_tokens} prompt tokens")
            flag = "--max-num-queued-reqs" if over_reqs else "--max-num-queued-tokens"
            raise RateLimitError(f"The server is overloaded: {what} are waiting for their first "
                                 f"token ({flag}). Retry after {RETRY_AFTER_S}s.")
        self.queued_reqs = others_reqs + reqs
        self.queued_tokens = others_tokens + tokens
        ticket.reqs, ticket.tokens = reqs, tokens


# The ticket of the HTTP request being served: set by the middleware, read by the handler
# and by EngineClient.submit (both run in the request's task or a copy of its context).
CURRENT: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("folio_ticket", default=None)


def current() -> Ticket | None:
    return CURRENT.get()
