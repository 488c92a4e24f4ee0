"""The sandbox's hosted page and the webhooks it sends, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from soko.app import create_app
from soko.payments.providers.base import StartedPayment
from soko.payments.providers.sandbox import SandboxProvider
from soko.payments.sandbox_models import SandboxCharge
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.conftest import make_settings
from tests.identity.test_route_matrix import walk_routes
from tests.payments.test_sandbox_support import (
    a_payment,
    drain,
    install_inbound,
    page_path,
    queued_deliveries,
)

FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture
def sandbox(runtime: Runtime) -> SandboxProvider:
    return SandboxProvider(runtime)


async def _open(runtime: Runtime, sandbox: SandboxProvider, **payment: object) -> StartedPayment:
    started = await sandbox.start(a_payment(**payment))  # type: ignore[arg-type]
    await drain(runtime)
    return started


async def _charge(runtime: Runtime, started: StartedPayment) -> SandboxCharge:
    async with runtime.db.transaction(read_only=True) as session:
        charge = await session.get(SandboxCharge, uuid.UUID(started.provider_payment_id))
    assert charge is not None
    return charge


def _choose(outcome: str, **options: str) -> str:
    from urllib.parse import urlencode

    return urlencode({"outcome": outcome, **options})


async def test_the_page_shows_the_charge_and_escapes_everything(
    runtime: Runtime, sandbox: SandboxProvider, client: httpx2.AsyncClient
) -> None:
    started = await _open(
        runtime,
        sandbox,
        amount_minor=1_234_550,
        description='<script>alert("x")</script> & "quotes"',
    )
    response = await client.get(page_path(started.url))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "KES 12,345.50" in html
    assert "pay-0001" in html
    assert "<script" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in html
    for outcome in ("succeeded", "failed", "abandoned"):
        assert f'name="outcome" value="{outcome}"' in html
    assert 'name="delay_seconds"' in html and 'name="duplicates"' in html
    assert 'name="stale_pending"' in html
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "script-src" not in csp
    assert "form-action 'self' https://shop.example" in csp
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"


async def test_three_digit_and_zero_digit_currencies_are_shown_in_major_units(
    runtime: Runtime, sandbox: SandboxProvider, client: httpx2.AsyncClient
) -> None:
    kwd = await _open(runtime, sandbox, reference="pay-kwd", amount_minor=1_500, currency="KWD")
    ugx = await _open(runtime, sandbox, reference="pay-ugx", amount_minor=25_000, currency="UGX")
    assert "KWD 1.500" in (await client.get(page_path(kwd.url))).text
    assert "UGX 25,000<" in (await client.get(page_path(ugx.url))).text


@pytest.mark.parametrize(
    "path",
    [
        "/sandbox/pay/" + "A" * 43,  # well formed, unknown
        "/sandbox/pay/short",
        "/sandbox/pay/" + "A" * 42 + "%3C",
    ],
)
async def test_an_unknown_page_is_404_for_get_and_post(
    client: httpx2.AsyncClient, path: str
) -> None:
    assert (await client.get(path)).status_code == 404
    response = await client.post(path, content=_choose("succeeded"), headers=FORM)
    assert response.status_code == 404
    assert "not valid" in response.text


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "abandoned"])
async def test_a_choice_decides_the_charge_once_and_queues_its_webhook(
    runtime: Runtime,
    sandbox: SandboxProvider,
    client: httpx2.AsyncClient,
    clock: ManualClock,
    outcome: str,
) -> None:
    inbound = install_inbound(runtime, sandbox)
    started = await _open(runtime, sandbox)
    response = await client.post(
        page_path(started.url), content=_choose(outcome, delay_seconds="30"), headers=FORM
    )
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert location.netloc == "shop.example" and location.path == "/checkout/done"
    assert parse_qs(location.query) == {
        "from": ["sandbox"],
        "reference": ["pay-0001"],
        "status": [outcome],
    }
    charge = await _charge(runtime, started)
    assert charge.status == outcome and charge.decided_at == clock.now()

    queued = await queued_deliveries(runtime)
    assert len(queued) == 1
    assert queued[0].available_at == clock.now() + dt.timedelta(seconds=30)
    body = json.loads(queued[0].payload["body"])
    assert body["type"] == f"charge.{outcome}"
    assert body["data"] == {
        "charge_id": started.provider_payment_id,
        "reference": "pay-0001",
        "status": outcome,
        "amount_minor": 12_500,
        "currency": "KES",
    }

    # A second choice changes nothing and queues nothing.
    again = await client.post(page_path(started.url), content=_choose("failed"), headers=FORM)
    assert again.status_code == 409
    assert "already" in again.text
    assert (await _charge(runtime, started)).status == outcome
    assert len(await queued_deliveries(runtime)) == 1
    page = await client.get(page_path(started.url))
    assert page.status_code == 200 and "already" in page.text and "<form" not in page.text

    # Nothing is sent before the delay; then one signed delivery.
    await drain(runtime)
    assert inbound.requests == []
    clock.advance(29)
    await drain(runtime)
    assert inbound.requests == []
    clock.advance(1)
    await drain(runtime)
    assert [e.event_type for e in inbound.events] == [f"charge.{outcome}"]
    assert inbound.events[0].event_id == body["id"]
    assert inbound.requests[0].url == runtime.settings.public_url + (
        "/api/v1/payments/webhooks/sandbox"
    )


async def test_duplicates_share_the_event_id_and_the_stale_pending_comes_last(
    runtime: Runtime, sandbox: SandboxProvider, client: httpx2.AsyncClient, clock: ManualClock
) -> None:
    inbound = install_inbound(runtime, sandbox)
    started = await _open(runtime, sandbox)
    clock.advance(60)
    response = await client.post(
        page_path(started.url),
        content=_choose("succeeded", delay_seconds="5", duplicates="2", stale_pending="1"),
        headers=FORM,
    )
    assert response.status_code == 303
    queued = await queued_deliveries(runtime)
    bodies = [json.loads(m.payload["body"]) for m in queued]
    assert [b["type"] for b in bodies] == [
        "charge.succeeded",
        "charge.succeeded",
        "charge.succeeded",
        "charge.pending",
    ]
    # The copies are byte for byte the same event; the stale one is its own.
    assert len({m.payload["body"] for m in queued[:3]}) == 1
    assert bodies[3]["id"] != bodies[0]["id"]
    assert bodies[3]["data"]["status"] == "pending"
    charge = await _charge(runtime, started)
    assert bodies[3]["created"] == int(charge.created_at.timestamp()) < bodies[0]["created"]
    due = [m.available_at - clock.now() for m in queued]
    assert due == [dt.timedelta(seconds=s) for s in (5, 6, 7, 8)]

    # Second by second, as a running dispatcher would send them: in their order.
    clock.advance(5)
    for _ in range(4):
        await drain(runtime)
        clock.advance(1)
    events = inbound.events
    assert [e.event_type for e in events] == [
        "charge.succeeded",
        "charge.succeeded",
        "charge.succeeded",
        "charge.pending",
    ]
    assert len({e.event_id for e in events[:3]}) == 1
    assert events[3].event_id != events[0].event_id
    # Each was signed when sent: the signatures' timestamps are the sending time.
    stamps = [r.headers["sandbox-signature"].split(",")[0] for r in inbound.requests]
    sent_at = clock.now() - dt.timedelta(seconds=4)
    assert stamps == [f"t={int(sent_at.timestamp()) + n}" for n in range(4)]


async def test_a_receiver_error_is_retried_with_backoff(
    runtime: Runtime, sandbox: SandboxProvider, client: httpx2.AsyncClient, clock: ManualClock
) -> None:
    inbound = install_inbound(runtime, sandbox)
    inbound.answers = [500, 503]
    started = await _open(runtime, sandbox)
    await client.post(
        page_path(started.url), content=_choose("succeeded", delay_seconds="0"), headers=FORM
    )
    await drain(runtime)
    assert len(inbound.requests) == 1 and inbound.events == []
    for attempt in (2, 3):
        clock.advance(runtime.settings.outbox_backoff_max_seconds)
        await drain(runtime)
        assert len(inbound.requests) == attempt
    assert [e.event_type for e in inbound.events] == ["charge.succeeded"]
    # The retries carry the same event, signed afresh each time.
    assert len({r.content for r in inbound.requests}) == 1
    assert len({r.headers["sandbox-signature"] for r in inbound.requests}) == 3
    clock.advance(runtime.settings.outbox_backoff_max_seconds)
    await drain(runtime)
    assert len(inbound.requests) == 3


async def test_an_unreachable_receiver_is_retried(
    runtime: Runtime, sandbox: SandboxProvider, client: httpx2.AsyncClient, clock: ManualClock
) -> None:
    calls: list[httpx2.Request] = []

    def refuse(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx2.ConnectError("connection refused", request=request)
        return httpx2.Response(200)

    runtime.extensions["payments.sandbox_transport"] = httpx2.MockTransport(refuse)
    started = await _open(runtime, sandbox)
    await client.post(
        page_path(started.url), content=_choose("failed", delay_seconds="0"), headers=FORM
    )
    await drain(runtime)
    assert len(calls) == 1
    clock.advance(runtime.settings.outbox_backoff_max_seconds)
    await drain(runtime)
    assert len(calls) == 2


async def test_concurrent_choices_decide_once(
    runtime: Runtime, sandbox: SandboxProvider, client: httpx2.AsyncClient
) -> None:
    started = await _open(runtime, sandbox)
    path = page_path(started.url)
    answers = await asyncio.gather(
        *(
            client.post(path, content=_choose(outcome), headers=FORM)
            for outcome in ("succeeded", "failed", "abandoned", "succeeded")
        )
    )
    assert sorted(a.status_code for a in answers) == [303, 409, 409, 409]
    winner = next(a for a in answers if a.status_code == 303)
    status = parse_qs(urlsplit(winner.headers["location"]).query)["status"][0]
    assert (await _charge(runtime, started)).status == status
    assert len(await queued_deliveries(runtime)) == 1


@pytest.mark.parametrize(
    ("form", "content_type"),
    [
        ("outcome=paid", FORM["content-type"]),
        ("", FORM["content-type"]),
        ("outcome=succeeded&outcome=failed", FORM["content-type"]),
        ("outcome=succeeded&delay_seconds=-1", FORM["content-type"]),
        ("outcome=succeeded&delay_seconds=nan", FORM["content-type"]),
        ("outcome=succeeded&delay_seconds=3601", FORM["content-type"]),
        ("outcome=succeeded&duplicates=11", FORM["content-type"]),
        ("outcome=succeeded&duplicates=1.5", FORM["content-type"]),
        ('{"outcome": "succeeded"}', "application/json"),
    ],
)
async def test_a_bad_form_changes_nothing(
    runtime: Runtime,
    sandbox: SandboxProvider,
    client: httpx2.AsyncClient,
    form: str,
    content_type: str,
) -> None:
    started = await _open(runtime, sandbox)
    response = await client.post(
        page_path(started.url), content=form, headers={"content-type": content_type}
    )
    assert response.status_code == 422
    assert (await _charge(runtime, started)).status == "pending"
    assert await queued_deliveries(runtime) == []


async def test_without_a_return_url_a_result_page_is_shown(
    runtime: Runtime, sandbox: SandboxProvider, client: httpx2.AsyncClient
) -> None:
    started = await _open(runtime, sandbox, return_url="")
    response = await client.post(page_path(started.url), content=_choose("abandoned"), headers=FORM)
    assert response.status_code == 200
    assert "Payment abandoned" in response.text
    assert "form-action 'self';" in response.headers["content-security-policy"]


async def test_the_defaults_come_from_the_settings(
    tmp_path: Path, database_url: str, clock: ManualClock
) -> None:
    settings = make_settings(
        tmp_path,
        database_url=database_url,
        sandbox_delay_seconds=12,
        sandbox_duplicate_deliveries=1,
    )
    runtime = Runtime(settings, clock=clock)
    try:
        sandbox = SandboxProvider(runtime)
        app = create_app(runtime=runtime)
        async with httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=app), base_url="http://testserver"
        ) as client:
            started = await _open(runtime, sandbox)
            page = await client.get(page_path(started.url))
            assert 'value="12"' in page.text and 'max="10" step="1" value="1"' in page.text
            await client.post(page_path(started.url), content=_choose("succeeded"), headers=FORM)
        queued = await queued_deliveries(runtime)
        assert [m.available_at - clock.now() for m in queued] == [
            dt.timedelta(seconds=12),
            dt.timedelta(seconds=13),
        ]
    finally:
        await runtime.stop()


async def test_the_page_does_not_exist_when_the_sandbox_is_not_enabled(
    tmp_path: Path, database_url: str, clock: ManualClock
) -> None:
    runtime = Runtime(make_settings(tmp_path, database_url=database_url), clock=clock)
    try:
        started = await _open(runtime, SandboxProvider(runtime))
        off = Runtime(
            make_settings(
                tmp_path,
                database_url=database_url,
                payment_providers=["paystack"],
                paystack_secret_key="sk_test_x",
            ),
            clock=clock,
        )
        try:
            app = create_app(runtime=off)
            async with httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=app), base_url="http://testserver"
            ) as client:
                assert (await client.get(page_path(started.url))).status_code == 404
                response = await client.post(
                    page_path(started.url), content=_choose("succeeded"), headers=FORM
                )
                assert response.status_code == 404
        finally:
            await off.stop()
        assert (await _charge(runtime, started)).status == "pending"
    finally:
        await runtime.stop()


def test_the_page_is_declared_public(tmp_path: Path) -> None:
    """The route matrix recognises the page as public: no sign-in, the token is the
    capability."""
    app = create_app(
        make_settings(tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    )
    endpoints, problems = walk_routes(app)
    assert not [p for p in problems if "/sandbox/" in p]
    mine = {(e.method, e.path): e.permission for e in endpoints if e.path.startswith("/sandbox")}
    assert mine == {
        ("GET", "/sandbox/pay/{token}"): "public",
        ("POST", "/sandbox/pay/{token}"): "public",
    }
