"""The account holder's profile (``/api/v1/me``) and the public signing keys."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid

import httpx2
import jwt
import pytest
from sqlalchemy import select

from soko.identity.models import Role, TotpFactor, User, UserRole
from soko.platform.runtime import Runtime
from tests.identity.me_support import make_account

ME = "/api/v1/me"


async def test_me_shows_the_account_with_email_and_phone_in_clear(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(
        runtime,
        email="wanjiru@example.com",
        phone="+254712345678",
        roles=(Role.customer, Role.seller),
    )
    response = await client.get(ME, headers=account.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        "id": str(account.user_id),
        "email": "wanjiru@example.com",
        "email_verified": True,
        "phone": "+254712345678",
        "phone_verified": True,
        "display_name": "Amina Njeri",
        "status": "active",
        "roles": ["customer", "seller"],
        "mfa_enabled": False,
        "created_at": body["created_at"],
    }
    assert dt.datetime.fromisoformat(body["created_at"]) == runtime.clock.now()
    assert response.headers["etag"] == '"v1"'
    assert response.headers["cache-control"] == "private, no-cache"
    assert "password_hash" not in response.text


async def test_me_reports_mfa_only_once_confirmed(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    async with runtime.db.transaction() as session:
        session.add(
            TotpFactor(
                user_id=account.user_id,
                secret_ciphertext="not-read-here",
                created_at=runtime.clock.now(),
            )
        )
    assert (await client.get(ME, headers=account.headers)).json()["mfa_enabled"] is False
    async with runtime.db.transaction() as session:
        factor = await session.get(TotpFactor, account.user_id)
        assert factor is not None
        factor.confirmed_at = runtime.clock.now()
    assert (await client.get(ME, headers=account.headers)).json()["mfa_enabled"] is True


async def test_me_answers_304_while_unchanged(client: httpx2.AsyncClient, runtime: Runtime) -> None:
    account = await make_account(runtime)
    first = await client.get(ME, headers=account.headers)
    again = await client.get(
        ME, headers={**account.headers, "If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    assert again.content == b""
    changed = await client.patch(
        ME, headers=account.headers, json={"display_name": "Amina W. Njeri"}
    )
    assert changed.status_code == 200
    stale = await client.get(
        ME, headers={**account.headers, "If-None-Match": first.headers["etag"]}
    )
    assert stale.status_code == 200
    assert stale.json()["display_name"] == "Amina W. Njeri"


async def test_me_needs_a_signed_in_caller(client: httpx2.AsyncClient) -> None:
    for method, path in (
        ("GET", ME),
        ("PATCH", ME),
        ("DELETE", ME),
        ("POST", f"{ME}/password"),
        ("GET", f"{ME}/sessions"),
        ("DELETE", f"{ME}/sessions/{uuid.uuid4()}"),
        ("POST", f"{ME}/sessions/revoke-all"),
    ):
        response = await client.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.headers["content-type"] == "application/problem+json"


async def test_patch_changes_the_display_name_and_the_version(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    runtime_clock_before = runtime.clock.now()
    response = await client.patch(
        ME,
        headers={**account.headers, "If-Match": '"v1"'},
        json={"display_name": "  Amina Wanjiru  "},
    )
    assert response.status_code == 200, response.text
    assert response.json()["display_name"] == "Amina Wanjiru"
    assert response.headers["etag"] == '"v2"'
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, account.user_id)
        assert user is not None
        assert (user.display_name, user.version) == ("Amina Wanjiru", 2)
        assert user.updated_at == runtime_clock_before
    read = await client.get(ME, headers=account.headers)
    assert read.headers["etag"] == '"v2"'
    assert read.json()["display_name"] == "Amina Wanjiru"


async def test_patch_with_a_stale_if_match_is_refused(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    first = await client.patch(
        ME, headers={**account.headers, "If-Match": '"v1"'}, json={"display_name": "First"}
    )
    assert first.status_code == 200
    second = await client.patch(
        ME, headers={**account.headers, "If-Match": '"v1"'}, json={"display_name": "Second"}
    )
    assert second.status_code == 412
    assert second.json()["type"] == "/problems/precondition-failed"
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, account.user_id)
        assert user is not None
        assert (user.display_name, user.version) == ("First", 2)


@pytest.mark.parametrize(
    "extra",
    [
        {"roles": ["admin"]},
        {"role": "admin"},
        {"status": "active"},
        {"email_verified": True},
        {"phone_verified": True},
        {"email": "someone.else@example.com"},
        {"id": "00000000-0000-7000-8000-000000000001"},
    ],
    ids=lambda extra: next(iter(extra)),
)
async def test_patch_refuses_fields_the_owner_may_not_set(
    client: httpx2.AsyncClient, runtime: Runtime, extra: dict[str, object]
) -> None:
    account = await make_account(runtime)
    response = await client.patch(
        ME, headers=account.headers, json={"display_name": "Sneaky", **extra}
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"] == "/problems/validation-error"
    assert any(next(iter(extra)) in str(error) for error in body["errors"])
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, account.user_id)
        assert user is not None
        assert (user.display_name, user.version) == ("Amina Njeri", 1)
        roles = (
            await session.scalars(select(UserRole.role).where(UserRole.user_id == user.id))
        ).all()
        assert roles == ["customer"]


@pytest.mark.parametrize("display_name", ["", "   ", "x" * 121])
async def test_patch_refuses_a_blank_or_overlong_name(
    client: httpx2.AsyncClient, runtime: Runtime, display_name: str
) -> None:
    account = await make_account(runtime)
    response = await client.patch(ME, headers=account.headers, json={"display_name": display_name})
    assert response.status_code == 422


# -- JWKS -------------------------------------------------------------------------------------


async def test_jwks_verifies_an_access_token_issued_at_sign_in(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "public, max-age=300"
    keys = response.json()["keys"]
    assert keys and all("d" not in key for key in keys), "a private member was published"
    kid = jwt.get_unverified_header(account.pair.access_token)["kid"]
    (published,) = [key for key in keys if key["kid"] == kid]
    verifying_key = jwt.PyJWK(published)
    settings = runtime.settings
    claims = jwt.decode(
        account.pair.access_token,
        verifying_key.key,
        algorithms=[published["alg"]],
        audience=settings.token_audience,
        issuer=settings.effective_token_issuer,
        # Times are checked against the test clock below, not against the wall clock.
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert claims["sub"] == str(account.user_id)
    assert claims["sid"] == str(account.pair.session_id)
    now = runtime.clock.now().timestamp()
    assert claims["iat"] <= now < claims["exp"]
    # A token whose claims were altered after signing does not verify with the key.
    header, payload, signature = account.pair.access_token.split(".")
    altered = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    altered["roles"] = ["admin"]
    forged_payload = base64.urlsafe_b64encode(json.dumps(altered).encode()).rstrip(b"=")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            f"{header}.{forged_payload.decode()}.{signature}",
            verifying_key.key,
            algorithms=[published["alg"]],
            audience=settings.token_audience,
            issuer=settings.effective_token_issuer,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )


async def test_jwks_is_public(client: httpx2.AsyncClient, runtime: Runtime) -> None:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.json() == runtime.signing_keys.jwks(runtime.clock)
