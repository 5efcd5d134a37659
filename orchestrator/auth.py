"""Bearer-token auth, request-size limits and the access log as plain ASGI middleware.

Middleware rather than per-route dependencies, so that /docs, its assets and
/openapi.json are covered too; only the health probe is open.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from urllib.parse import parse_qsl, quote, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz"})

# Where TokenAuth notes, for the access log, why it refused a request.
AUTH_REFUSED = "flowmesh.auth_refused"

access_log = logging.getLogger("orchestrator.access")


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


# Where artifacts are uploaded and served (orchestrator/results.py). The workers' own token
# (FLOWMESH_WORKER_TOKEN) is good here and nowhere else; an upload (any POST here) takes it
# and nothing else, so a leaked worker token cannot submit or cancel tasks, and a user's
# token cannot plant files in a task's results.
RESULTS_PREFIX = "/api/v1/results/"
WORKER_METHODS = frozenset({"GET", "HEAD", "POST"})


def is_results_path(path: str) -> bool:
    return path.startswith(RESULTS_PREFIX) and ".." not in path.split("/")


def is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and is_results_path(scope["path"])


def _matches(given: bytes, expected: bytes | None) -> bool:
    return bool(given) and expected is not None and hmac.compare_digest(given, expected)


class TokenAuth:
    """Two bearer credentials: the users' API token (everything but uploads) and the
    workers' token (the results routes only, uploads included). Without an API token the
    API is open (loopback only), but uploads still need the worker token."""

    def __init__(self, app: ASGIApp, token: str | None, worker_token: str | None = None):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.worker = f"Bearer {worker_token}".encode() if worker_token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        refusal = self._refusal(scope, given)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, detail, why = refusal
        scope[AUTH_REFUSED] = why
        headers = [(b"www-authenticate", b"Bearer")] if status == 401 else []
        if is_upload(scope):  # see orchestrator.results._closing: the body is not read
            headers.append((b"connection", b"close"))
        await _reply(send, status, detail, headers)

    def _refusal(self, scope: Scope, given: bytes) -> tuple[int, str, str] | None:
        """None to let the request through, else (status, detail, why for the access log)."""
        worker = _matches(given, self.worker)
        user = _matches(given, self.expected)
        if is_upload(scope):
            if self.worker is None:
                return (
                    403,
                    "uploads are disabled: the orchestrator has no worker credential; set "
                    "FLOWMESH_WORKER_TOKEN on the orchestrator and its workers",
                    "upload with no FLOWMESH_WORKER_TOKEN configured",
                )
            if worker:
                return None
            if user:
                return (
                    403,
                    "uploads take the worker credential (FLOWMESH_WORKER_TOKEN), not the API token",
                    "upload with the API token",
                )
            if not given:
                return (
                    401,
                    "missing Authorization header: uploads take "
                    "'Authorization: Bearer <FLOWMESH_WORKER_TOKEN>'",
                    "upload without an Authorization header",
                )
            return 401, "invalid worker token (FLOWMESH_WORKER_TOKEN)", "upload, wrong token"
        if worker:
            if is_results_path(scope["path"]) and scope["method"] in WORKER_METHODS:
                return None
            return (
                403,
                f"the worker credential (FLOWMESH_WORKER_TOKEN) is accepted only on "
                f"{RESULTS_PREFIX} routes",
                "worker token outside the results routes",
            )
        if self.expected is None or user:
            return None
        return self._unauthenticated(given)

    @staticmethod
    def _unauthenticated(given: bytes) -> tuple[int, str, str]:
        if not given:
            return (
                401,
                "missing Authorization header: send 'Authorization: Bearer <token>'",
                "no Authorization header",
            )
        return 401, "invalid API token", "wrong API token"


class BodyLimit:
    """Refuse bodies over `limit` bytes, by Content-Length or while streaming. Uploads are
    exempt: their route streams them to disk under FLOWMESH_MAX_UPLOAD_BYTES instead."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_upload(scope):
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


# The API's own query parameters: their values are logged. Any other value is replaced by
# ***: the API takes no secret in the query string, but a client may send one anyway, under
# any name (`?bearer=`, `?jwt=`, a bare `?<token>`).
LOGGED_PARAMS = frozenset({"status", "type", "limit", "cursor", "order", "wait", "name", "attempt"})
MAX_TARGET = 500


def _target(scope: Scope) -> str:
    """The request's path and query for a log line: escaped (no control characters or
    spaces), query parameters other than the API's own replaced by *=***, cut at MAX_TARGET
    characters."""
    target = quote(scope["path"], safe="/:@!$&'()*+,;=~-._")
    raw = scope.get("query_string", b"")
    if raw:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
        clean = [
            (k if k in LOGGED_PARAMS else "*", v if k in LOGGED_PARAMS else "***") for k, v in pairs
        ]
        target += "?" + urlencode(clean, safe="/:,*")
    return target if len(target) <= MAX_TARGET else target[: MAX_TARGET - 1] + "…"


class AccessLog:
    """One line per HTTP request on the `orchestrator.access` logger: method, path and query
    (secret-looking values masked), status, duration, client address. 401/403 at WARNING
    with why (never the token or any header), 5xx at ERROR, successful health probes at
    DEBUG, the rest at INFO. Outermost, so it sees the replies of TokenAuth and BodyLimit."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # An exception before the reply started becomes Starlette's 500.
            self._log(scope, status or 500, (time.perf_counter() - started) * 1000)

    @staticmethod
    def _log(scope: Scope, status: int, ms: float) -> None:
        client = scope.get("client")
        address = f"{client[0]}:{client[1]}" if client else "-"
        refused = scope.get(AUTH_REFUSED)
        if status in (401, 403):
            level = logging.WARNING
        elif status >= 500:
            level = logging.ERROR
        elif scope["path"] in OPEN_PATHS and status < 400:
            level = logging.DEBUG
        else:
            level = logging.INFO
        access_log.log(
            level,
            "%s %s %d %.1fms client=%s%s",
            scope["method"],
            _target(scope),
            status,
            ms,
            address,
            f" refused: {refused}" if refused else "",
        )
