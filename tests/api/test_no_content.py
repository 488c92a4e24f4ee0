"""Every route that answers ``204 No Content`` sends no body and no ``Content-Type``:
its endpoint returns a bare ``Response``. One returning ``None`` made FastAPI label the
empty answer ``application/json``. The routes are found from the app, so one added
later is checked too."""

from __future__ import annotations

import inspect
import typing

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.responses import Response


def test_every_204_route_returns_a_bare_response(app: FastAPI) -> None:
    no_content = [
        context
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
        and context.original_route.status_code == 204
    ]
    wrong = []
    for context in no_content:
        hints = typing.get_type_hints(inspect.unwrap(context.endpoint))
        returned = hints.get("return")
        if not (isinstance(returned, type) and issubclass(returned, Response)):
            wrong.append(f"{sorted(context.methods or ())} {context.path} -> {returned!r}")
    assert wrong == []
    # The walk found the routes it was written for.
    paths = {context.path for context in no_content}
    assert {"/api/v1/me/mfa/totp/disable", "/api/v1/me"} <= paths, paths
