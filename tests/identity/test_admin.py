"""Administration of users (``/api/v1/admin/users``): search through the blind index,
block and unblock, roles, sessions and security events; and `soko admin create`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import typer
from sqlalchemy import select, update
from typer.testing import CliRunner

from soko.app import create_app
from soko.identity.accounts import find_user_by_email, user_phone, user_roles
from soko.identity.admin_cli import admin_app
from soko.identity.models import AuditEvent, AuthSession, Role, User, UserStatus
from soko.identity.passwords import password_hasher
from soko.platform.cache import RedisCache
from soko.platform.clock import ManualClock
from soko.platform.config import Settings, ensure_secrets, load_settings
from soko.platform.runtime import Runtime
from tests.identity.admin_support import (
    ADMIN,
    API_KEYS,
    HOUR_SECONDS,
    add_user,
    answered_soon,
    audit_events,
    create_key,
    key_headers,
    problem_type,
)
from tests.identity.conftest import MakeUser

USERS = f"{ADMIN}/users"


# -- finding users -------------------------------------------------------------------------------


async def test_users_are_listed_newest_first_a_page_at_a_time(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    admin = await make_user(Role.admin)
    created = []
    for index in range(5):
        clock.advance(1)
        created.append(await add_user(runtime, email=f"member{index}@example.com"))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await client.get(USERS, headers=admin.headers, params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [str(user_id) for user_id in reversed(created)] + [str(admin.user_id)]


async def test_an_exact_email_or_phone_finds_the_user_through_the_blind_index(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    wanjiru = await add_user(runtime, email="wanjiru@example.com", phone="+254712345678")
    await add_user(runtime, email="wanjiru.k@example.com", phone="+254712345679")

    by_email = await client.get(
        USERS, headers=admin.headers, params={"email": "  Wanjiru@EXAMPLE.com "}
    )
    assert by_email.status_code == 200, by_email.text
    [item] = by_email.json()["items"]
    assert item["id"] == str(wanjiru)
    assert item["email"] == "wanjiru@example.com" and item["phone"] == "+254712345678"
    assert item["roles"] == ["customer"] and item["status"] == "active"

    by_phone = await client.get(USERS, headers=admin.headers, params={"phone": "+254712345678"})
    assert [item["id"] for item in by_phone.json()["items"]] == [str(wanjiru)]

    # Exact only: a part of an address finds nobody.
    partial = await client.get(USERS, headers=admin.headers, params={"email": "wanjiru@example"})
    assert partial.status_code == 422
    assert partial.json()["errors"][0]["in"] == "query"
    nobody = await client.get(USERS, headers=admin.headers, params={"email": "juma@example.com"})
    assert nobody.json() == {"items": [], "next_cursor": None}
    bad_phone = await client.get(USERS, headers=admin.headers, params={"phone": "12"})
    assert bad_phone.status_code == 422


async def test_users_are_filtered_by_status_and_role(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    seller = await add_user(runtime, email="duka@example.com", roles=(Role.customer, Role.seller))
    tutor = await add_user(runtime, email="tutor@example.com", roles=(Role.provider,))
    async with runtime.db.transaction() as session:
        await session.execute(
            update(User).where(User.id == tutor).values(status=UserStatus.blocked.value)
        )

    async def ids(**params: str) -> set[str]:
        response = await client.get(USERS, headers=admin.headers, params=params)
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["items"]}

    assert await ids(role="seller") == {str(seller)}
    assert await ids(role="admin") == {str(admin.user_id)}
    assert await ids(status="blocked") == {str(tutor)}
    assert await ids(status="blocked", role="seller") == set()
    assert (
        await client.get(USERS, headers=admin.headers, params={"role": "king"})
    ).status_code == 422


async def test_one_user_is_read_with_its_version(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    support = await make_user(Role.support)
    user_id = await add_user(runtime, email="amani@example.com", roles=(Role.seller,))
    response = await client.get(f"{USERS}/{user_id}", headers=support.headers)
    assert response.status_code == 200
    body = response.json()
    assert body["email"] == "amani@example.com" and body["roles"] == ["seller"]
    assert body["version"] == 1 and response.headers["etag"] == '"v1"'
    assert "password_hash" not in response.text
    missing = await client.get(f"{USERS}/{uuid.uuid4()}", headers=support.headers)
    assert missing.status_code == 404


# -- blocking ------------------------------------------------------------------------------------


async def test_blocking_refuses_the_users_tokens_at_once_and_revokes_sessions(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    target = await make_user(Role.seller)
    # The target's principal is now cached: blocking must not wait for the cache to expire.
    assert (await client.get(API_KEYS, headers=target.headers)).status_code == 200

    response = await client.post(
        f"{USERS}/{target.user_id}/block", headers=admin.headers, json={"reason": "fraud report"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "blocked"
    assert response.json()["version"] == 2 and response.headers["etag"] == '"v2"'

    refused = await client.get(API_KEYS, headers=target.headers)
    assert refused.status_code == 401
    async with runtime.db.transaction(read_only=True) as session:
        [auth_session] = (
            await session.scalars(select(AuthSession).where(AuthSession.user_id == target.user_id))
        ).all()
    assert auth_session.revoked_at is not None and auth_session.revoked_reason == "user_blocked"

    [event] = await audit_events(runtime, "admin.user_blocked")
    assert event.actor_id == admin.user_id and event.target_id == str(target.user_id)
    assert event.data == {"reason": "fraud report", "sessions_revoked": 1, "api_keys_revoked": 0}

    # Blocking a blocked user changes nothing and records nothing.
    again = await client.post(f"{USERS}/{target.user_id}/block", headers=admin.headers)
    assert again.status_code == 200 and again.json()["version"] == 2
    assert len(await audit_events(runtime, "admin.user_blocked")) == 1


async def test_unblocking_lets_the_user_sign_in_again_but_old_sessions_stay_revoked(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    target = await make_user(Role.customer)
    key = (await create_key(client, target.headers, ["account:self"]))["key"]
    assert (await client.get("/api/v1/me", headers=key_headers(key))).status_code == 200
    await client.post(f"{USERS}/{target.user_id}/block", headers=admin.headers)
    [blocked] = await audit_events(runtime, "admin.user_blocked")
    assert blocked.data["api_keys_revoked"] == 1
    response = await client.post(f"{USERS}/{target.user_id}/unblock", headers=admin.headers)
    assert response.status_code == 200
    assert response.json()["status"] == "active" and response.json()["version"] == 3
    assert (await client.get(API_KEYS, headers=target.headers)).status_code == 401
    # A key the block stopped stays stopped: it may be the one the block was for.
    assert (await client.get("/api/v1/me", headers=key_headers(key))).status_code == 401
    [event] = await audit_events(runtime, "admin.user_unblocked")
    assert event.actor_id == admin.user_id and event.target_id == str(target.user_id)
    # Unblocking an active user is a no-op.
    again = await client.post(f"{USERS}/{target.user_id}/unblock", headers=admin.headers)
    assert again.status_code == 200 and again.json()["version"] == 3


async def test_an_admin_cannot_block_themselves(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    response = await client.post(f"{USERS}/{admin.user_id}/block", headers=admin.headers)
    assert response.status_code == 409 and problem_type(response) == "conflict"
    assert (await client.get(f"{USERS}/{admin.user_id}", headers=admin.headers)).json()[
        "status"
    ] == "active"


async def test_a_deleted_account_cannot_be_blocked(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    gone = await add_user(runtime, email="gone@example.com")
    async with runtime.db.transaction() as session:
        await session.execute(
            update(User).where(User.id == gone).values(status=UserStatus.deleted.value)
        )
    response = await client.post(f"{USERS}/{gone}/block", headers=admin.headers)
    assert response.status_code == 409
    missing = await client.post(f"{USERS}/{uuid.uuid4()}/block", headers=admin.headers)
    assert missing.status_code == 404


async def test_a_stale_if_match_is_refused(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    target = await add_user(runtime, email="mwangi@example.com")
    await client.put(f"{USERS}/{target}/roles", headers=admin.headers, json={"roles": ["seller"]})
    stale = await client.post(
        f"{USERS}/{target}/block", headers={**admin.headers, "If-Match": '"v1"'}
    )
    assert stale.status_code == 412
    current = await client.post(
        f"{USERS}/{target}/block", headers={**admin.headers, "If-Match": '"v2"'}
    )
    assert current.status_code == 200 and current.json()["status"] == "blocked"


# -- roles ---------------------------------------------------------------------------------------


async def test_new_roles_apply_to_the_users_current_token_at_once(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    target = await make_user(Role.customer)
    assert (await client.get(USERS, headers=target.headers)).status_code == 403

    response = await client.put(
        f"{USERS}/{target.user_id}/roles",
        headers=admin.headers,
        json={"roles": ["operator", "customer", "operator"]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["roles"] == ["customer", "operator"]
    assert (await client.get(USERS, headers=target.headers)).status_code == 200

    [event] = await audit_events(runtime, "admin.roles_changed")
    assert event.actor_id == admin.user_id and event.target_id == str(target.user_id)
    assert event.data == {"before": ["customer"], "after": ["customer", "operator"]}

    # The same roles again record nothing.
    await client.put(
        f"{USERS}/{target.user_id}/roles",
        headers=admin.headers,
        json={"roles": ["customer", "operator"]},
    )
    assert len(await audit_events(runtime, "admin.roles_changed")) == 1


async def test_an_admin_cannot_remove_their_own_admin_role(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    refused = await client.put(
        f"{USERS}/{admin.user_id}/roles", headers=admin.headers, json={"roles": ["support"]}
    )
    assert refused.status_code == 409 and problem_type(refused) == "conflict"
    kept = await client.put(
        f"{USERS}/{admin.user_id}/roles",
        headers=admin.headers,
        json={"roles": ["admin", "support"]},
    )
    assert kept.status_code == 200 and kept.json()["roles"] == ["admin", "support"]
    # Another admin may demote them.
    other = await make_user(Role.admin)
    demoted = await client.put(
        f"{USERS}/{admin.user_id}/roles", headers=other.headers, json={"roles": ["support"]}
    )
    assert demoted.status_code == 200


async def test_roles_must_be_known_and_not_empty(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    target = await add_user(runtime, email="kip@example.com")
    for roles in ([], ["emperor"]):
        response = await client.put(
            f"{USERS}/{target}/roles", headers=admin.headers, json={"roles": roles}
        )
        assert response.status_code == 422, roles
    missing = await client.put(
        f"{USERS}/{uuid.uuid4()}/roles", headers=admin.headers, json={"roles": ["seller"]}
    )
    assert missing.status_code == 404


# -- sessions and security events ---------------------------------------------------------------


async def test_an_admin_sees_a_users_sessions_live_and_revoked(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    operator = await make_user(Role.operator)
    target = await make_user(Role.customer)
    response = await client.get(f"{USERS}/{target.user_id}/sessions", headers=operator.headers)
    assert response.status_code == 200
    [item] = response.json()["items"]
    assert item["id"] == str(target.tokens.session_id)
    assert item["device_name"] == "Chrome on Android" and item["revoked_at"] is None

    await client.post(f"{USERS}/{target.user_id}/block", headers=admin.headers)
    [item] = (
        await client.get(f"{USERS}/{target.user_id}/sessions", headers=operator.headers)
    ).json()["items"]
    assert item["revoked_reason"] == "user_blocked"
    live = await client.get(
        f"{USERS}/{target.user_id}/sessions", headers=operator.headers, params={"active": "true"}
    )
    assert live.json()["items"] == []
    missing = await client.get(f"{USERS}/{uuid.uuid4()}/sessions", headers=operator.headers)
    assert missing.status_code == 404


async def test_security_events_are_those_by_or_about_the_user(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    support = await make_user(Role.support)
    target = await make_user(Role.seller)
    bystander = await make_user(Role.seller)
    await create_key(client, target.headers, ["account:self"])
    await create_key(client, bystander.headers, ["account:self"])
    await client.post(f"{USERS}/{target.user_id}/block", headers=admin.headers)

    response = await client.get(
        f"{USERS}/{target.user_id}/security-events", headers=support.headers
    )
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [item["action"] for item in items] == ["admin.user_blocked", "api_key.created"]
    assert items[0]["actor_id"] == str(admin.user_id)
    assert items[1]["actor_id"] == str(target.user_id)

    operator = await make_user(Role.operator)
    refused = await client.get(
        f"{USERS}/{target.user_id}/security-events", headers=operator.headers
    )
    assert refused.status_code == 403


# -- across processes ------------------------------------------------------------------------------


@pytest.fixture
async def second_process(
    settings: Settings, clock: ManualClock, runtime: Runtime, redis_url: str, redis_namespace: str
) -> AsyncIterator[httpx2.AsyncClient]:
    """Another API process over the same database, both caching principals in one Redis:
    the test's own ``runtime`` and a second one, each with its own app."""
    from redis.asyncio import Redis

    other = Runtime(settings, clock=clock)
    first_redis, second_redis = Redis.from_url(redis_url), Redis.from_url(redis_url)
    # Near copies kept past answered_soon's wait: only an invalidation heard ends them.
    runtime.cache = RedisCache(first_redis, namespace=redis_namespace, clock=clock)
    other.cache = RedisCache(
        second_redis, namespace=redis_namespace, clock=clock, near_seconds=HOUR_SECONDS
    )
    transport = httpx2.ASGITransport(app=create_app(runtime=other))
    try:
        async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c
    finally:
        await other.stop()
        await first_redis.aclose()


async def test_a_role_change_and_a_block_reach_every_process(
    client: httpx2.AsyncClient, second_process: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    target = await make_user(Role.operator)
    # The second process caches the target's principal in the shared cache...
    assert (await second_process.get(USERS, headers=target.headers)).status_code == 200
    # ...a role change made through the first invalidates it...
    await client.put(
        f"{USERS}/{target.user_id}/roles", headers=admin.headers, json={"roles": ["customer"]}
    )
    assert await answered_soon(second_process, USERS, target.headers, 403) == 403
    # ...and so does a block.
    await client.post(f"{USERS}/{target.user_id}/block", headers=admin.headers)
    assert await answered_soon(second_process, API_KEYS, target.headers, 401) == 401


# -- `soko admin create` ----------------------------------------------------------------------


CLI_PASSWORD = "baobab-shade-at-noon"


@pytest.fixture
def cli_env(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The environment of a `soko` run over an empty, migrated database.

    ``database_url`` gives each backend an empty schema and cleans up after the test."""
    env = {
        "SOKO_DATABASE_URL": database_url,
        "SOKO_DATA_DIR": str(tmp_path / "data"),
        "SOKO_ENV": "development",
        "COLUMNS": "200",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env


def _soko(*args: str, stdin: str = "") -> Any:
    app = typer.Typer()
    app.add_typer(admin_app, name="admin")
    return CliRunner().invoke(app, ["admin", *args], input=stdin)


def _stored(email: str) -> dict[str, Any]:
    """What the database holds about the account, read with the same settings."""

    async def read() -> dict[str, Any]:
        runtime = Runtime(ensure_secrets(load_settings()))
        try:
            async with runtime.db.transaction(read_only=True) as session:
                user = await find_user_by_email(session, runtime.data_keys, email)
                users = len((await session.scalars(select(User))).all())
                if user is None:
                    return {"users": users}
                events = (
                    await session.scalars(
                        select(AuditEvent).where(AuditEvent.action == "admin.created")
                    )
                ).all()
                ok, _ = await password_hasher(runtime).verify(CLI_PASSWORD, user.password_hash)
                return {
                    "users": users,
                    "user": user,
                    "phone": user_phone(runtime.data_keys, user),
                    "roles": await user_roles(session, user.id),
                    "password_ok": ok,
                    "events": [(e.actor_id, e.target_id) for e in events],
                }
        finally:
            password_hasher(runtime).close()
            await runtime.stop()

    return asyncio.run(read())


def test_cli_creates_an_admin_with_a_password_typed_twice(cli_env: dict[str, str]) -> None:
    result = _soko(
        "create",
        "--email",
        "Zawadi@Example.com",
        "--phone",
        "+254 712 345 678",
        "--display-name",
        "Zawadi Mwangi",
        stdin=f"{CLI_PASSWORD}\n{CLI_PASSWORD}\n",
    )
    assert result.exit_code == 0, result.output
    assert "administrator created: zawadi@example.com" in result.output
    assert CLI_PASSWORD not in result.output

    stored = _stored("zawadi@example.com")
    user = stored["user"]
    assert stored["roles"] == {"admin"}
    assert stored["password_ok"]
    assert stored["phone"] == "+254712345678"
    assert user.display_name == "Zawadi Mwangi" and user.status == "active"
    assert user.email_verified_at is not None
    assert stored["events"] == [(None, str(user.id))]


def test_cli_reads_the_password_from_stdin_for_scripts(cli_env: dict[str, str]) -> None:
    result = _soko("create", "--email", "ops@example.com", "--password-stdin", stdin=CLI_PASSWORD)
    assert result.exit_code == 0, result.output
    assert "Password" not in result.output  # no prompt
    assert _stored("ops@example.com")["password_ok"]


def test_cli_asks_again_when_the_two_passwords_differ(cli_env: dict[str, str]) -> None:
    result = _soko(
        "create",
        "--email",
        "ops@example.com",
        stdin=f"{CLI_PASSWORD}\nsomething-else-entirely\n{CLI_PASSWORD}\n{CLI_PASSWORD}\n",
    )
    assert result.exit_code == 0, result.output
    assert "do not match" in result.output
    assert _stored("ops@example.com")["password_ok"]


def test_cli_refuses_an_existing_account(cli_env: dict[str, str]) -> None:
    first = _soko("create", "--email", "ops@example.com", "--password-stdin", stdin=CLI_PASSWORD)
    assert first.exit_code == 0, first.output
    # The check comes before the password is asked for.
    again = _soko("create", "--email", "OPS@example.com")
    assert again.exit_code == 1
    assert "already uses this email" in again.output
    assert "Password" not in again.output
    assert _stored("ops@example.com")["users"] == 1


def test_cli_refuses_a_weak_password(cli_env: dict[str, str]) -> None:
    for weak in ("short", "password123", "ops@example.com"):
        result = _soko("create", "--email", "ops@example.com", "--password-stdin", stdin=weak)
        assert result.exit_code == 1, weak
        assert "password not accepted" in result.output
    assert _stored("ops@example.com") == {"users": 0}


def test_cli_treats_a_malformed_email_or_phone_as_is_a_usage_error(cli_env: dict[str, str]) -> None:
    for args in (["--email", "not-an-email"], ["--email", "a@example.com", "--phone", "12"]):
        result = _soko("create", *args, "--password-stdin", stdin=CLI_PASSWORD)
        assert result.exit_code == 2, result.output
    assert _stored("a@example.com") == {"users": 0}
