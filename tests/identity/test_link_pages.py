"""The pages the links in emails open when the marketplace has none of its own:
``/verify-email`` and ``/reset-password`` (and where ``SOKO_APP_URL`` sends them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import pytest

from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.conftest import make_settings
from tests.identity.signin_support import (
    AUTH,
    NEW_PASSWORD,
    PASSWORD,
    audit_events,
    load_user,
    login,
    mailed,
    mailed_token,
    new_email,
    register,
)

FORM = {"content-type": "application/x-www-form-urlencoded"}


def _assert_plain_page(response: httpx2.Response, *, form: bool) -> None:
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert ("form-action 'self'" if form else "form-action 'none'") in csp
    assert "<script" not in response.text


async def _forgot(client: httpx2.AsyncClient, email: str) -> None:
    response = await client.post(f"{AUTH}/password/forgot", json={"identifier": email})
    assert response.status_code == 202


async def test_opening_a_verification_link_changes_nothing_until_the_button(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    tokens = (await register(client, email)).json()
    token = await mailed_token(runtime, email, "verify-email")

    # Mail scanners and link previews fetch the link: it must not spend the token.
    for _ in range(2):
        page = await client.get("/verify-email", params={"token": token})
        assert page.status_code == 200
        _assert_plain_page(page, form=True)
        assert f'name="token" value="{token}"' in page.text
    assert (await load_user(runtime, tokens["user_id"])).email_verified_at is None

    confirmed = await client.post("/verify-email", content=f"token={token}", headers=FORM)
    assert confirmed.status_code == 200, confirmed.text
    assert "Email address confirmed" in confirmed.text
    _assert_plain_page(confirmed, form=False)
    assert (await load_user(runtime, tokens["user_id"])).email_verified_at == runtime.clock.now()
    assert len(await audit_events(runtime, "account.email_verified")) == 1

    # Single use, as through the API.
    again = await client.post("/verify-email", content=f"token={token}", headers=FORM)
    assert again.status_code == 400
    assert "Email not confirmed" in again.text
    assert "expire" in again.text


async def test_a_reset_page_sets_the_password_and_signs_every_session_out(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    tokens = (await register(client, email)).json()
    await _forgot(client, email)
    token = await mailed_token(runtime, email, "reset-password")

    page = await client.get("/reset-password", params={"token": token})
    assert page.status_code == 200
    _assert_plain_page(page, form=True)
    assert 'autocomplete="new-password"' in page.text
    assert f'minlength="{runtime.settings.password_min_length}"' in page.text

    # Two different passwords, then one the policy refuses: the link stays good.
    differ = await client.post(
        "/reset-password",
        data={"token": token, "new_password": NEW_PASSWORD, "repeat": NEW_PASSWORD + "x"},
    )
    assert differ.status_code == 422
    assert "differ" in differ.text
    assert f'value="{token}"' in differ.text  # the form again, ready for another try
    weak = await client.post(
        "/reset-password", data={"token": token, "new_password": email, "repeat": email}
    )
    assert weak.status_code == 422
    assert 'class="error"' in weak.text
    assert (await login(client, email, PASSWORD)).status_code == 200

    done = await client.post(
        "/reset-password",
        data={"token": token, "new_password": NEW_PASSWORD, "repeat": NEW_PASSWORD},
    )
    assert done.status_code == 200, done.text
    assert "Password changed" in done.text
    refresh = await client.post(f"{AUTH}/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refresh.status_code == 401
    assert (await login(client, email, PASSWORD)).status_code == 401
    assert (await login(client, email, NEW_PASSWORD)).status_code == 200
    assert len(await audit_events(runtime, "auth.password_reset")) == 1

    spent = await client.post(
        "/reset-password",
        data={
            "token": token,
            "new_password": "yet-another-passphrase-9",
            "repeat": "yet-another-passphrase-9",
        },
    )
    assert spent.status_code == 400
    assert (await login(client, email, NEW_PASSWORD)).status_code == 200


@pytest.mark.parametrize("path", ["/verify-email", "/reset-password"])
async def test_the_pages_refuse_what_their_forms_never_send(
    client: httpx2.AsyncClient, path: str
) -> None:
    missing = await client.get(path)
    assert missing.status_code == 400
    assert "no token" in missing.text
    hostile = '"><script>alert(1)</script>'
    page = await client.get(path, params={"token": hostile})
    assert page.status_code == 200
    assert "<script>" not in page.text
    assert "&quot;&gt;&lt;script&gt;" in page.text
    too_long = await client.get(path, params={"token": "x" * 257})
    assert too_long.status_code == 422

    for body, headers in (
        ('{"token": "abc"}', {"content-type": "application/json"}),
        ("token=a&token=b", FORM),
        ("new_password=x", FORM),
        ("token=" + "x" * 300, FORM),
    ):
        refused = await client.post(path, content=body, headers=headers)
        assert refused.status_code == 422, body
        assert refused.headers["content-type"].startswith("text/html")
    unknown = await client.post(
        path, data={"token": "pr_unknown", "new_password": NEW_PASSWORD, "repeat": NEW_PASSWORD}
    )
    assert unknown.status_code == 400


async def test_links_lead_to_the_app_url_when_one_is_set(
    tmp_path: Path, database_url: str, clock: ManualClock
) -> None:
    from soko.app import create_app

    settings = make_settings(
        tmp_path, database_url=database_url, app_url="https://shop.example/account/"
    )
    assert settings.effective_app_url == "https://shop.example/account"
    runtime = Runtime(settings, clock=clock)
    try:
        transport = httpx2.ASGITransport(app=create_app(runtime=runtime))
        async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
            email = new_email()
            assert (await register(c, email)).status_code == 201
            await _forgot(c, email)
            texts: list[Any] = [m["text"] for m in await mailed(runtime, email)]
    finally:
        await runtime.stop()
    assert any("https://shop.example/account/verify-email?token=ev_" in t for t in texts)
    assert any("https://shop.example/account/reset-password?token=pr_" in t for t in texts)
    assert not any(settings.public_url in t for t in texts)


async def test_the_store_invitations_page_says_how_to_answer(client: httpx2.AsyncClient) -> None:
    page = await client.get("/store-invitations")
    assert page.status_code == 200
    _assert_plain_page(page, form=False)
    assert "/api/v1/me/store-invitations" in page.text


async def test_the_order_page_says_where_the_order_is(client: httpx2.AsyncClient) -> None:
    order_id = "01a251dc-1a84-7619-bae9-4e96e25495bf"
    page = await client.get(f"/orders/{order_id}")
    assert page.status_code == 200
    _assert_plain_page(page, form=False)
    assert f"/api/v1/orders/{order_id}" in page.text
    assert (await client.get("/orders/not-an-id")).status_code == 422
