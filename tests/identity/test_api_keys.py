"""API keys (``/api/v1/me/api-keys``): shown once, stored hashed, scoped, revocable."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import httpx2
from sqlalchemy import select

from soko.identity.api_keys import new_api_key
from soko.identity.models import ApiKey, Role
from soko.identity.permissions import ACCOUNT_SELF, AUDIT_READ, USERS_MANAGE, USERS_READ
from soko.identity.sessions import hash_secret
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.identity.admin_support import (
    ADMIN,
    API_KEYS,
    LOGIN_METHODS,
    audit_events,
    create_key,
    key_headers,
    problem_type,
)
from tests.identity.conftest import MakeUser

KEY_SHAPE = re.compile(r"^soko_[a-z2-7]{8}_[A-Za-z0-9-]{43}$")


def test_new_keys_split_into_three_parts_and_never_repeat() -> None:
    keys = [new_api_key() for _ in range(500)]
    for key, prefix in keys:
        assert KEY_SHAPE.match(key), key
        assert key.split("_")[0:2] == prefix.split("_")
        assert len(key.split("_")) == 3
    assert len({key for key, _ in keys}) == len({prefix for _, prefix in keys}) == 500


async def test_a_key_is_shown_once_and_stored_only_as_its_hash(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    owner = await make_user(Role.customer)
    created = await create_key(client, owner.headers, [ACCOUNT_SELF], name="  shop sync  ")
    key = created["key"]
    assert KEY_SHAPE.match(key)
    assert created["prefix"] == "_".join(key.split("_")[:2])
    assert created["name"] == "shop sync"
    assert created["permissions"] == [ACCOUNT_SELF]
    assert created["revoked_at"] is None and created["last_used_at"] is None

    async with runtime.db.transaction(read_only=True) as session:
        row = await session.get(ApiKey, uuid.UUID(created["id"]))
    assert row is not None and row.user_id == owner.user_id
    assert row.key_hash == hash_secret(key)
    assert key not in (row.prefix, row.key_hash, row.name)

    listed = await client.get(API_KEYS, headers=owner.headers)
    assert listed.status_code == 200
    [item] = listed.json()["items"]
    assert item["id"] == created["id"] and item["prefix"] == created["prefix"]
    assert "key" not in item
    assert key.split("_")[2] not in listed.text

    [event] = await audit_events(runtime, "api_key.created")
    assert event.actor_id == owner.user_id and event.target_id == created["id"]
    assert event.data["prefix"] == created["prefix"]
    assert key.split("_")[2] not in str(event.data)


async def test_a_user_lists_only_their_own_keys(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    alice, bob = await make_user(Role.seller), await make_user(Role.seller)
    await create_key(client, alice.headers, [ACCOUNT_SELF], name="alice's")
    await create_key(client, bob.headers, [ACCOUNT_SELF], name="bob's")
    names = [
        item["name"] for item in (await client.get(API_KEYS, headers=bob.headers)).json()["items"]
    ]
    assert names == ["bob's"]


async def test_a_key_authenticates_with_only_its_permissions(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    admin = await make_user(Role.admin)
    key = (await create_key(client, admin.headers, [USERS_READ]))["key"]

    assert (await client.get(f"{ADMIN}/users", headers=key_headers(key))).status_code == 200
    # The owner may change login methods; the key was not given that permission.
    refused = await client.get(LOGIN_METHODS, headers=key_headers(key))
    assert refused.status_code == 403 and problem_type(refused) == "forbidden"
    blocked = await client.post(f"{ADMIN}/users/{uuid.uuid4()}/block", headers=key_headers(key))
    assert blocked.status_code == 403
    # Not even the owner's own account routes: account:self was not granted either.
    assert (await client.get(API_KEYS, headers=key_headers(key))).status_code == 403
    # Nor anything else done in the owner's name on routes that name no permission:
    # shopping, orders, applying for a store.
    # A public route serves it as anyone: the cart it opens is not the owner's.
    cart = await client.post("/api/v1/carts", json={}, headers=key_headers(key))
    assert cart.status_code == 201 and cart.json()["token"] is not None
    for method, path, body in (
        ("GET", "/api/v1/orders", None),
        ("POST", "/api/v1/sellers", {"name": "Key Shop", "slug": "key-shop"}),
        ("GET", "/api/v1/me", None),
    ):
        answer = await client.request(method, path, json=body, headers=key_headers(key))
        assert answer.status_code == 403, (path, answer.text)
        assert "'account:self'" in answer.json()["detail"]


# What a leaked key must not do even with account:self: each of these answers 403 to a key
# and is done from a signed-in session.
SESSION_ONLY_ROUTES = (
    ("PATCH", "/api/v1/seller/profile", {"payout_details": {"mpesa_number": "+254700000666"}}),
    ("POST", "/api/v1/seller/invitations", {"address": "someone@soko.example", "role": "owner"}),
    ("DELETE", f"/api/v1/seller/invitations/{uuid.uuid4()}", None),
    ("POST", f"/api/v1/me/store-invitations/{uuid.uuid4()}/accept", None),
    ("POST", f"/api/v1/me/store-invitations/{uuid.uuid4()}/decline", None),
    ("PATCH", f"/api/v1/seller/members/{uuid.uuid4()}", {"role": "owner"}),
    ("DELETE", f"/api/v1/seller/members/{uuid.uuid4()}", None),
    ("POST", "/api/v1/webhooks/endpoints", {"url": "https://hooks.example.com/x"}),
    ("PATCH", f"/api/v1/webhooks/endpoints/{uuid.uuid4()}", {"url": "https://evil.example/x"}),
    ("POST", "/api/v1/me/password", {"current_password": "x" * 12, "new_password": "y" * 12}),
    ("POST", "/api/v1/me/sessions/revoke-all", None),
    ("DELETE", f"/api/v1/me/sessions/{uuid.uuid4()}", None),
)


async def test_a_key_acts_for_its_owner_but_not_where_a_session_is_needed(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    seller = await make_user(Role.seller)
    key = (await create_key(client, seller.headers, [ACCOUNT_SELF]))["key"]
    assert (await client.get("/api/v1/me", headers=key_headers(key))).status_code == 200
    assert (await client.post("/api/v1/carts", json={}, headers=key_headers(key))).status_code in (
        200,
        201,
    )
    for method, path, body in SESSION_ONLY_ROUTES:
        with_key = await client.request(method, path, json=body, headers=key_headers(key))
        assert with_key.status_code == 403, (path, with_key.text)
        assert "signed-in session" in with_key.json()["detail"], path
        # The session itself is not refused for being one (whatever the route then says).
        with_session = await client.request(method, path, json=body, headers=seller.headers)
        assert "signed-in session" not in with_session.text, path


async def test_a_key_records_when_it_was_last_used(
    client: httpx2.AsyncClient, make_user: MakeUser, clock: ManualClock
) -> None:
    owner = await make_user(Role.customer)
    key = (await create_key(client, owner.headers, [ACCOUNT_SELF]))["key"]
    clock.advance(dt.timedelta(minutes=5))
    assert (await client.get(API_KEYS, headers=key_headers(key))).status_code == 200
    [item] = (await client.get(API_KEYS, headers=owner.headers)).json()["items"]
    assert dt.datetime.fromisoformat(item["last_used_at"]) == clock.now()


async def test_permissions_beyond_the_callers_own_are_refused(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    support = await make_user(Role.support)
    for asked in ([USERS_MANAGE], [USERS_READ, USERS_MANAGE], ["orders:refund"], []):
        response = await client.post(
            API_KEYS, headers=support.headers, json={"name": "too much", "permissions": asked}
        )
        assert response.status_code == 422, response.text
        assert problem_type(response) == "validation-error"
        assert response.json()["errors"][0]["field"] == "permissions"
    # Everything the support role holds is fine.
    await create_key(client, support.headers, [USERS_READ, AUDIT_READ, ACCOUNT_SELF])
    async with runtime.db.transaction(read_only=True) as session:
        count = len((await session.scalars(select(ApiKey))).all())
    assert count == 1


async def test_an_expiry_in_the_past_is_refused(
    client: httpx2.AsyncClient, make_user: MakeUser, clock: ManualClock
) -> None:
    owner = await make_user(Role.customer)
    response = await client.post(
        API_KEYS,
        headers=owner.headers,
        json={
            "name": "old",
            "permissions": [ACCOUNT_SELF],
            "expires_at": (clock.now() - dt.timedelta(seconds=1)).isoformat(),
        },
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "expires_at"


async def test_an_expired_key_is_refused(
    client: httpx2.AsyncClient, make_user: MakeUser, clock: ManualClock
) -> None:
    owner = await make_user(Role.customer)
    expires = clock.now() + dt.timedelta(hours=1)
    key = (await create_key(client, owner.headers, [ACCOUNT_SELF], expires_at=expires.isoformat()))[
        "key"
    ]
    clock.set(expires - dt.timedelta(seconds=1))
    assert (await client.get(API_KEYS, headers=key_headers(key))).status_code == 200
    clock.set(expires)
    refused = await client.get(API_KEYS, headers=key_headers(key))
    assert refused.status_code == 401 and problem_type(refused) == "invalid-api-key"


async def test_a_revoked_key_is_refused_at_once(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    owner = await make_user(Role.customer)
    created = await create_key(client, owner.headers, [ACCOUNT_SELF])
    key = created["key"]
    assert (await client.get(API_KEYS, headers=key_headers(key))).status_code == 200

    revoked = await client.delete(f"{API_KEYS}/{created['id']}", headers=owner.headers)
    assert revoked.status_code == 204
    refused = await client.get(API_KEYS, headers=key_headers(key))
    assert refused.status_code == 401 and problem_type(refused) == "invalid-api-key"
    [item] = (await client.get(API_KEYS, headers=owner.headers)).json()["items"]
    assert item["revoked_at"] is not None

    # Revoking again answers the same and records nothing more.
    again = await client.delete(f"{API_KEYS}/{created['id']}", headers=owner.headers)
    assert again.status_code == 204
    [event] = await audit_events(runtime, "api_key.revoked")
    assert event.actor_id == owner.user_id and event.target_id == created["id"]


async def test_someone_elses_key_cannot_be_revoked(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    owner, other = await make_user(Role.customer), await make_user(Role.customer)
    created = await create_key(client, owner.headers, [ACCOUNT_SELF])
    response = await client.delete(f"{API_KEYS}/{created['id']}", headers=other.headers)
    assert response.status_code == 404
    missing = await client.delete(f"{API_KEYS}/{uuid.uuid4()}", headers=other.headers)
    assert missing.status_code == 404
    assert response.json()["type"] == missing.json()["type"] == "/problems/not-found"
    assert (await client.get(API_KEYS, headers=key_headers(created["key"]))).status_code == 200


async def test_a_forged_secret_behind_a_real_prefix_is_refused(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    owner = await make_user(Role.customer)
    key = (await create_key(client, owner.headers, [ACCOUNT_SELF]))["key"]
    prefix, _, secret = key.rpartition("_")
    forged = f"{prefix}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"
    for bad in (forged, f"{prefix}_", f"{key}_extra", "soko_"):
        response = await client.get(API_KEYS, headers=key_headers(bad))
        assert response.status_code == 401, bad
        assert problem_type(response) == "invalid-api-key"


async def test_a_key_cannot_create_keys(client: httpx2.AsyncClient, make_user: MakeUser) -> None:
    owner = await make_user(Role.customer)
    key = (await create_key(client, owner.headers, [ACCOUNT_SELF]))["key"]
    response = await client.post(
        API_KEYS, headers=key_headers(key), json={"name": "child", "permissions": [ACCOUNT_SELF]}
    )
    assert response.status_code == 403


async def test_a_key_loses_what_its_owner_loses(
    client: httpx2.AsyncClient, make_user: MakeUser
) -> None:
    admin, operator = await make_user(Role.admin), await make_user(Role.operator)
    key = (await create_key(client, operator.headers, [USERS_READ]))["key"]
    assert (await client.get(f"{ADMIN}/users", headers=key_headers(key))).status_code == 200

    demoted = await client.put(
        f"{ADMIN}/users/{operator.user_id}/roles",
        headers=admin.headers,
        json={"roles": ["customer"]},
    )
    assert demoted.status_code == 200, demoted.text
    assert (await client.get(f"{ADMIN}/users", headers=key_headers(key))).status_code == 403

    blocked = await client.post(f"{ADMIN}/users/{operator.user_id}/block", headers=admin.headers)
    assert blocked.status_code == 200
    refused = await client.get(API_KEYS, headers=key_headers(key))
    assert refused.status_code == 401 and problem_type(refused) == "invalid-api-key"
