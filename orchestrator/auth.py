"""Bearer-token auth and request-size limits as plain ASGI middleware.

Middleware rather than per-route dependencies, so that /docs and /openapi.json
are covered too; only the health probe is open.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz"})


async def _reply(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class TokenAuth:
    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if not hmac.compare_digest(given, self.expected):
            detail = (
                "missing Authorization header: send 'Authorization: Bearer <token>'"
                if not given
                else "invalid API token"
            )
            await _reply(send, 401, detail, [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over `limit` bytes, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _reply(send, 413, self._message(int(value)), [])
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self._message(seen))
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge as exc:
            await _reply(send, 413, str(exc), [])

    def _message(self, size: int) -> str:
        return (
            f"request body of {size} bytes exceeds the limit of {self.limit} bytes "
            "(FLOWMESH_MAX_BODY_BYTES)"
        )


class BodyTooLarge(Exception):
    pass
