"""Cheaper route matching: a domain's routes are not tried on a path none of them can match.

FastAPI keeps each included router as a branch of its own and, for every request, asks
the branches in order whether one of their routes matches, trying each route's regular
expression. A request for the catalog therefore first tried every route of identity,
notifications and sellers, the domains included before it: with about 150 routes that
was a fifth of the CPU of a cached catalog page.

A route's path can only match a request path that starts with the route's text before
its first parameter (``/api/v1/products/{product_id}`` needs ``/api/v1/products/``),
because Starlette compiles the path into an anchored expression that begins with exactly
that text. :func:`guard_included_routers` gives each top-level branch the set of those
prefixes and answers "no match" at once, with one ``str.startswith``, for a path that
begins with none of them; any other path is matched exactly as before. A branch holding
anything whose prefix is not known (a route by host, a frontend group) is left as it is.

The guard reads the branch's routes once, when the app is built: routes added to a
router after :func:`guard_included_routers` ran would not be seen, so it runs after
every router is included. It reads each route's path as FastAPI will join it (the
included router's prefix and the route's path) without building the route's request
handling, which FastAPI does lazily, branch by branch, at a branch's first request: for
the whole app that costs a tenth of a second or more, which an app built for a test
would pay on every test. A server builds every branch as it starts
(:func:`build_route_handling`), before its first request and before its startup heap is
frozen.

A domain made of parts (identity's ``/auth``, ``/me``, ``/admin`` routers) is a branch of
branches, asked in order too: a request for ``/api/v1/me`` tried every sign-in route
first. The branches nested in such a branch are guarded the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette._utils import get_route_path  # the path Starlette's own routes match on
from starlette.routing import Match, Route, WebSocketRoute
from starlette.types import Scope

_Matcher = Callable[[Scope], tuple[Match, Scope]]


def static_prefix(path_format: str) -> str:
    """The text of a route path before its first parameter."""
    return path_format.partition("{")[0]


def _path_prefix(path: Any) -> str | None:
    """The static prefix of a route path, or ``None`` when it is not a path."""
    if not isinstance(path, str) or not path.startswith("/"):
        return None
    return static_prefix(path)


def _context_prefix(context: Any) -> str | None:
    original = getattr(context, "original_route", None)
    if isinstance(original, APIRoute):
        path_format = getattr(context, "path_format", "")
    else:
        path_format = getattr(getattr(context, "starlette_route", None), "path_format", "")
    return _path_prefix(path_format)


def _covering(prefixes: Iterable[str | None]) -> tuple[str, ...] | None:
    """The shortest set of ``prefixes`` covering them all, or ``None`` when one is
    unknown (the branch must then be matched in full)."""
    found: set[str] = set()
    for prefix in prefixes:
        if prefix is None:
            return None
        found.add(prefix)
    kept: list[str] = []
    for prefix in sorted(found, key=len):
        if not any(prefix.startswith(shorter) for shorter in kept):
            kept.append(prefix)
    return tuple(kept)


def branch_prefixes(contexts: Iterable[Any]) -> tuple[str, ...] | None:
    """The shortest set of prefixes covering every route of a branch, as FastAPI built
    them, or ``None`` when one route's prefix is unknown."""
    return _covering(_context_prefix(context) for context in contexts)


def _guarded(matches: _Matcher, prefixes: tuple[str, ...]) -> _Matcher:
    def guarded_matches(scope: Scope) -> tuple[Match, Scope]:
        if not get_route_path(scope).startswith(prefixes):
            return Match.NONE, {}
        return matches(scope)

    return guarded_matches


_ROUTES_WITH_A_PATH = (APIRoute, APIWebSocketRoute, Route, WebSocketRoute)


def _route_paths(router: Any, include_context: Any) -> Iterator[str | None]:
    """The path of every route of ``router`` included with ``include_context``, as
    FastAPI joins it, its included routers walked as FastAPI walks them; ``None`` for a
    route whose path is not known."""
    if getattr(router, "_low_priority_routes", None):
        yield None  # fallbacks matched after every other route: leave the branch be
        return
    for route in getattr(router, "routes", ()):
        child = getattr(route, "include_context", None)
        if child is not None and hasattr(route, "effective_route_contexts"):
            yield from _route_paths(route.original_router, include_context.combine(child))
        elif isinstance(route, _ROUTES_WITH_A_PATH):
            yield include_context.path_for(route)
        else:
            yield None


def _unbuilt_prefixes(branch: Any) -> tuple[str, ...] | None:
    """:func:`branch_prefixes` of an included router, read from its routes' paths
    without building them."""
    include_context = getattr(branch, "include_context", None)
    router = getattr(branch, "original_router", None)
    if include_context is None or router is None:
        return None
    return _covering(_path_prefix(path) for path in _route_paths(router, include_context))


def included_branches(app: FastAPI) -> list[Any]:
    """The top-level included routers of ``app``."""
    return [route for route in app.router.routes if hasattr(route, "effective_route_contexts")]


def nested_branches(branch: Any) -> list[Any]:
    """The included routers directly inside ``branch``, as FastAPI matches them, when
    every route of ``branch`` is one (listing them then builds no route); else none."""
    routes = getattr(getattr(branch, "original_router", None), "routes", None)
    if not routes or not all(hasattr(route, "effective_route_contexts") for route in routes):
        return []
    return [
        candidate
        for candidate in branch.effective_candidates()
        if hasattr(candidate, "effective_route_contexts")
    ]


def _guard(branch: Any) -> int:
    """Guard ``branch`` and the included routers nested in it; the number guarded."""
    guarded = 0
    if getattr(branch, "_soko_prefixes", None) is None:
        prefixes = _unbuilt_prefixes(branch)
        if prefixes:
            # An instance attribute shadows the class's method for this branch only.
            branch.matches = _guarded(branch.matches, prefixes)
            branch._soko_prefixes = prefixes
            guarded += 1
    return guarded + sum(_guard(child) for child in nested_branches(branch))


def guard_included_routers(app: FastAPI) -> int:
    """Guard every included router of ``app``, top-level ones and those nested in a
    router of included routers (a domain's ``/auth``, ``/me`` and ``/admin`` parts); the
    number guarded."""
    return sum(_guard(branch) for branch in included_branches(app))


def build_route_handling(app: FastAPI) -> int:
    """Have FastAPI build the request handling of every route of ``app`` now (it builds
    a branch's at the branch's first request otherwise); the number of routes."""
    return sum(1 for branch in included_branches(app) for _ in branch.effective_route_contexts())
