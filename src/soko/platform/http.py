"""HTTP plumbing shared by every route: request context, limits and security headers.

The middlewares here are plain ASGI callables (no ``BaseHTTPMiddleware``) so they add
little latency and never buffer a streaming body.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import structlog
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from soko.platform.errors import PayloadTooLarge, ProblemError, problem_body
from soko.platform.ids import uuid7

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

log = structlog.get_logger("soko.http")


def _problem_message(
    problem: type[ProblemError], detail: str, path: str, request_id: str, status: int | None = None
) -> tuple[Message, Message]:
    import json

    body = json.dumps(
        problem_body(problem, detail=detail, status=status, instance=path, request_id=request_id)
    ).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status or problem.status,
        "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (REQUEST_ID_HEADER.encode(), request_id.encode()),
            # The 500 is sent from outside SecurityHeadersMiddleware, so it brings its own.
            (b"x-content-type-options", b"nosniff"),
            (b"cache-control", b"no-store"),
            (b"content-security-policy", API_CSP.encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


# Paths whose next segment is a capability (a token that grants what it names, such as
# the sandbox provider's payment page): logs show the prefix and "***", never the token.
_SECRET_PATH_PREFIXES: list[str] = []


def register_secret_path_prefix(prefix: str) -> None:
    """Keep the path segment after ``prefix`` (which ends with "/") out of the logs."""
    if not prefix.endswith("/"):
        raise ValueError("a secret path prefix ends with '/'")
    if prefix not in _SECRET_PATH_PREFIXES:
        _SECRET_PATH_PREFIXES.append(prefix)


def loggable_path(path: str) -> str:
    for prefix in _SECRET_PATH_PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            _token, slash, tail = rest.partition("/")
            return f"{prefix}***{slash}{tail}"
    return path


class RequestContextMiddleware:
    """Gives each request an id, binds it to every log line, and turns an unhandled
    exception into a 500 problem that carries the id but never the traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _VALID_REQUEST_ID.match(candidate):
                    request_id = candidate
                break
        if not request_id:
            request_id = uuid7().hex
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            request_id=request_id,
            method=scope.get("method"),
            path=loggable_path(scope.get("path", "")),
        )
        started = False
        encoded_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = encoded_id.decode()
            await send(message)

        began = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled_error", duration_ms=round((time.perf_counter() - began) * 1000, 2)
            )
            if scope["type"] != "http" or started:
                raise
            start, body = _problem_message(
                ProblemError,
                "An unexpected error occurred; quote the request id when reporting it.",
                scope.get("path", ""),
                request_id,
            )
            await send(start)
            await send(body)
        finally:
            structlog.contextvars.clear_contextvars()


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, by header or by counting."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id", "")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(scope, send, request_id)
                    return
                break

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if response_started:
                raise
            await self._refuse(scope, send, request_id)

    async def _refuse(self, scope: Scope, send: Send, request_id: str) -> None:
        start, body = _problem_message(
            PayloadTooLarge,
            f"The request body is larger than {self.max_bytes} bytes.",
            scope.get("path", ""),
            request_id,
        )
        await send(start)
        await send(body)


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException on purpose: FastAPI turns any other exception raised while it
    # reads a body into "400 There was an error parsing the body", but re-raises
    # HTTPExceptions, which the problem handlers then answer as a 413 problem.
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"The request body is larger than {max_bytes} bytes.")


API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "img-src 'self' data: https://fastapi.tiangolo.com; frame-ancestors 'none'"
)


class SecurityHeadersMiddleware:
    """Sets conservative security headers on every response that does not set its own."""

    def __init__(self, app: ASGIApp, *, hsts: bool, html_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.html_paths = tuple(html_paths)
        self.base: list[tuple[str, str]] = [
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "no-referrer"),
            ("cross-origin-opener-policy", "same-origin"),
            ("cross-origin-resource-policy", "same-origin"),
            ("permissions-policy", "camera=(), microphone=(), geolocation=(), payment=()"),
        ]
        if hsts:
            self.base.append(("strict-transport-security", "max-age=63072000; includeSubDomains"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        csp = DOCS_CSP if path.startswith(self.html_paths) else API_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.base:
                    if name not in headers:
                        headers[name] = value
                if "content-security-policy" not in headers:
                    headers["content-security-policy"] = csp
                if "cache-control" not in headers:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def client_ip(scope: Scope, trusted_proxies: Iterable[str] = ()) -> str:
    """The caller's address; ``X-Forwarded-For`` is believed only from a trusted proxy."""
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    trusted = set(trusted_proxies)
    if peer not in trusted:
        return peer
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            forwarded: str = value.decode("latin-1")
            hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
            # Walk from the nearest hop back, skipping our own proxies.
            for hop in reversed(hops):
                if hop not in trusted:
                    return hop
    return peer


def route_template(scope: Scope) -> str:
    """The matched route's full path template (``/api/v1/orders/{id}``), never the raw path."""
    fastapi_scope = scope.get("fastapi")
    if isinstance(fastapi_scope, dict):
        # FastAPI keeps an included router's prefix out of ``route.path``; the effective
        # route context has the whole template.
        path = getattr(fastapi_scope.get("effective_route_context"), "path_format", None)
        if isinstance(path, str):
            return path
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "<unmatched>"
