"""Server-sent events and the helpers every streaming or long request shares.

Chunks are small dicts serialized with orjson when it is installed (json otherwise):
building them is on the per-token path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from services.gateway.errors import APIError, error_response, sse_error
from services.gateway.generation import Generation

try:
    import orjson

    def dumps(obj) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - depends on the environment

    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


DONE = b"data: [DONE]\n\n"


def event(obj) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def stream_response(gen: Generation, events: Callable[[], AsyncIterator[bytes]]) -> StreamingResponse:
    """SSE response over `events()`; an error after the first byte becomes an error event.

    Starlette cancels the iterator when the client disconnects; `gen.close()` in the
    `finally` then aborts the engine requests right away.
    """

    async def body() -> AsyncIterator[bytes]:
        error = ""
        try:
            async for chunk in events():
                yield chunk
            yield DONE
        except APIError as e:
            error = e.message
            yield sse_error(e).encode()
        finally:
            gen.close(error)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def with_disconnect_abort(request: Request, gen: Generation, work: Awaitable[Response]) -> Response:
    """Run a non-streaming request, aborting it as soon as its client goes away."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            try:
                return task.result()
            except APIError as e:
                gen.close(e.message)
                return error_response(e)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    finally:
        listener.cancel()
        gen.close()
