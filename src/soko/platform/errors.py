"""RFC 9457 problem details: the one shape of every error Soko answers.

A problem type is a subclass of :class:`ProblemError` with a ``slug`` (its ``type`` is
``/problems/<slug>``), a ``title`` and a ``status``. Every subclass is registered, and
``docs/problems.md`` must list every registered slug (a test checks it). Domains declare
their own subclasses in their ``errors.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

PROBLEM_MEDIA_TYPE = "application/problem+json"

REGISTRY: dict[str, type[ProblemError]] = {}

_log = structlog.get_logger("soko.http")


class ProblemError(Exception):
    """An error the client can act on, answered as ``application/problem+json``."""

    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal server error"
    status: ClassVar[int] = 500
    description: ClassVar[str] = "Something failed on the server; the request id identifies it."

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        self.detail = detail or self.title
        self.headers = dict(headers or {})
        self.extensions = extensions
        super().__init__(self.detail)

    #: When true, the request's transaction commits even though this error is answered:
    #: for refusals that must leave a trace (a failed sign-in counted, a reused refresh
    #: token's session revoked). Set it with :meth:`keeping_changes`.
    commit_changes: bool = False

    def keeping_changes(self) -> ProblemError:
        """Mark this error so the request's writes so far are committed, not rolled back."""
        self.commit_changes = True
        return self

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "slug" in cls.__dict__:
            existing = REGISTRY.get(cls.slug)
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise TypeError(f"problem slug {cls.slug!r} is declared twice")
            REGISTRY[cls.slug] = cls

    @classmethod
    def type_uri(cls) -> str:
        return f"/problems/{cls.slug}"


REGISTRY[ProblemError.slug] = ProblemError


class BadRequest(ProblemError):
    slug = "bad-request"
    title = "Bad request"
    status = 400
    description = "The request is malformed: fix it before sending it again."


class ValidationFailed(ProblemError):
    slug = "validation-error"
    title = "The request is not valid"
    status = 422
    description = (
        "One or more fields are missing or wrong; `errors` lists each with its location "
        "and message."
    )

    @classmethod
    def of_field(cls, field: str, message: str, *, location: str = "body") -> ValidationFailed:
        """The problem for one field that passed the schema but broke a rule of the
        service (an unparseable phone number, a permission the caller lacks)."""
        return cls(
            f"{field} {message}",
            errors=[
                {
                    "in": location,
                    "field": field,
                    "pointer": json_pointer(field.split(".") if field else [])
                    if location == "body"
                    else None,
                    "detail": message,
                    "code": "value_error",
                }
            ],
        )


class Unauthorized(ProblemError):
    slug = "unauthorized"
    title = "Authentication required"
    status = 401
    description = "No valid credentials were sent."


class Forbidden(ProblemError):
    slug = "forbidden"
    title = "Forbidden"
    status = 403
    description = "The caller is known but may not do this."


class NotFound(ProblemError):
    slug = "not-found"
    title = "Not found"
    status = 404
    description = (
        "Nothing is at this address, or it exists but is not yours: the two are answered alike."
    )


class MethodNotAllowed(ProblemError):
    slug = "method-not-allowed"
    title = "Method not allowed"
    status = 405
    description = "The resource exists but does not accept this method; see `Allow`."


class NotAcceptable(ProblemError):
    slug = "not-acceptable"
    title = "Not acceptable"
    status = 406
    description = "The server cannot answer in a media type the client accepts."


class Conflict(ProblemError):
    slug = "conflict"
    title = "Conflict with the current state"
    status = 409
    description = "The resource's current state does not allow this change."


class PreconditionFailed(ProblemError):
    slug = "precondition-failed"
    title = "Precondition failed"
    status = 412
    description = "`If-Match` names a version that is no longer current: fetch and retry."


class RequestTimeout(ProblemError):
    slug = "request-timeout"
    title = "Request timeout"
    status = 408
    description = "The request's head did not arrive in time (10 seconds)."


class PayloadTooLarge(ProblemError):
    slug = "payload-too-large"
    title = "Request body too large"
    status = 413
    description = "The request body exceeds the configured limit."


class UriTooLong(ProblemError):
    slug = "uri-too-long"
    title = "URI too long"
    status = 414
    description = "The request's URL is longer than the server accepts (8 KiB)."


class UnsupportedMediaType(ProblemError):
    slug = "unsupported-media-type"
    title = "Unsupported media type"
    status = 415
    description = "The body's media type is not one this endpoint reads."


class PreconditionRequired(ProblemError):
    slug = "precondition-required"
    title = "Precondition required"
    status = 428
    description = "This write needs an `If-Match` header naming the version it changes."


class RateLimited(ProblemError):
    slug = "rate-limited"
    title = "Too many requests"
    status = 429
    description = "A rate limit was reached; `Retry-After` says when to try again."


class RequestHeaderFieldsTooLarge(ProblemError):
    slug = "request-header-fields-too-large"
    title = "Request header fields too large"
    status = 431
    description = "The request's header fields are larger than the server accepts (64 KiB)."


class InvalidCursor(ProblemError):
    slug = "invalid-cursor"
    title = "Invalid pagination cursor"
    status = 400
    description = "The `cursor` was not issued by this server for this list, or was altered."


class UnknownField(ProblemError):
    slug = "unknown-field"
    title = "Unknown field"
    status = 400
    description = "`fields=` names a field this resource does not have."


class ServiceUnavailable(ProblemError):
    slug = "service-unavailable"
    title = "Service unavailable"
    status = 503
    description = "A dependency is down or the server is shutting down; retry later."


class DatabaseTimeout(ProblemError):
    slug = "database-timeout"
    title = "The database took too long"
    status = 503
    description = (
        "A statement of this request ran past the database's statement timeout and was"
        " cancelled; nothing it would have written was kept."
    )


_STATUS_PROBLEMS: dict[int, type[ProblemError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    406: NotAcceptable,
    408: RequestTimeout,
    409: Conflict,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    414: UriTooLong,
    415: UnsupportedMediaType,
    422: ValidationFailed,
    428: PreconditionRequired,
    429: RateLimited,
    431: RequestHeaderFieldsTooLarge,
    503: ServiceUnavailable,
}


def problem_for_status(status: int) -> type[ProblemError]:
    return _STATUS_PROBLEMS.get(status, ProblemError)


def problem_body(
    problem: type[ProblemError],
    *,
    detail: str,
    status: int | None = None,
    instance: str | None = None,
    request_id: str | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem.type_uri(),
        "title": problem.title,
        "status": status or problem.status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if request_id:
        body["request_id"] = request_id
    for key, value in (extensions or {}).items():
        if key not in body:
            body[key] = value
    return body


def problem_response(
    problem: type[ProblemError],
    *,
    detail: str,
    status: int | None = None,
    instance: str | None = None,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> JSONResponse:
    body = problem_body(
        problem,
        detail=detail,
        status=status,
        instance=instance,
        request_id=request_id,
        extensions=extensions,
    )
    return JSONResponse(
        body,
        status_code=body["status"],
        headers=dict(headers or {}),
        media_type=PROBLEM_MEDIA_TYPE,
    )


def _request_id(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def json_pointer(path: Sequence[str]) -> str:
    """The JSON Pointer (RFC 6901) to the member at ``path``, in its URI fragment form:
    ``#`` for the whole document, each name escaped (``~0``, ``~1``, then percent-encoded),
    so ``["options", "size/fit"]`` is ``#/options/size~1fit``."""
    return "#" + "".join(
        "/" + quote(part.replace("~", "~0").replace("/", "~1"), safe="!$&'()*+,;=:@")
        for part in path
    )


def field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI validation errors as ``{"in", "field", "pointer", "detail"}``."""
    shaped = []
    for error in errors:
        if error.get("type") == "json_invalid":
            # Its location is the character where parsing stopped, not a field: the
            # whole document is what failed (the empty JSON pointer).
            shaped.append(_json_invalid(error))
            continue
        loc = [str(part) for part in error.get("loc", ())]
        where = (
            loc[0] if loc and loc[0] in {"body", "query", "path", "header", "cookie"} else "body"
        )
        path = loc[1:] if loc and loc[0] == where else loc
        shaped.append(
            {
                "in": where,
                "field": ".".join(path),
                "pointer": json_pointer(path) if where == "body" else None,
                "detail": error.get("msg", "invalid"),
                "code": error.get("type", "invalid"),
            }
        )
    return shaped


def _json_invalid(error: Mapping[str, Any]) -> dict[str, Any]:
    loc = error.get("loc", ())
    reason = str((error.get("ctx") or {}).get("error") or "not valid JSON")
    at = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    return _json_invalid_entry(reason + (f" (at character {at})" if at is not None else ""))


def _json_invalid_entry(reason: str) -> dict[str, Any]:
    """The one ``errors`` entry of a body that is not JSON: the whole document failed."""
    return {
        "in": "body",
        "field": "",
        "pointer": "#",
        "detail": f"The body is not valid JSON: {reason}",
        "code": "json_invalid",
    }


def _reads_as_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this media type as JSON: ``application/json`` or
    ``application/*+json``. A body without ``Content-Type`` is not parsed (FastAPI's
    strict content type, which keeps a cross-site form from posting JSON)."""
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media_type.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def _handle_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem_response(
        type(exc),
        detail=exc.detail,
        instance=request.url.path,
        request_id=_request_id(request),
        headers=exc.headers,
        extensions=exc.extensions,
    )


async def _handle_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    raw = exc.errors()
    content_type = request.headers.get("content-type")
    if not _reads_as_json(content_type) and any(
        tuple(error.get("loc", ())) == ("body",) and error.get("type") != "missing" for error in raw
    ):
        # The route reads a JSON body and this one was sent as something else (a form, plain
        # text): it was never parsed, so no field of it can be named.
        return problem_response(
            UnsupportedMediaType,
            detail="This endpoint reads a JSON body: send it with Content-Type: application/json.",
            instance=request.url.path,
            request_id=_request_id(request),
        )
    errors = field_errors(raw)
    count = len(errors)
    if any(error["code"] == "json_invalid" for error in errors):
        detail = "The body is not valid JSON"
    else:
        detail = f"{count} field{'s' if count != 1 else ''} failed validation"
    return problem_response(
        ValidationFailed,
        detail=detail,
        instance=request.url.path,
        request_id=_request_id(request),
        extensions={"errors": errors},
    )


# FastAPI's answer to a body its JSON reader raised on other than a syntax error.
_UNREADABLE_BODY = "There was an error parsing the body"


def _unreadable_body_reason(cause: BaseException | None) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return "it is not UTF-8"
    if isinstance(cause, RecursionError):
        return "it nests arrays or objects too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "it holds a number with too many digits"
    return "it cannot be read"


async def _handle_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _UNREADABLE_BODY:
        # The body is not JSON Soko can read, as a syntax error is: the same answer.
        reason = _unreadable_body_reason(exc.__cause__)
        return problem_response(
            ValidationFailed,
            detail="The body is not valid JSON",
            instance=request.url.path,
            request_id=_request_id(request),
            extensions={"errors": [_json_invalid_entry(reason)]},
        )
    problem = problem_for_status(exc.status_code)
    if (
        isinstance(exc.detail, str)
        and exc.detail
        and exc.detail != HTTPStatus(exc.status_code).phrase
    ):
        detail = exc.detail
    elif exc.status_code == 404:
        detail = f"No resource at {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    else:
        detail = (
            problem.title if problem is not ProblemError else HTTPStatus(exc.status_code).phrase
        )
    return problem_response(
        problem,
        detail=detail,
        status=exc.status_code,
        instance=request.url.path,
        request_id=_request_id(request),
        headers=dict(exc.headers or {}),
    )


_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; see docs/problems.md for every `type`.",
    "type": "object",
    "properties": {
        "type": {"type": "string", "description": "`/problems/<slug>`"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail"],
}
_FIELD_ERROR_SCHEMA: dict[str, Any] = {
    "title": "FieldError",
    "type": "object",
    "properties": {
        "in": {"type": "string", "enum": ["body", "query", "path", "header", "cookie"]},
        "field": {"type": "string"},
        "pointer": {"type": ["string", "null"]},
        "detail": {"type": "string"},
        "code": {"type": "string"},
    },
    "required": ["in", "field", "detail", "code"],
}
_VALIDATION_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "ValidationProblem",
    "allOf": [
        {"$ref": "#/components/schemas/Problem"},
        {
            "type": "object",
            "properties": {
                "errors": {"type": "array", "items": {"$ref": "#/components/schemas/FieldError"}}
            },
            "required": ["errors"],
        },
    ],
}
# What a 422 answers: a validation error lists each refused field in ``errors``; the
# other 422 problems (a password the policy refuses, an idempotency key reused with
# another body, ...) carry members of their own instead.
_UNPROCESSABLE_SCHEMA: dict[str, Any] = {
    "title": "UnprocessableProblem",
    "description": (
        "A `validation-error` problem (ValidationProblem, with `errors`), or another 422 "
        "problem such as `weak-password` or `idempotency-key-reused` with members of its "
        "own; see docs/problems.md."
    ),
    "anyOf": [
        {"$ref": "#/components/schemas/ValidationProblem"},
        {"$ref": "#/components/schemas/Problem"},
    ],
}
_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _problem_content(schema: str = "Problem") -> dict[str, Any]:
    return {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route's documented error statuses, each a problem:
    ``@router.post(..., responses=problem_responses(404, 409))``."""
    return {
        status: {
            "description": problem_for_status(status).title,
            "content": _problem_content("UnprocessableProblem" if status == 422 else "Problem"),
        }
        for status in statuses
    }


# Dependencies that can answer problems of their own, whatever the route they serve (a
# page's cursor, a store to act for): every route depending on one documents them.
_DEPENDENCY_STATUSES: dict[Any, tuple[int, ...]] = {}

_F = TypeVar("_F", bound=Callable[..., Any])


def answers(*statuses: int) -> Callable[[_F], _F]:
    """Mark a dependency as answering ``statuses`` (as problems) on any route that
    uses it; the OpenAPI document lists them on each such route."""

    def mark(call: _F) -> _F:
        _DEPENDENCY_STATUSES[call] = statuses
        return call

    return mark


def _route_statuses(route: Any) -> set[int]:
    """What a route's dependencies can answer: 401 and 403 when it needs a sign-in or
    a permission, and what each marked dependency declared."""
    from soko.platform.auth import PUBLIC, declared_permission

    statuses: set[int] = set()
    permission = declared_permission(route.dependant)
    if permission is not None and permission != PUBLIC:
        statuses.update((401, 403))
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        statuses.update(_DEPENDENCY_STATUSES.get(dependant.call, ()))
        pending.extend(dependant.dependencies)
    return statuses


def _document_problems(app: FastAPI) -> None:
    """Make the OpenAPI document tell the truth about errors: FastAPI documents 422 as
    its own ``HTTPValidationError`` JSON, but Soko answers problem+json; an operation
    that reads a JSON body answers 415 to another media type; and every operation can
    answer some problem, so each gets a problem+json ``default``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = _PROBLEM_SCHEMA
        schemas["FieldError"] = _FIELD_ERROR_SCHEMA
        schemas["ValidationProblem"] = _VALIDATION_PROBLEM_SCHEMA
        schemas["UnprocessableProblem"] = _UNPROCESSABLE_SCHEMA
        paths = document.get("paths", {})
        # Included routers are kept lazily in app.routes: walk them with the
        # dependencies their inclusion adds.
        for route in iter_route_contexts(app.routes):
            if not isinstance(route.original_route, APIRoute) or route.path_format is None:
                continue
            statuses = _route_statuses(route)
            for method in route.methods or ():
                operation = paths.get(route.path_format, {}).get(method.lower())
                if operation is None:
                    continue
                responses = operation.setdefault("responses", {})
                for status in sorted(statuses):
                    responses.setdefault(
                        str(status),
                        {
                            "description": problem_for_status(status).title,
                            "content": _problem_content(
                                "UnprocessableProblem" if status == 422 else "Problem"
                            ),
                        },
                    )
        for path_item in document.get("paths", {}).values():
            for method, operation in path_item.items():
                if method not in _HTTP_METHODS:
                    continue
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = {
                        "description": "Unprocessable: a validation error or another 422 problem",
                        "content": _problem_content("UnprocessableProblem"),
                    }
                if "application/json" in operation.get("requestBody", {}).get("content", {}):
                    # A JSON body sent as another media type, or with none, is not read.
                    responses.setdefault(
                        "415",
                        {
                            "description": UnsupportedMediaType.title,
                            "content": _problem_content(),
                        },
                    )
                responses.setdefault(
                    "default",
                    {"description": "An error, as a problem", "content": _problem_content()},
                )
        text = json.dumps(document.get("paths", {}))
        for unused in ("HTTPValidationError", "ValidationError"):
            if f"#/components/schemas/{unused}" not in text:
                schemas.pop(unused, None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


async def _handle_client_disconnect(request: Request, exc: Exception) -> Response:
    # The client went away while its body was being read (a timeout, a killed worker
    # of the sender): its abort, not our error, so no traceback and no 5xx. The answer
    # is for the logs and metrics; nobody is left to read it.
    _log.info("client_disconnected", path=request.url.path)
    return problem_response(
        BadRequest,
        detail="The client closed the connection before the whole request was read.",
        instance=request.url.path,
        request_id=_request_id(request),
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every handled error as problem+json, and document them so in OpenAPI.
    Unhandled exceptions are turned into a 500 problem by the request context
    middleware, which sits outside all others."""
    app.add_exception_handler(ClientDisconnect, _handle_client_disconnect)
    app.add_exception_handler(ProblemError, _handle_problem)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    _document_problems(app)
