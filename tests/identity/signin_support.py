"""Helpers for the password account tests: registering and signing in over HTTP, and
reading what was mailed and audited."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import httpx2
from sqlalchemy import select

from soko.identity.login_methods import LOGIN_SETTINGS_TAG, change_login_settings
from soko.identity.models import AuditEvent, User
from soko.notifications.public import read_sink
from soko.platform.runtime import Runtime

AUTH = "/api/v1/auth"
# Not in the blocklist, not repetitive, unrelated to the test accounts.
PASSWORD = "marula-trees-at-dusk-17"
NEW_PASSWORD = "baobab-shade-by-noon-42"
PHONE_UA = "Mozilla/5.0 (Linux; Android 14; TECNO KI5) Chrome/130.0 Mobile"
LAPTOP_UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Firefox/133.0"
TOKEN_IN_LINK = re.compile(r"/(verify-email|reset-password)\?token=([A-Za-z0-9_\-]+)")


async def change_settings(
    runtime: Runtime,
    *,
    methods: Mapping[str, bool] | None = None,
    mfa_required_roles: Iterable[str] | None = None,
) -> None:
    """Change the runtime login settings as an admin's request would: commit, then
    invalidate the cached copy sign-ins read (a request's commit does that itself)."""
    async with runtime.db.transaction() as session:
        await change_login_settings(
            session,
            methods=methods,
            mfa_required_roles=mfa_required_roles,
            now=runtime.clock.now(),
            changed_by=None,
        )
    await runtime.cache.invalidate_tags(LOGIN_SETTINGS_TAG)


def new_email() -> str:
    return f"wanjiru-{uuid.uuid4().hex[:8]}@example.com"


async def register(
    client: httpx2.AsyncClient,
    email: str,
    password: str = PASSWORD,
    *,
    display_name: str = "Wanjiru",
    user_agent: str = PHONE_UA,
) -> httpx2.Response:
    return await client.post(
        f"{AUTH}/register",
        json={"email": email, "password": password, "display_name": display_name},
        headers={"User-Agent": user_agent},
    )


async def login(
    client: httpx2.AsyncClient,
    identifier: str,
    password: str = PASSWORD,
    *,
    user_agent: str = PHONE_UA,
) -> httpx2.Response:
    return await client.post(
        f"{AUTH}/login",
        json={"identifier": identifier, "password": password},
        headers={"User-Agent": user_agent},
    )


def bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def mailed(runtime: Runtime, to: str) -> list[dict[str, Any]]:
    """The emails delivered to ``to`` so far, after running every delivery job due."""
    await runtime.dispatcher.run_until_idle()
    return [m for m in read_sink(runtime.settings.data_dir, "email") if m["to"] == to]


def link_token(message: dict[str, Any], page: str) -> str:
    """The token of the ``page`` link (``verify-email``/``reset-password``) in an email."""
    found = [token for kind, token in TOKEN_IN_LINK.findall(message["text"]) if kind == page]
    assert len(found) == 1, message["text"]
    return found[0]


async def mailed_token(runtime: Runtime, to: str, page: str) -> str:
    """The token of the newest ``page`` link mailed to ``to``."""
    messages = [m for m in await mailed(runtime, to) if f"/{page}?token=" in m["text"]]
    assert messages, f"no {page} link was mailed"
    assert messages[-1]["text"].count(f"{runtime.settings.effective_app_url}/{page}?token=") == 1
    return link_token(messages[-1], page)


async def audit_events(runtime: Runtime, action: str) -> list[AuditEvent]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.scalars(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        )
        return list(rows.all())


async def load_user(runtime: Runtime, user_id: str | uuid.UUID) -> User:
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, uuid.UUID(str(user_id)))
        assert user is not None
        return user
