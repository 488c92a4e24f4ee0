"""Login methods and MFA requirements, switched at runtime by an admin
(``/api/v1/admin/login-methods``) and read fresh by every process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from soko.identity.login_methods import (
    LOGIN_SETTINGS_CACHE_KEY,
    LOGIN_SETTINGS_TAG,
    change_login_settings,
    current_login_settings,
    login_method_enabled,
    mfa_required_roles,
)
from soko.identity.models import Role
from soko.identity.oidc import OidcProviders
from soko.identity.routes_oidc import oidc_providers
from soko.platform.cache import RedisCache
from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.runtime import Runtime
from tests.conftest import processes_over_one_redis
from tests.identity.admin_support import LOGIN_METHODS, audit_events, problem_type
from tests.identity.conftest import MakeUser

DEFAULTS = {"oidc:apple": False, "oidc:google": False, "password": True, "sms_code": True}


def _provider_config(issuer: str) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "client_id": "soko-test",
        "client_secret": "not-a-real-secret",
        "redirect_uris": ["https://shop.example/auth/callback"],
    }


@pytest.fixture(autouse=True)
async def configured_providers(app: Any, runtime: Runtime) -> AsyncIterator[OidcProviders]:
    """Google and a local provider configured (Apple is not): only configured providers
    may be switched on. Nothing here reaches a provider."""
    registry = OidcProviders.from_config(
        {
            "google": _provider_config("https://accounts.google.com"),
            "local": _provider_config("https://id.shop.example"),
        },
        clock=runtime.clock,
    )
    app.dependency_overrides[oidc_providers] = lambda: registry
    yield registry
    app.dependency_overrides.pop(oidc_providers, None)
    await registry.aclose()


async def test_defaults_allow_password_and_sms_and_no_social_provider(runtime: Runtime) -> None:
    async with runtime.db.transaction(read_only=True) as session:
        assert await login_method_enabled(session, "password")
        assert await login_method_enabled(session, "sms_code")
        assert not await login_method_enabled(session, "oidc:google")
        assert not await login_method_enabled(session, "oidc:apple")
        assert not await login_method_enabled(session, "oidc:local")
        assert not await login_method_enabled(session, "carrier-pigeon")
        assert await mfa_required_roles(session) == frozenset()


async def test_an_admin_reads_and_changes_the_settings(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    admin = await make_user(Role.admin)
    first = await client.get(LOGIN_METHODS, headers=admin.headers)
    assert first.status_code == 200
    assert first.json() == {"methods": DEFAULTS, "mfa_required_roles": []}

    changed = await client.put(
        LOGIN_METHODS,
        headers=admin.headers,
        json={
            "methods": {"password": False, "oidc:google": True},
            "mfa_required_roles": ["support", "admin", "admin"],
        },
    )
    assert changed.status_code == 200, changed.text
    expected = {
        "methods": {**DEFAULTS, "password": False, "oidc:google": True},
        "mfa_required_roles": ["admin", "support"],
    }
    assert changed.json() == expected
    assert (await client.get(LOGIN_METHODS, headers=admin.headers)).json() == expected

    async with runtime.db.transaction(read_only=True) as session:
        assert not await login_method_enabled(session, "password")
        assert await login_method_enabled(session, "oidc:google")
        assert await mfa_required_roles(session) == {"admin", "support"}

    [event] = await audit_events(runtime, "admin.login_methods_changed")
    assert event.actor_id == admin.user_id
    assert event.data == {
        "enabled": ["oidc:google", "sms_code"],
        "disabled": ["oidc:apple", "password"],
        "changed": ["oidc:google", "password"],
        "mfa_required_roles": ["admin", "support"],
        "mfa_required_roles_before": [],
    }


async def test_methods_not_named_keep_their_setting(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    await client.put(
        LOGIN_METHODS,
        headers=admin.headers,
        json={"methods": {"oidc:local": True}, "mfa_required_roles": ["operator"]},
    )
    response = await client.put(
        LOGIN_METHODS, headers=admin.headers, json={"methods": {"sms_code": False}}
    )
    assert response.json() == {
        "methods": {**DEFAULTS, "oidc:local": True, "sms_code": False},
        "mfa_required_roles": ["operator"],
    }
    cleared = await client.put(
        LOGIN_METHODS, headers=admin.headers, json={"mfa_required_roles": []}
    )
    assert cleared.json()["mfa_required_roles"] == []


async def test_an_unchanged_put_records_nothing(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    response = await client.put(
        LOGIN_METHODS, headers=admin.headers, json={"methods": {"password": True}}
    )
    assert response.status_code == 200
    assert await audit_events(runtime, "admin.login_methods_changed") == []


async def test_unknown_methods_and_roles_are_refused(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    for body in (
        {"methods": {"fax": True}},
        {"methods": {"oidc:": True}},
        {"methods": {"oidc:Google Accounts": True}},
        {"mfa_required_roles": ["emperor"]},
        {"methods": {"password": "maybe"}},
        # Only JSON booleans: "yes" was read as true, 0 as false.
        {"methods": {"password": "yes"}},
        {"methods": {"sms_code": 0}},
        {"sms": True},
    ):
        response = await client.put(LOGIN_METHODS, headers=admin.headers, json=body)
        assert response.status_code == 422, body
        assert problem_type(response) == "validation-error"
    # Nothing half-applied: a valid method next to an unknown one is not switched either.
    mixed = await client.put(
        LOGIN_METHODS, headers=admin.headers, json={"methods": {"password": False, "fax": True}}
    )
    assert mixed.status_code == 422
    async with runtime.db.transaction(read_only=True) as session:
        assert await login_method_enabled(session, "password")


async def test_a_provider_that_is_not_configured_cannot_be_switched_on(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    for body in (
        {"methods": {"oidc:apple": True}},
        {"methods": {"oidc:nobody": True}},
        # Nothing half-applied beside it.
        {"methods": {"oidc:google": True, "oidc:apple": True, "password": False}},
    ):
        refused = await client.put(LOGIN_METHODS, headers=admin.headers, json=body)
        assert refused.status_code == 422, body
        assert problem_type(refused) == "validation-error"
        assert "oidc:apple" in refused.text or "oidc:nobody" in refused.text
    async with runtime.db.transaction(read_only=True) as session:
        assert not await login_method_enabled(session, "oidc:apple")
        assert not await login_method_enabled(session, "oidc:google")
        assert await login_method_enabled(session, "password")
    assert await audit_events(runtime, "admin.login_methods_changed") == []

    # Switching one off needs no configuration: a provider removed from the settings
    # can still be turned off.
    off = await client.put(
        LOGIN_METHODS, headers=admin.headers, json={"methods": {"oidc:apple": False}}
    )
    assert off.status_code == 200, off.text
    on = await client.put(
        LOGIN_METHODS, headers=admin.headers, json={"methods": {"oidc:google": True}}
    )
    assert on.status_code == 200, on.text
    assert on.json()["methods"]["oidc:google"] is True


async def test_a_change_reaches_another_process_without_a_restart(
    settings: Settings, runtime: Runtime, clock: ManualClock
) -> None:
    other = Runtime(settings, clock=clock)
    try:
        async with other.db.transaction(read_only=True) as session:
            assert await login_method_enabled(session, "sms_code")
        async with runtime.db.transaction() as session:
            await change_login_settings(
                session, methods={"sms_code": False}, now=clock.now(), changed_by=None
            )
        async with other.db.transaction(read_only=True) as session:
            assert not await login_method_enabled(session, "sms_code")
    finally:
        await other.stop()


async def test_switching_passwords_off_stops_password_registration(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    await client.put(LOGIN_METHODS, headers=admin.headers, json={"methods": {"password": False}})
    response = await client.post(
        "/api/v1/auth/register",
        json={"email": "neema@example.com", "password": "jacaranda-blossoms-in-october"},
    )
    assert response.status_code == 403, response.text
    assert problem_type(response) == "login-method-disabled"


@pytest.mark.redis
async def test_a_near_copy_of_the_settings_is_dropped_when_they_change(
    tmp_path: Path, database_url: str, redis_url: str, runtime: Runtime
) -> None:
    """Every sign-in reads the settings: each process keeps them near (no round trip to
    Redis), and drops its copy as soon as another process announces a change."""
    async with processes_over_one_redis(tmp_path, database_url, redis_url, runtime) as (
        first,
        second,
    ):
        assert isinstance(second.cache, RedisCache)
        # The first near read starts the process listening; once it listens, copies are kept.
        assert (await current_login_settings(second)).methods.get("sms_code", True)
        async with asyncio.timeout(5):
            while not second.cache.near.listening:
                await asyncio.sleep(0.01)
        assert (await current_login_settings(second)).methods.get("sms_code", True)
        assert second.cache.near.get(LOGIN_SETTINGS_CACHE_KEY) is not None

        heard = second.cache.near.mark
        async with first.db.transaction() as session:
            await change_login_settings(
                session, methods={"sms_code": False}, now=runtime.clock.now(), changed_by=None
            )
        await first.cache.invalidate_tags(LOGIN_SETTINGS_TAG)
        async with asyncio.timeout(5):
            while second.cache.near.mark == heard:
                await asyncio.sleep(0.001)
        assert second.cache.near.get(LOGIN_SETTINGS_CACHE_KEY) is None
        assert not (await current_login_settings(second)).methods["sms_code"]
