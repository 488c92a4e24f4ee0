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
every router is included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette._utils import get_route_path  # the path Starlette's own routes match on
from starlette.routing import Match
from starlette.types import Scope

_Matcher = Callable[[Scope], tuple[Match, Scope]]


def static_prefix(path_format: str) -> str:
    """The text of a route path before its first parameter."""
    return path_format.partition("{")[0]


def _context_prefix(context: Any) -> str | None:
    original = getattr(context, "original_route", None)
    if isinstance(original, APIRoute):
        path_format = getattr(context, "path_format", "")
    else:
        path_format = getattr(getattr(context, "starlette_route", None), "path_format", "")
    if not isinstance(path_format, str) or not path_format.startswith("/"):
        return None
    return static_prefix(path_format)


def branch_prefixes(contexts: Iterable[Any]) -> tuple[str, ...] | None:
    """The shortest set of prefixes covering every route of a branch, or ``None`` when
    one route's prefix is unknown (the branch must then be matched in full)."""
    prefixes: set[str] = set()
    for context in contexts:
        prefix = _context_prefix(context)
        if prefix is None:
            return None
        prefixes.add(prefix)
    kept: list[str] = []
    for prefix in sorted(prefixes, key=len):
        if not any(prefix.startswith(shorter) for shorter in kept):
            kept.append(prefix)
    return tuple(kept)


def _guarded(matches: _Matcher, prefixes: tuple[str, ...]) -> _Matcher:
    def guarded_matches(scope: Scope) -> tuple[Match, Scope]:
        if not get_route_path(scope).startswith(prefixes):
            return Match.NONE, {}
        return matches(scope)

    return guarded_matches


def guard_included_routers(app: FastAPI) -> int:
    """Guard every top-level included router of ``app``; the number guarded."""
    guarded = 0
    for route in app.router.routes:
        walk = getattr(route, "effective_route_contexts", None)
        if walk is None or getattr(route, "_soko_prefixes", None) is not None:
            continue
        prefixes = branch_prefixes(walk())
        if not prefixes:
            continue
        # An instance attribute shadows the class's method for this branch only.
        route.matches = _guarded(route.matches, prefixes)  # type: ignore[method-assign,assignment]
        route._soko_prefixes = prefixes  # type: ignore[attr-defined]
        guarded += 1
    return guarded
