"""The prefix guard on included routers never changes which route a request reaches."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import APIRouter, FastAPI
from starlette.routing import Match

from soko.app import create_app
from soko.platform.routing import (
    branch_prefixes,
    build_route_handling,
    guard_included_routers,
    included_branches,
    nested_branches,
    static_prefix,
)
from tests.conftest import make_settings

_PARAMETER = re.compile(r"\{[^}]*\}")
_SAMPLE_ID = "01a247c5-b780-72d9-8689-0123456789ab"


def _sample_paths(app: FastAPI) -> list[str]:
    """A concrete path for every route of the app, each with and without a trailing
    slash, and paths near them that no route has."""
    paths: set[str] = {"/", "", "/api", "/api/v1", "/api/v1/", "/no/such/place", "/api/v2/products"}
    for branch in included_branches(app):
        for context in branch.effective_route_contexts():
            path_format = getattr(context, "path_format", "") or ""
            if not path_format:
                continue
            for value in (_SAMPLE_ID, "some-slug"):
                path = _PARAMETER.sub(value, path_format)
                paths.update({path, path.rstrip("/") or "/", path + "/", path + "/extra"})
                paths.add(path[:-1])  # a path cut short inside the last segment
    return sorted(paths)


def _scope(path: str, method: str, *, root_path: str = "") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": root_path + path,
        "root_path": root_path,
        "headers": [],
        "query_string": b"",
    }


def _every_branch(app: FastAPI) -> list[Any]:
    """The app's included routers and those nested in them, outermost first."""
    found: list[Any] = []
    waiting = list(included_branches(app))
    while waiting:
        branch = waiting.pop(0)
        found.append(branch)
        waiting.extend(nested_branches(branch))
    return found


@pytest.fixture(scope="module")
def soko_app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    return create_app(make_settings(tmp_path_factory.mktemp("routing")))


def test_static_prefix_is_the_text_before_the_first_parameter() -> None:
    assert static_prefix("/api/v1/products/{product_id}") == "/api/v1/products/"
    assert static_prefix("/api/v1/carts/{cart_id}/items/{variant_id}") == "/api/v1/carts/"
    assert static_prefix("/api/v1/me") == "/api/v1/me"
    assert static_prefix("/{anything:path}") == "/"


def test_branch_prefixes_keep_only_the_shortest_covering_ones() -> None:
    class Context:
        def __init__(self, path: str) -> None:
            self.path_format = path
            self.original_route = None
            self.starlette_route = self

    contexts = [Context(p) for p in ("/api/v1/me", "/api/v1/me/sessions", "/api/v1/auth/{x}")]
    assert branch_prefixes(contexts) == ("/api/v1/me", "/api/v1/auth/")

    class Unknown:
        original_route = None
        starlette_route = None

    assert branch_prefixes([*contexts, Unknown()]) is None


def test_every_domain_branch_of_the_app_is_guarded(soko_app: FastAPI) -> None:
    branches = _every_branch(soko_app)
    guarded = [branch for branch in branches if getattr(branch, "_soko_prefixes", None)]
    assert len(guarded) == len(branches)
    assert len(included_branches(soko_app)) >= 10
    nested = len(branches) - len(included_branches(soko_app))
    assert nested >= 15  # identity's, orders' and payments' parts
    # Guarding twice changes nothing.
    assert guard_included_routers(soko_app) == 0


def test_the_prefixes_are_those_of_the_routes_fastapi_builds(soko_app: FastAPI) -> None:
    """The guard reads paths without building the routes; FastAPI's built routes give the
    same prefixes, branch by branch."""
    for branch in _every_branch(soko_app):
        assert branch._soko_prefixes == branch_prefixes(branch.effective_route_contexts())


def test_building_an_app_builds_no_route_until_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app built for a test pays for the routes its requests reach, not for all of
    them; a server builds them all as it starts."""
    import fastapi.routing

    built: list[Any] = []
    original = fastapi.routing._EffectiveRouteContext.from_api_route

    def counted(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs.get("original_route"))
        return original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing._EffectiveRouteContext, "from_api_route", counted)
    app = create_app(make_settings(tmp_path))
    # FastAPI itself builds the few routes of a router that includes another one.
    assert len(built) <= 10
    assert len(included_branches(app)) >= 10
    assert all(getattr(branch, "_soko_prefixes", None) for branch in included_branches(app))
    routes = build_route_handling(app)
    assert routes > 120
    assert len(built) >= routes - 10  # a few plain Starlette routes are not API routes
    built.clear()
    assert build_route_handling(app) == routes
    assert built == []  # built once


@pytest.mark.parametrize("root_path", ["", "/market"])
def test_the_guard_answers_as_the_branch_itself_for_every_path(
    soko_app: FastAPI, root_path: str
) -> None:
    paths = _sample_paths(soko_app)
    assert len(paths) > 300
    checked = 0
    for branch in _every_branch(soko_app):
        unguarded = type(branch).matches
        for path in paths:
            for method in ("GET", "POST", "DELETE"):
                scope = _scope(path, method, root_path=root_path)
                expected, _ = unguarded(branch, dict(scope))
                actual, _ = branch.matches(dict(scope))
                assert actual == expected, (path, method, branch._soko_prefixes)
                checked += expected != Match.NONE
    assert checked > 300  # the paths did reach routes, not only 404s


def _identity_branch(app: FastAPI) -> Any:
    return next(
        branch
        for branch in included_branches(app)
        if "/api/v1/me" in getattr(branch, "_soko_prefixes", ())
    )


def test_a_path_outside_a_branch_is_refused_without_trying_its_routes(
    soko_app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = _identity_branch(soko_app)

    def tried(_scope: Any) -> Any:
        raise AssertionError("the branch's routes were tried")

    monkeypatch.setattr(identity.original_router, "matches", tried)
    assert identity.matches(_scope("/api/v1/products", "GET"))[0] == Match.NONE
    with pytest.raises(AssertionError, match="were tried"):
        identity.matches(_scope("/api/v1/me", "GET"))


def test_a_request_for_an_account_does_not_try_the_sign_in_routes(
    soko_app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = _identity_branch(soko_app)
    parts = {part._soko_prefixes[0]: part for part in nested_branches(identity)}
    sign_in = parts["/api/v1/auth/login"]

    def tried(_scope: Any) -> Any:
        raise AssertionError("the sign-in routes were tried")

    monkeypatch.setattr(sign_in.original_router, "matches", tried)
    matched, _ = identity.matches(_scope("/api/v1/me", "GET"))
    assert matched == Match.FULL
    with pytest.raises(AssertionError, match="were tried"):
        identity.matches(_scope("/api/v1/auth/login", "POST"))


async def test_requests_reach_the_same_routes_through_a_guarded_app(tmp_path: Path) -> None:
    """End to end on a small app: matches, 404s, 405s and slash redirects."""

    def build() -> FastAPI:
        app = FastAPI()
        first = APIRouter()
        second = APIRouter()

        @first.get("/alpha/{item}")
        async def alpha(item: str) -> dict[str, str]:
            return {"route": "alpha", "item": item}

        @second.get("/beta")
        async def beta() -> dict[str, str]:
            return {"route": "beta"}

        @second.post("/alpha-post")
        async def alpha_post() -> dict[str, str]:
            return {"route": "alpha-post"}

        app.include_router(first, prefix="/v1")
        app.include_router(second, prefix="/v1")
        return app

    plain, guarded = build(), build()
    assert guard_included_routers(guarded) == 2
    requests = [
        ("GET", "/v1/alpha/x"),
        ("GET", "/v1/alpha/x/"),
        ("GET", "/v1/beta"),
        ("GET", "/v1/beta/"),
        ("POST", "/v1/beta"),
        ("GET", "/v1/alpha-post"),
        ("POST", "/v1/alpha-post"),
        ("GET", "/v1/gamma"),
        ("GET", "/v1"),
    ]
    answers = []
    for app in (plain, guarded):
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
            answers.append(
                [
                    (r.status_code, r.headers.get("location"), r.text)
                    for r in [
                        await client.request(m, p, follow_redirects=False) for m, p in requests
                    ]
                ]
            )
    assert answers[0] == answers[1]
    assert {status for status, _, _ in answers[0]} >= {200, 404, 405, 307}
