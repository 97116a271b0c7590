"""The FastAPI app: routes, auth, lifecycle.

/v1/models  /v1/completions  /v1/chat/completions  /v1/responses   (Bearer key when --api-key is set)
/tokenize  /detokenize  /health  /ready  /version  /metrics  (always open)

/health is liveness (an engine is alive and none with work has stalled), /ready is
readiness (also false while draining after SIGTERM). The generation endpoints pass
through AdmissionMiddleware (admission.py): 503 while draining, 429 past the queue bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway import admission
from services.gateway.admission import Admission
from services.gateway.chat import render_chat
from services.gateway.chat_completions import create_chat_completion
from services.gateway.completions import create_completion
from services.gateway.engine_client import EngineClient
from services.gateway.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    error_response,
    install_error_handlers,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from services.gateway.requests import check_model
from services.gateway.responses import ResponsesRequest, create_response
from services.gateway.sampling import check_token_ids
from services.gateway.state import GatewaySettings, GatewayState
from services.gateway.tokenizer import load_gateway_tokenizer
from services.gateway.tracing import GatewayTracer
from shared.bus import Bus
from shared.gc_heap import freeze_startup_heap
from shared.health import stalled_engines
from shared.protocol import EngineStats

log = logging.getLogger(__name__)

_REDIS_TIMEOUT_S = 2.0


def _version() -> str:
    try:
        return metadata.version("folio")
    except metadata.PackageNotFoundError:
        return "0.1.0"


class APIKeyMiddleware:
    """Pure ASGI (no per-request task like BaseHTTPMiddleware): /v1/* needs the bearer key."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not secrets.compare_digest(auth, self.expected):
                err = AuthenticationError(
                    "Invalid or missing API key (expected `Authorization: Bearer <key>`)."
                )
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})


class AdmissionMiddleware:
    """Pure ASGI, before the body is read: a 429 or a drain 503 costs no parsing, no
    tokenizing and no Redis round trip. An admitted request holds a Ticket for its life."""

    def __init__(self, app, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            ticket = self.admission.enter()
        except APIError as e:
            await error_response(e)(scope, receive, send)
            return
        token = admission.CURRENT.set(ticket)
        try:
            # Let the requests that arrived with this one be answered first: in a burst, the
            # 429s (microseconds each) then do not wait behind the admitted requests' parsing,
            # tokenizing and Redis round trip (a millisecond or more each).
            await asyncio.sleep(0)
            await self.app(scope, receive, send)
        finally:
            admission.CURRENT.reset(token)
            ticket.close()


class BodyLimitMiddleware:
    """413 for a request body over the limit: by Content-Length before reading, else (chunked)
    as soon as the bytes read pass it."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        message = f"The request body is larger than the server's limit of {self.limit} bytes."
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(PayloadTooLargeError(message))(scope, receive, send)
            return
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    # FastAPI re-raises an HTTPException from the body read as it is (any other
                    # error would become a vague 400); errors.py shapes it as OpenAI's.
                    raise StarletteHTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


def build_app(settings: GatewaySettings, tokenizer=None) -> FastAPI:
    """The gateway app. `tokenizer` defaults to the one of `settings.model` (or `.tokenizer`)."""
    if tokenizer is None:
        tokenizer = load_gateway_tokenizer(
            settings.model, settings.tokenizer, settings.download_dir, settings.load_format
        )
    disable_created_metrics()
    bus = Bus(settings.redis_url, settings.redis_namespace)
    client = EngineClient(bus, settings.gateway_id, resume_timeout_s=settings.resume_timeout_s,
                          metrics_lease_ttl_s=settings.engine_metrics_lease_ttl_s)
    model_name = settings.served_model_name or settings.model
    state = GatewayState(
        settings, tokenizer, client, GatewayMetrics(model_name), GatewayTracer(settings.otlp_traces_endpoint)
    )
    gate = Admission(settings.max_num_queued_reqs, settings.max_num_queued_tokens, settings.request_timeout_s)
    state.metrics.watch(gate)
    # The last stats seen of each engine: a stalled scheduler's stats key expires (10 s TTL),
    # and a missing key must not make its engine look idle.
    last_stats: dict[str, EngineStats] = {}

    async def drain() -> None:
        """SIGTERM (server.py): /ready and new requests turn 503; in-flight requests get up to
        --shutdown-timeout to finish, then end with an error (an SSE error event if streaming)."""
        gate.draining = True
        timeout = settings.shutdown_timeout_s
        log.info("draining: %d request(s) in flight, up to %gs", gate.in_flight, timeout)
        try:
            await asyncio.wait_for(gate.idle.wait(), timeout)
            return
        except asyncio.TimeoutError:
            pass
        n = client.interrupt_all(ServiceUnavailableError(
            f"The server is shutting down and the request did not finish within --shutdown-timeout "
            f"{timeout:g}s; it was aborted."))
        log.warning("shutdown timeout: ended %d request(s) with an error", n)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gate.idle.wait(), 5.0)  # their handlers write the error

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await client.start()
        freeze_startup_heap()
        log.info("gateway %s subscribed to %s; serving %s", settings.gateway_id, client.reply_to, model_name)
        try:
            yield
        finally:
            await client.stop()
            await bus.close()
            state.tracer.shutdown()

    app = FastAPI(title="folio", version=_version(), lifespan=lifespan)
    app.state.gateway = state
    app.state.admission = gate
    app.state.drain = drain
    install_error_handlers(app)
    # Outermost last: body limit, then the API key, then admission (an unauthenticated or
    # oversized request never takes a place in the queue).
    app.add_middleware(AdmissionMiddleware, admission=gate)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_body_bytes)

    # ------------------------------------------------------------------ OpenAI API
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await create_completion(state, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(state, req, raw)

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, raw: Request) -> Response:
        return await create_response(state, req, raw)

    def model_card(max_model_len: int | None) -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "folio",
            "root": settings.model,
            "parent": None,
            "max_model_len": max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(await state.max_model_len())]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        if model != model_name:
            raise NotFoundError(f"The model `{model}` does not exist.", "model")
        return model_card(await state.max_model_len())

    # ------------------------------------------------------------------ tokenizer
    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        check_model(state, req.model)
        if req.messages is not None:
            tokens = render_chat(tokenizer, req.messages, add_generation_prompt=req.add_generation_prompt)
        elif req.prompt is not None:
            tokens = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise BadRequestError("either prompt or messages is required.", "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": await state.max_model_len()}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        check_model(state, req.model)
        check_token_ids(req.tokens, state.vocab_size, "tokens")
        return {"prompt": state.decode_fn(req.tokens, False)}

    # ------------------------------------------------------------------ operations
    @app.get("/health")
    async def health() -> Response:
        """Liveness: an engine is alive and none that has work has stalled."""
        engines = await client.engines(fresh=True)
        if not engines:
            return error_response(ServiceUnavailableError("No engine is alive."))
        try:
            for s in await asyncio.wait_for(bus.engine_stats(), _REDIS_TIMEOUT_S):
                last_stats[s.engine_id] = s
        except Exception as e:  # the engines' heartbeats were just read: judge by the last stats seen
            log.warning("cannot read engine stats: %s", e)
        bound = settings.engine_stall_timeout_s
        stalled = stalled_engines(engines, last_stats, time.time(), bound, client.serving_engines())
        if stalled:
            return error_response(ServiceUnavailableError(
                f"Engine(s) {', '.join(stalled)} have requests but have not finished a step in "
                f"{bound:g}s."))
        return Response(status_code=200)

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: whether a load balancer should send this gateway traffic."""
        if gate.draining:
            return error_response(ServiceUnavailableError("The gateway is shutting down."))
        if not await client.engines():
            return error_response(ServiceUnavailableError("No engine is alive."))
        return JSONResponse({"status": "ready", "in_flight": gate.in_flight,
                             "queued_requests": gate.queued_reqs, "queued_tokens": gate.queued_tokens})

    @app.get("/version")
    async def version() -> dict:
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        # The engine series only from the lease holder (one gateway at a time), so a plain
        # `sum` over gateways is the true value; the others render just their own series.
        stats = None
        if client.exports_engine_metrics:
            try:
                stats = await asyncio.wait_for(bus.engine_stats(), _REDIS_TIMEOUT_S)
            except Exception as e:  # still serve the gateway's own metrics
                log.warning("cannot read engine stats: %s", e)
                stats = []
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    return app
