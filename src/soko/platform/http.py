"""HTTP plumbing shared by every route: request context, limits and security headers.

The middlewares here are plain ASGI callables (no ``BaseHTTPMiddleware``) so they add
little latency and never buffer a streaming body.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

import structlog
from sqlalchemy.exc import DBAPIError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from soko.platform.db import database_complaint, database_unavailable, statement_cancelled
from soko.platform.errors import (
    BadRequest,
    DatabaseTimeout,
    NotAcceptable,
    PayloadTooLarge,
    ProblemError,
    ServiceUnavailable,
    ValidationFailed,
    problem_body,
    problem_response,
)
from soko.platform.ids import uuid7

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_NAME = REQUEST_ID_HEADER.encode()
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# The operational endpoints: never rate limited, traced or kept waiting for a turn.
OPERATIONAL_PATHS = frozenset({"/health", "/ready", "/metrics"})

log = structlog.get_logger("soko.http")


# A statement naming a table or column the database does not have: it was not migrated
# to this version (PostgreSQL's undefined table and column; SQLite's messages).
_SCHEMA_SQLSTATES = frozenset({"42P01", "42703"})
_SQLITE_SCHEMA_MESSAGES = ("no such table", "no such column")


def schema_behind(exc: BaseException) -> str | None:
    """The database's first line of complaint when ``exc`` says the schema is behind
    the code (never the statement or its parameters); None for any other error."""
    if not isinstance(exc, DBAPIError) or exc.orig is None:
        return None
    first = database_complaint(exc)
    if getattr(exc.orig, "sqlstate", None) in _SCHEMA_SQLSTATES:
        return first
    if first.startswith(_SQLITE_SCHEMA_MESSAGES):
        return first
    return None


def problem_message(
    problem: type[ProblemError],
    detail: str,
    path: str,
    request_id: str,
    status: int | None = None,
    extensions: dict[str, Any] | None = None,
) -> tuple[Message, Message]:
    """The start and body messages of a problem answered from a middleware, outside
    the routes' exception handlers."""
    import json

    body = json.dumps(
        problem_body(
            problem,
            detail=detail,
            status=status,
            instance=path,
            request_id=request_id,
            extensions=extensions,
        )
    ).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status or problem.status,
        "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (_REQUEST_ID_NAME, request_id.encode()),
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
        id_header = (_REQUEST_ID_NAME, request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # The id replaces any the app set; one pass over the raw headers.
                message["headers"] = [
                    *(
                        pair
                        for pair in message.get("headers", ())
                        if pair[0].lower() != _REQUEST_ID_NAME
                    ),
                    id_header,
                ]
            await send(message)

        began = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            behind = schema_behind(exc)
            cancelled = None if behind else statement_cancelled(exc)
            unavailable = None if behind or cancelled else database_unavailable(exc)
            if cancelled:
                # A slow statement (or one an operator cancelled), not a bug to trace
                # nor an outage: the path says which request to look at.
                log.error(
                    "database statement cancelled",
                    error=cancelled,
                    path=scope.get("path", ""),
                    duration_ms=round((time.perf_counter() - began) * 1000, 2),
                )
            elif behind:
                # Not a bug to trace: the database was not migrated to this version.
                log.error(
                    "database schema not ready: run `soko migrate upgrade`",
                    error=behind,
                    path=scope.get("path", ""),
                )
            elif unavailable:
                # Nor is an outage: /ready and the database's own logs tell its story.
                log.warning("database unavailable", error=unavailable, path=scope.get("path", ""))
            else:
                log.exception(
                    "unhandled_error", duration_ms=round((time.perf_counter() - began) * 1000, 2)
                )
            if scope["type"] != "http" or started:
                raise
            if cancelled:
                start, body = problem_message(
                    DatabaseTimeout,
                    "The database took too long to do this request's work.",
                    scope.get("path", ""),
                    request_id,
                )
            elif behind or unavailable:
                detail, retry_after = (
                    ("The service is being updated; retry in a minute.", b"60")
                    if behind
                    else ("The database is unavailable; retry in a few seconds.", b"5")
                )
                start, body = problem_message(
                    ServiceUnavailable, detail, scope.get("path", ""), request_id
                )
                start["headers"].append((b"retry-after", retry_after))
            else:
                start, body = problem_message(
                    ProblemError,
                    "An unexpected error occurred; quote the request id when reporting it.",
                    scope.get("path", ""),
                    request_id,
                )
            await send(start)
            await send(body)
        finally:
            structlog.contextvars.clear_contextvars()


# Paths whose routes read their body raw and take it whole (a payment provider's signed
# webhook): the NUL check of InputGuardMiddleware leaves those bodies to the route.
_RAW_BODY_PREFIXES: list[str] = []


def register_raw_body_prefix(prefix: str) -> None:
    """Leave the bodies of requests under ``prefix`` (which ends with "/") unscanned for
    the NUL character: their routes verify a signature on the bytes as sent."""
    if not prefix.endswith("/"):
        raise ValueError("a raw body prefix ends with '/'")
    if prefix not in _RAW_BODY_PREFIXES:
        _RAW_BODY_PREFIXES.append(prefix)


# Paths a machine calls back (a provider's delivery report): never refused for their
# Accept header, which the sender chose, not a client Soko can tell to fix it.
_CALLBACK_PREFIXES: list[str] = []


def register_callback_prefix(prefix: str) -> None:
    """Serve requests under ``prefix`` (which ends with "/") whatever their ``Accept``;
    raw body prefixes (:func:`register_raw_body_prefix`) are served so too."""
    if not prefix.endswith("/"):
        raise ValueError("a callback prefix ends with '/'")
    if prefix not in _CALLBACK_PREFIXES:
        _CALLBACK_PREFIXES.append(prefix)


_JSON_NUL = b"\\u0000"
_BACKSLASH = 0x5C


class _JsonNulScanner:
    """Finds the escape ``\\u0000`` in a JSON body fed in chunks of any size.

    Raw control characters are not valid inside a JSON string, so an escape is the only
    way a NUL reaches a parsed value. It is one when an odd number of backslashes runs
    up to the ``u`` (``\\\\u0000`` is an escaped backslash, then the text ``u0000``). Between
    chunks it keeps the last five bytes (an escape cut in two) and the parity of the
    backslashes before them, so memory stays constant whatever the body."""

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, chunk: bytes) -> bool:
        data = self._carry + chunk if self._carry else chunk
        at = data.find(_JSON_NUL)
        while at != -1:
            run = 1
            while at - run >= 0 and data[at - run] == _BACKSLASH:
                run += 1
            if run % 2 == 1:
                return True
            at = data.find(_JSON_NUL, at + 1)
        tail = max(0, len(data) - 5)
        start = tail
        while start > 0 and data[start - 1] == _BACKSLASH:
            start -= 1
        self._carry = b"\\" * ((tail - start) % 2) + data[tail:]
        return False


class _FormNulScanner:
    """Finds ``%00`` in a form-encoded body fed in chunks of any size."""

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, chunk: bytes) -> bool:
        data = self._carry + chunk
        self._carry = data[-2:]
        return b"%00" in data


def _body_scanner(path: str, media_type: bytes) -> _JsonNulScanner | _FormNulScanner | None:
    """The scanner for a body of ``media_type`` (its ``Content-Type`` without
    parameters, lower-case): JSON (also what FastAPI assumes when no type is given) or a
    form; other bodies are not parsed into text fields."""
    if any(path.startswith(prefix) for prefix in _RAW_BODY_PREFIXES):
        return None
    if not media_type or media_type == b"application/json" or media_type.endswith(b"+json"):
        return _JsonNulScanner()
    if media_type == b"application/x-www-form-urlencoded":
        return _FormNulScanner()
    return None


# What an API answer can be: JSON, or a problem (RFC 9457) in JSON.
_JSON_RANGES = frozenset(
    {b"*/*", b"application/*", b"application/json", b"application/problem+json"}
)


# What nearly every client sends (curl, HTTP libraries, fetch): no parsing needed.
_COMMON_JSON_ACCEPTS = frozenset({b"*/*", b"application/json", b"application/problem+json"})


def accepts_json(accept: bytes) -> bool:
    """Whether an ``Accept`` header's value (RFC 9110 section 12.5.1; several headers
    joined with commas) admits ``application/json`` or ``application/problem+json``: a
    range that matches them with a weight above zero. An empty value says nothing and
    admits them. An unreadable weight counts as 1, so a client is refused only for what
    it clearly said."""
    if accept in _COMMON_JSON_ACCEPTS or not accept.strip():
        return True
    for item in accept.split(b","):
        media_range, _, parameters = item.partition(b";")
        if media_range.strip().lower() not in _JSON_RANGES:
            continue
        weight = 1.0
        for parameter in parameters.split(b";"):
            name, _, value = parameter.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = 1.0
        if weight > 0:
            return True
    return False


def _repeated_parameter(scope: Scope) -> str | None:
    """The first query parameter named twice (``?q=a&q=b``), or None. No API parameter
    takes several values: one of them would be used and the others silently dropped."""
    query: bytes = scope.get("query_string", b"")
    if b"&" not in query:
        return None  # one parameter at most: the common case, with no parsing
    seen: set[str] = set()
    for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            return name
        seen.add(name)
    return None


def _input_errors(where: str, detail: str, code: str, *, field: str = "") -> dict[str, Any]:
    """The ``errors`` of a problem the input guard answers: one error, with no pointer
    (the guard reads no JSON document)."""
    return {
        "errors": [{"in": where, "field": field, "pointer": None, "detail": detail, "code": code}]
    }


def _nul_problem(where: str) -> tuple[str, dict[str, Any]]:
    detail = f"The request's {where} holds the NUL character (U+0000), which no field accepts."
    return detail, _input_errors(where, detail, "nul_character")


class InputGuardMiddleware:
    """Checks what every route receives before any of it is parsed.

    - A request under ``json_prefix`` (the API) whose ``Accept`` admits no JSON answer is
      refused with 406 ``not-acceptable`` (see :func:`accepts_json`), before the route
      runs, so nothing is changed for an answer the client would not read. A provider's
      callbacks (:func:`register_callback_prefix`, :func:`register_raw_body_prefix`)
      are served whatever their sender accepts, and a CORS preflight is never refused.
    - A body over ``max_bytes`` is refused with 413, by its declared length or by
      counting what arrives.
    - The NUL character (U+0000) in the path, the query or a JSON or form body is refused
      with 422 ``validation-error``. No field of Soko takes it, PostgreSQL's text cannot
      hold it (the statement would fail, a 500 where the client erred), and SQLite would
      store it where other tools cut the text short. The body is checked as it streams
      in, without buffering it; routes that verify a signature on their raw body
      (:func:`register_raw_body_prefix`) get it unchecked.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, json_prefix: str = "/api/") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.json_prefix = json_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id", "")
        if "\x00" in scope.get("path", ""):
            await self._refuse_nul(scope, send, request_id, "path")
            return
        if b"%00" in scope.get("query_string", b""):
            await self._refuse_nul(scope, send, request_id, "query")
            return
        repeated = _repeated_parameter(scope)  # None at once for a query without "&"
        if repeated is not None and self._answers_json(scope):
            await self._refuse_repeated(scope, send, request_id, repeated)
            return
        media_type = b""
        accept: list[bytes] = []
        for name, value in scope.get("headers", ()):
            if name == b"accept":
                accept.append(value)
            elif name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(scope, send, request_id)
                    return
            elif name == b"content-type":
                media_type = value.split(b";", 1)[0].strip().lower()
        if accept and not accepts_json(b",".join(accept)) and self._answers_json(scope):
            await self._refuse_accept(scope, send, request_id)
            return

        received = 0
        response_started = False
        refusal: str | None = None  # "size" or "nul", once the body was refused
        scanner = (
            _body_scanner(scope.get("path", ""), media_type)
            if scope.get("method") not in ("GET", "HEAD")
            else None
        )

        async def guarded_receive() -> Message:
            nonlocal received, refusal
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_bytes:
                    refusal = "size"
                    raise _BodyTooLarge(self.max_bytes)
                if scanner is not None and chunk and scanner.feed(chunk):
                    refusal = "nul"
                    raise _NulInBody()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refusal is not None and not response_started:
                return  # whatever the route made of the refusal: the guard answers it
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except (_BodyTooLarge, _NulInBody):
            if response_started:
                raise
        if refusal is None or response_started:
            return
        if refusal == "size":
            await self._refuse(scope, send, request_id)
        else:
            await self._refuse_nul(scope, send, request_id, "body")

    def _answers_json(self, scope: Scope) -> bool:
        path: str = scope.get("path", "")
        return (
            path.startswith(self.json_prefix)
            and scope.get("method") != "OPTIONS"
            and not any(path.startswith(prefix) for prefix in _RAW_BODY_PREFIXES)
            and not any(path.startswith(prefix) for prefix in _CALLBACK_PREFIXES)
        )

    async def _refuse_repeated(self, scope: Scope, send: Send, request_id: str, name: str) -> None:
        detail = f"The query parameter {name[:100]!r} is given more than once; give it once."
        errors = _input_errors("query", detail, "repeated_parameter", field=name[:100])
        await self._answer(scope, send, request_id, ValidationFailed, detail, errors)

    async def _refuse_accept(self, scope: Scope, send: Send, request_id: str) -> None:
        detail = (
            "This API answers application/json, and problems as application/problem+json; "
            "the request's Accept header admits neither."
        )
        await self._answer(scope, send, request_id, NotAcceptable, detail)

    async def _refuse(self, scope: Scope, send: Send, request_id: str) -> None:
        detail = f"The request body is larger than {self.max_bytes} bytes."
        await self._answer(scope, send, request_id, PayloadTooLarge, detail)

    async def _refuse_nul(self, scope: Scope, send: Send, request_id: str, where: str) -> None:
        detail, extensions = _nul_problem(where)
        await self._answer(scope, send, request_id, ValidationFailed, detail, extensions)

    async def _answer(
        self,
        scope: Scope,
        send: Send,
        request_id: str,
        problem: type[ProblemError],
        detail: str,
        extensions: dict[str, Any] | None = None,
    ) -> None:
        """Answer ``problem`` in place of the route (the path shown with any NUL escaped)."""
        start, body = problem_message(
            problem,
            detail,
            scope.get("path", "").replace("\x00", "%00"),
            request_id,
            extensions=extensions,
        )
        await send(start)
        await send(body)


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException on purpose: FastAPI turns any other exception raised while it
    # reads a body into "400 There was an error parsing the body", but re-raises
    # HTTPExceptions, which the problem handlers then answer as a 413 problem.
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"The request body is larger than {max_bytes} bytes.")


class _NulInBody(StarletteHTTPException):
    # An HTTPException for the same reason as _BodyTooLarge. The guard answers either
    # itself, with the full problem, whatever the route made of it.
    def __init__(self) -> None:
        super().__init__(422, _nul_problem("body")[0])


API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"


def _encoded(headers: Iterable[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers)


# Every answer's security headers but HSTS, which depends on the settings.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("permissions-policy", "camera=(), microphone=(), geolocation=(), payment=()"),
    ("cache-control", "no-store"),
    ("content-security-policy", API_CSP),
)


class SecurityHeadersMiddleware:
    """Sets conservative security headers on every response that does not set its own."""

    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        hsts_header = ("strict-transport-security", "max-age=63072000; includeSubDomains")
        # Encoded once, as the raw headers carry them. A page that loads anything (the
        # interactive reference) sets a CSP of its own.
        self.defaults = _encoded([*SECURITY_HEADERS, *([hsts_header] if hsts else [])])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        defaults = self.defaults

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # One pass over the raw headers: each default the app did not set is
                # added, as encoded bytes.
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [pair for pair in defaults if pair[0] not in present]
                message["headers"] = headers
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


def client_network(address: str) -> str:
    """What limits count a client address as: an IPv4 address itself; an IPv6 address
    by its /64 (``2001:db8:1:2::/64``), the block one subscriber usually holds, so
    rotating through it gains nothing; an IPv4-mapped IPv6 address as its IPv4."""
    if ":" not in address:
        return address  # IPv4 (or "unknown"): the common case, with no parsing
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    mapped = parsed.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((parsed, 64), strict=False))


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


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling, with a refused preflight answered as a problem like
    every other refusal (Starlette answers it in plain text)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        refused = bytes(answer.body).decode("latin-1").removeprefix("Disallowed CORS ")
        headers = {
            name: value
            for name, value in answer.headers.items()
            if name.lower() not in ("content-length", "content-type")
        }
        return problem_response(
            BadRequest,
            detail=f"This cross-origin request is not allowed: its {refused} may not be used.",
            headers=headers,
            extensions={"refused": refused.split(", ")},
        )


class HeadMiddleware:
    """Answers ``HEAD`` wherever ``GET`` is answered, as RFC 9110 (section 9.3.2) asks of
    every general-purpose server: the request runs as a ``GET`` and its answer is sent
    with the same status and headers (``Content-Length``, ``ETag``) and no body.

    FastAPI's routes accept only the methods they declare, so ``HEAD /health`` was a 405.
    The metrics and logs outside this middleware still see ``HEAD``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_without_body)
