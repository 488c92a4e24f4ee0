"""The role matrix: every route declares its permission, and answers every role as the
matrix in ``soko.identity.permissions`` says.

The routes are found by walking the app, so a route added later is checked without
touching this file. Each route is called as anonymous and as a user of each role, with
dummy path parameters and an empty body; what is checked is only the authorization
answer: anonymous on a non-public route gets 401, a role without the permission 403, a
role with it anything else (a 404 for a dummy id or a 422 for an empty body is fine), and
nobody may be refused by the permission check on a public route.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx2
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import iter_route_contexts

from soko.app import create_app
from soko.identity.models import Role
from soko.identity.permissions import ACCOUNT_SELF, ALL_PERMISSIONS, ROLE_PERMISSIONS, USERS_READ
from soko.platform.auth import (
    PERMISSION_ATTRIBUTE,
    PUBLIC,
    SIGNED_IN,
    Principal,
    declared_permission,
    public,
    require,
)
from soko.platform.config import Settings
from soko.platform.errors import Forbidden, Unauthorized
from tests.conftest import make_settings
from tests.identity.admin_support import problem_type
from tests.identity.conftest import MakeUser, SignedInUser

# Operational routes outside the permission model: probes, metrics, documentation.
OPERATIONAL_ROUTES = frozenset(
    {
        "/health",
        "/ready",
        "/metrics",
        "/problems/{slug}",
        "/docs",
        "/docs/assets/start.js",
        "/docs/assets/{name}",
        "/api/v1/openapi.json",
    }
)
CALLABLE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CALLERS: tuple[Role | None, ...] = (None, *Role)
_PATH_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    permission: str
    path_params: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def url(self) -> str:
        def fill(match: re.Match[str]) -> str:
            kind = self.path_params.get(match.group(1), str)
            if kind is uuid.UUID:
                return str(uuid.uuid4())
            if kind is int:
                return "1"
            return "x"

        return _PATH_PARAM.sub(fill, self.path)


def _declarations(dependant: Any) -> Iterator[str]:
    """Every permission declared anywhere in a route's dependency tree."""
    declared = getattr(getattr(dependant, "call", None), PERMISSION_ATTRIBUTE, None)
    if isinstance(declared, str):
        yield declared
    for sub in getattr(dependant, "dependencies", ()):
        yield from _declarations(sub)


def walk_routes(app: FastAPI) -> tuple[list[Endpoint], list[str]]:
    """The app's callable endpoints with their permission, and what is wrong with the
    routes that cannot be judged (no declaration, two declarations, unknown permission)."""
    endpoints: list[Endpoint] = []
    problems: list[str] = []
    # Included routers are kept lazily in app.routes; this flattens them with the
    # dependencies their inclusion adds.
    for context in iter_route_contexts(app.routes):
        path = context.path or ""
        if path in OPERATIONAL_ROUTES:
            continue
        dependant = getattr(context, "dependant", None)
        methods = sorted(set(context.methods or ()) & set(CALLABLE_METHODS))
        label = f"{','.join(methods) or type(context.original_route).__name__} {path}"
        if dependant is None:
            problems.append(f"{label}: not a FastAPI route, so it cannot declare a permission")
            continue
        permission = declared_permission(dependant)
        if permission is None:
            problems.append(f"{label}: declares no permission (require(...) or public())")
            continue
        distinct = set(_declarations(dependant))
        if len(distinct) > 1:
            problems.append(f"{label}: declares several permissions {sorted(distinct)}")
            continue
        if permission not in ALL_PERMISSIONS | {PUBLIC, SIGNED_IN}:
            problems.append(f"{label}: declares {permission!r}, which no role can hold")
            continue
        params = {field.name: field.field_info.annotation for field in dependant.path_params}
        endpoints.extend(Endpoint(method, path, permission, params) for method in methods)
    return endpoints, problems


def expected(endpoint: Endpoint, caller: Role | None) -> str:
    """What the matrix says: "open" (any answer but a refusal by the permission check),
    "401" or "403"."""
    if endpoint.permission == PUBLIC:
        return "open"
    if caller is None:
        return "401"
    if endpoint.permission == SIGNED_IN or endpoint.permission in ROLE_PERMISSIONS[caller]:
        return "open"
    return "403"


def mismatch(endpoint: Endpoint, caller: Role | None, response: httpx2.Response) -> str | None:
    status, slug = response.status_code, problem_type(response)
    want = expected(endpoint, caller)
    if status >= 500:
        wrong = True  # a crash on a dummy request hides what the route would answer
    elif want == "401":
        wrong = (status, slug) != (401, Unauthorized.slug)
    elif want == "403":
        wrong = (status, slug) != (403, Forbidden.slug)
    elif endpoint.permission == PUBLIC:
        wrong = slug in (Unauthorized.slug, Forbidden.slug)
    else:
        # The caller's token must count, and the permission check must let it through.
        wrong = status == 401 or slug == Forbidden.slug
    if not wrong:
        return None
    who = caller.value if caller is not None else "anonymous"
    want_text = {"open": "not refused", "401": "401 unauthorized", "403": "403 forbidden"}[want]
    return (
        f"{endpoint} [{endpoint.permission}] as {who}: expected {want_text}, "
        f"got {status} {slug or response.text[:80]}"
    )


async def check_matrix(
    client: httpx2.AsyncClient, endpoints: list[Endpoint], make_user: MakeUser
) -> list[str]:
    """Call every endpoint as every caller; the differences from the matrix."""
    found: list[str] = []
    readers: dict[Role, SignedInUser] = {}
    for endpoint in endpoints:
        for caller in CALLERS:
            headers: dict[str, str] = {}
            if caller is not None:
                # A write may sign its caller out or delete the account: it gets a user of
                # its own. Reads share one per role.
                if endpoint.method == "GET":
                    if caller not in readers:
                        readers[caller] = await make_user(caller)
                    user = readers[caller]
                else:
                    user = await make_user(caller)
                headers = user.headers
            response = await client.request(
                endpoint.method,
                endpoint.url(),
                headers=headers,
                json={} if endpoint.method in BODY_METHODS else None,
            )
            problem = mismatch(endpoint, caller, response)
            if problem is not None:
                found.append(problem)
    return found


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # Without rate limits: hundreds of calls from one address would otherwise meet a 429
    # before the permission check.
    return make_settings(tmp_path, database_url=database_url, ratelimit_enabled=False)


def test_every_route_declares_a_permission(tmp_path: Path) -> None:
    app = create_app(
        make_settings(tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    )
    endpoints, problems = walk_routes(app)
    assert problems == [], "\n".join(problems)
    paths = {endpoint.path for endpoint in endpoints}
    # The walk reaches into included routers (a flat walk would find none of these).
    assert {"/api/v1/me/api-keys", "/api/v1/admin/users/{user_id}/roles"} <= paths


async def test_every_route_answers_every_role_as_the_matrix_says(
    app: FastAPI, client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    endpoints, _ = walk_routes(app)
    assert len(endpoints) >= 10
    found = await check_matrix(client, endpoints, make_user)
    assert found == [], f"{len(found)} differences from the role matrix:\n" + "\n".join(found)


async def test_the_check_reports_routes_that_break_the_matrix(
    app: FastAPI, client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    """The walk and the check themselves: routes that lie about their permission, or
    declare none, are reported."""
    probes = APIRouter()

    @probes.get("/undeclared")
    async def undeclared() -> dict[str, str]:
        return {}

    @probes.get("/public-but-signed-in")
    async def public_but_signed_in(caller: Annotated[Principal | None, public()]) -> dict[str, str]:
        if caller is None:
            raise Unauthorized()
        return {}

    @probes.get("/stricter-than-declared")
    async def stricter(caller: Annotated[Principal, require(ACCOUNT_SELF)]) -> dict[str, str]:
        if not caller.can(USERS_READ):
            raise Forbidden()
        return {}

    app.include_router(probes, prefix="/api/v1/matrix-probe")
    endpoints, problems = walk_routes(app)
    assert problems == [
        "GET /api/v1/matrix-probe/undeclared: declares no permission (require(...) or public())"
    ]
    probed = [endpoint for endpoint in endpoints if "/matrix-probe/" in endpoint.path]
    found = await check_matrix(client, probed, make_user)
    assert sorted(found) == sorted(
        [
            "GET /api/v1/matrix-probe/public-but-signed-in [public] as anonymous: "
            "expected not refused, got 401 unauthorized",
            *(
                f"GET /api/v1/matrix-probe/stricter-than-declared [account:self] as {role}: "
                "expected not refused, got 403 forbidden"
                for role in ("customer", "seller", "provider")
            ),
        ]
    )
