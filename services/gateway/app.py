"""The FastAPI app: routes, auth, lifecycle.

/v1/models  /v1/completions  /v1/chat/completions  /v1/responses   (Bearer key when --api-key is set)
/tokenize  /detokenize  /health  /version  /metrics  (always open)
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
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics

from services.gateway.chat import render_chat
from services.gateway.chat_completions import create_chat_completion
from services.gateway.completions import create_completion
from services.gateway.engine_client import EngineClient
from services.gateway.errors import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
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


def build_app(settings: GatewaySettings, tokenizer=None) -> FastAPI:
    """The gateway app. `tokenizer` defaults to the one of `settings.model` (or `.tokenizer`)."""
    if tokenizer is None:
        tokenizer = load_gateway_tokenizer(
            settings.model, settings.tokenizer, settings.download_dir, settings.load_format
        )
    disable_created_metrics()
    bus = Bus(settings.redis_url, settings.redis_namespace)
    client = EngineClient(bus, settings.gateway_id, resume_timeout_s=settings.resume_timeout_s)
    model_name = settings.served_model_name or settings.model
    state = GatewayState(
        settings, tokenizer, client, GatewayMetrics(model_name), GatewayTracer(settings.otlp_traces_endpoint)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await client.start()
        log.info("gateway %s subscribed to %s; serving %s", settings.gateway_id, client.reply_to, model_name)
        try:
            yield
        finally:
            await client.stop()
            await bus.close()
            state.tracer.shutdown()

    app = FastAPI(title="folio", version=_version(), lifespan=lifespan)
    app.state.gateway = state
    install_error_handlers(app)
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
        engines = await client.engines(fresh=True)
        if not engines:
            return error_response(ServiceUnavailableError("No engine is alive."))
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = await asyncio.wait_for(bus.engine_stats(), _REDIS_TIMEOUT_S)
        except Exception as e:  # still serve the gateway's own metrics
            log.warning("cannot read engine stats: %s", e)
            stats = []
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    return app
