"""Who is calling, and what they may do: the principal and the permission dependency.

The identity domain resolves a request's credentials (a bearer access token or an API
key) into a :class:`Principal`; every route declares what it needs with
:func:`require` (or :func:`public`). The declaration is read twice: by the code, which
enforces it, and by the route-matrix test, which walks every route with every role.
The platform only defines the shapes; the app wires the identity domain's resolver in
as ``app.state.authenticator``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from soko.platform.errors import Forbidden, Unauthorized

PERMISSION_ATTRIBUTE = "__soko_permission__"
PUBLIC = "public"
SIGNED_IN = "signed-in"
# The permission to act on one's own account, carts, orders and stores. A route that
# names no permission asks an API key for this one: a key given only, say, "users:read"
# reads users and does nothing else in its owner's name.
OWN_ACCOUNT = "account:self"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request, as authenticated."""

    user_id: uuid.UUID
    roles: frozenset[str]
    permissions: frozenset[str]
    session_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def can(self, permission: str) -> bool:
        return permission in self.permissions


class Authenticator(Protocol):
    def __call__(self, request: Request) -> Awaitable[Principal | None]: ...


async def current_principal_or_none(request: Request) -> Principal | None:
    """The request's principal, resolved once per request; ``None`` when anonymous."""
    if hasattr(request.state, "principal"):
        cached: Principal | None = request.state.principal
        return cached
    authenticator: Authenticator | None = getattr(request.app.state, "authenticator", None)
    principal = await authenticator(request) if authenticator is not None else None
    request.state.principal = principal
    return principal


def _declare(permission: str, call: Callable[..., Any]) -> Callable[..., Any]:
    setattr(call, PERMISSION_ATTRIBUTE, permission)
    return call


def require(permission: str | None = None) -> Any:
    """A dependency: the caller must be signed in and, when ``permission`` is given,
    hold it. Answers 401 without credentials and 403 without the permission."""

    async def dependency(request: Request) -> Principal:
        principal = await current_principal_or_none(request)
        if principal is None:
            raise Unauthorized(
                "Sign in first: send an access token or API key.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if permission is not None and not principal.can(permission):
            raise Forbidden(f"This needs the {permission!r} permission.")
        if (
            permission is None
            and principal.api_key_id is not None
            and not principal.can(OWN_ACCOUNT)
        ):
            raise Forbidden(
                f"This API key may not act for its owner here: it needs the "
                f"{OWN_ACCOUNT!r} permission."
            )
        return principal

    return Depends(_declare(permission or SIGNED_IN, dependency))


async def _refuse_api_keys(request: Request) -> None:
    principal = await current_principal_or_none(request)
    if principal is not None and principal.api_key_id is not None:
        raise Forbidden("This needs a signed-in session, not an API key: sign in and retry.")


# For a route's ``dependencies``: what a leaked key must not do even with every
# permission (redirect payouts, add store members, sign its owner out, point a webhook
# elsewhere) needs a signed-in session. It declares no permission of its own; the
# route's ``require`` still does.
SESSION_ONLY = Depends(_refuse_api_keys)


def public() -> Any:
    """A dependency declaring a route open to anyone; yields the principal if any."""

    async def dependency(request: Request) -> Principal | None:
        principal = await current_principal_or_none(request)
        if principal is not None and principal.api_key_id is not None:
            # A key that may not act for its owner is served as anyone would be.
            return principal if principal.can(OWN_ACCOUNT) else None
        return principal

    return Depends(_declare(PUBLIC, dependency))


SignedIn = Annotated[Principal, require()]
MaybePrincipal = Annotated[Principal | None, public()]


def declared_permission(dependant: Any) -> str | None:
    """The permission a route declared through :func:`require`/:func:`public`, found by
    walking its dependency tree; ``None`` when it declared nothing."""
    call = getattr(dependant, "call", None)
    declared = getattr(call, PERMISSION_ATTRIBUTE, None)
    if isinstance(declared, str):
        return declared
    for sub in getattr(dependant, "dependencies", ()):
        found = declared_permission(sub)
        if found is not None:
            return found
    return None


# -- what other domains do when someone signs in -------------------------------------------------


class SignInHook(Protocol):
    """Called inside the sign-in's transaction once a session is opened, with the
    request's headers (lower-case names). A hook flushes, never commits, and must not
    fail the sign-in for a reason of its own: it logs and returns instead."""

    def __call__(
        self, session: Any, runtime: Any, user_id: uuid.UUID, headers: Mapping[str, str]
    ) -> Awaitable[None]: ...


_SIGN_IN_HOOKS: list[SignInHook] = []


def on_sign_in(hook: SignInHook) -> SignInHook:
    """Register ``hook`` to run on every completed sign-in or sign-up (a decorator).
    The identity domain runs them; a domain registers from its ``handlers`` module, so a
    cart can follow its owner when they sign in without identity knowing about carts."""
    if hook not in _SIGN_IN_HOOKS:
        _SIGN_IN_HOOKS.append(hook)
    return hook


async def run_sign_in_hooks(
    session: Any, runtime: Any, user_id: uuid.UUID, headers: Mapping[str, str]
) -> None:
    for hook in tuple(_SIGN_IN_HOOKS):
        await hook(session, runtime, user_id, headers)


# -- what must end before an account can be deleted ----------------------------------------------


class DeletionCheck(Protocol):
    """Called in the deletion's transaction before anything changes: a sentence saying
    what the user must finish first (open orders, a store they alone own), or ``None``.
    A check only reads."""

    def __call__(self, session: Any, runtime: Any, user_id: uuid.UUID) -> Awaitable[str | None]: ...


_DELETION_CHECKS: list[DeletionCheck] = []


def on_account_deletion(check: DeletionCheck) -> DeletionCheck:
    """Register ``check`` to run before an account is deleted (a decorator, from a
    domain's ``handlers`` module): what the domain still owes the person or others, for
    which it needs their data, blocks the deletion until it is done. What the domain
    erases afterwards it does on the ``identity.user_deleted`` event."""
    if check not in _DELETION_CHECKS:
        _DELETION_CHECKS.append(check)
    return check


async def account_deletion_blockers(session: Any, runtime: Any, user_id: uuid.UUID) -> list[str]:
    """Every registered check's answer that is not ``None``, in registration order."""
    found = []
    for check in tuple(_DELETION_CHECKS):
        reason = await check(session, runtime, user_id)
        if reason is not None:
            found.append(reason)
    return found
