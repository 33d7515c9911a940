"""A request-body limit that counts the bytes actually received.

A ``Content-Length`` check alone lets a chunked body (no length header) through whole,
and it trusts a header. This ASGI middleware wraps ``receive()``: it refuses a declared
length over the limit before reading anything, and counts every chunk as it arrives, so
the request fails with 413 the moment the limit is crossed, however it is framed. The
server reads a body only as fast as the route consumes it (uvicorn pauses the socket
past 64 KB), so a request never holds more than the limit in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised inside ``receive()``: FastAPI passes HTTPExceptions on as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, message(limit))


def message(limit: int) -> str:
    return (
        f"request body over {limit / 2**20:g} MB (api.max_body_mb); send less data, e.g. a "
        "shorter calibration block"
    )


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int | Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes  # or a callable: the limit read at each request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = int(self.max_bytes() if callable(self.max_bytes) else self.max_bytes)
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    await _reply_413(send, limit)
                    return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return msg

        async def watch(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, watch)
        except BodyTooLarge:
            if started:
                raise
            await _reply_413(send, limit)


async def _reply_413(send: Send, limit: int) -> None:
    body = json.dumps({"detail": message(limit), "errors": []}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
