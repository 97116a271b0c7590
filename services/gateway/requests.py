"""Checks every generation endpoint makes before tokenizing: the model name, a live engine."""

from __future__ import annotations

from services.gateway import admission
from services.gateway.errors import NotFoundError, ServiceUnavailableError
from services.gateway.state import GatewayState


def check_model(state: GatewayState, model: str | None) -> None:
    # Like vLLM, an omitted model means the served one.
    if model is not None and model != state.model_name:
        raise NotFoundError(f"The model `{model}` does not exist.", "model")


async def require_engine(state: GatewayState) -> int:
    """The serving max_model_len; 503 at once when no engine is alive (never queue blindly)."""
    engines = await state.client.engines()
    if not engines:
        raise ServiceUnavailableError("No engine is available to serve the request; try again later.")
    return min(e.max_model_len for e in engines)


def admit(prompts: list[list[int]], n: int, timeout_s: float | None) -> None:
    """Take this HTTP request's place in the queue (its n × prompts engine requests and their
    prompt tokens; 429 past the bounds) and its deadline (the body's request_timeout may
    shorten the server's). No-op outside the admission middleware (tests of handlers alone)."""
    ticket = admission.current()
    if ticket is None:
        return
    ticket.narrow_timeout(timeout_s)
    ticket.admission.admit(ticket, len(prompts) * n, n * sum(len(p) for p in prompts))
