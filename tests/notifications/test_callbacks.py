"""Provider delivery reports: signatures and tokens checked (positive and negative), then
the delivery record moved and bounced recipients suppressed."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from urllib.parse import urlencode

import httpx2
import pytest

from soko.notifications.callbacks import (
    parse_sendgrid,
    sendgrid_signature_valid,
    token_valid,
    twilio_signature,
    twilio_signature_valid,
)
from soko.notifications.channels import EXTENSION, ProviderServices
from soko.notifications.models import DeliveryStatus
from soko.notifications.public import send_email, send_sms
from soko.platform.config import Settings
from soko.platform.runtime import Runtime
from tests.conftest import make_settings
from tests.notifications.support import (
    EventWebhookKey,
    ScriptedProviders,
    at_answer,
    deliveries,
    install,
    no_scheduled_jobs,  # noqa: F401  (an autouse fixture)
    suppressions,
    transaction,
)

TWILIO_TOKEN = "twilio-auth-token-0123456789"
AT_TOKEN = "at-callback-token-" + "x" * 30
SENDGRID_KEY = EventWebhookKey()
CALLBACKS = "/api/v1/notifications/callbacks"
PUBLIC = "https://soko.example"
PHONE = "+254712345678"


# -- the checks on their own -------------------------------------------------------------------


def test_twilio_signature_matches_the_example_in_twilios_docs() -> None:
    # The request-validation example of Twilio's security docs and helper libraries.
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature(url, params.items(), "12345") == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert twilio_signature_valid(url, params.items(), "12345", "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    # Any change to the URL, a parameter or the token breaks it.
    assert not twilio_signature_valid(
        url.replace("bar=2", "bar=3"), params.items(), "12345", "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )
    changed = {**params, "Digits": "1235"}
    assert not twilio_signature_valid(url, changed.items(), "12345", "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not twilio_signature_valid(url, params.items(), "12346", "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not twilio_signature_valid(url, params.items(), "", "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not twilio_signature_valid(url, params.items(), "12345", None)


def test_sendgrid_signature_positive_and_negative() -> None:
    payload = b'[{"event":"delivered","email":"a@example.com"}]'
    timestamp = "1767225600"
    signature = SENDGRID_KEY.sign(timestamp, payload)
    key = SENDGRID_KEY.public_base64
    assert sendgrid_signature_valid(key, payload, signature, timestamp)
    assert not sendgrid_signature_valid(key, payload + b" ", signature, timestamp)
    assert not sendgrid_signature_valid(key, payload, signature, "1767225601")
    assert not sendgrid_signature_valid(
        EventWebhookKey().public_base64, payload, signature, timestamp
    )
    assert not sendgrid_signature_valid(key, payload, "not base64!", timestamp)
    assert not sendgrid_signature_valid(key, payload, None, timestamp)
    assert not sendgrid_signature_valid("", payload, signature, timestamp)
    assert not sendgrid_signature_valid("bm90IGEga2V5", payload, signature, timestamp)


def test_the_africastalking_token() -> None:
    assert token_valid("s3cret-token", "s3cret-token")
    assert not token_valid("s3cret-token", "s3cret-tokeN")
    assert not token_valid("s3cret-token", None)
    assert not token_valid("", "")  # unset refuses everything


def test_sendgrid_events_in_soko_words() -> None:
    ours = uuid.uuid4()
    reports = parse_sendgrid(
        [
            {"event": "processed", "notification_id": str(ours)},
            {"event": "delivered", "notification_id": str(ours), "sg_message_id": "abc.filter1"},
            {"event": "bounce", "type": "bounce", "reason": "550 5.1.1 unknown user"},
            {"event": "bounce", "type": "blocked", "reason": "IP reputation"},
            {"event": "dropped", "reason": "Bounced Address"},
            {"event": "dropped", "reason": "Spam Reporting Address"},
            "not an event",
        ]
    )
    assert [(r.status, r.delivery_id, r.provider_message_id) for r in reports[:1]] == [
        (DeliveryStatus.delivered, ours, "abc")
    ]
    assert [r.status for r in reports[1:]] == [
        DeliveryStatus.undeliverable,
        DeliveryStatus.failed,
        DeliveryStatus.undeliverable,
        DeliveryStatus.failed,
    ]
    with pytest.raises(ValueError):
        parse_sendgrid({"event": "delivered"})


# -- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(
        tmp_path,
        database_url=database_url,
        public_url=PUBLIC,
        notifications_sms_provider="twilio",
        notifications_sms_sender="+15005550006",
        twilio_account_sid="AC0123456789abcdef0123456789abcdef",
        twilio_auth_token=TWILIO_TOKEN,
        notifications_email_provider="sendgrid",
        sendgrid_api_key="SG.test",
        sendgrid_webhook_public_key=SENDGRID_KEY.public_base64,
        africastalking_username="soko",
        africastalking_api_key="atsk",
        notifications_callback_token=AT_TOKEN,
    )


@pytest.fixture
def providers(runtime: Runtime) -> ScriptedProviders:
    return install(runtime)


async def _sent_sms(runtime: Runtime, providers: ScriptedProviders, sid: str) -> uuid.UUID:
    providers.answer(lambda request: httpx2.Response(201, json={"sid": sid, "status": "queued"}))
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body="Hello", category="x.y")
    assert await runtime.dispatcher.run_until_idle() >= 1
    record = (await deliveries(runtime))[-1]
    assert record.status == "sent" and record.provider_message_id == sid
    return record.id


async def _twilio_post(
    client: httpx2.AsyncClient, form: dict[str, str], *, token: str = TWILIO_TOKEN
) -> httpx2.Response:
    url = f"{PUBLIC}{CALLBACKS}/twilio"
    signature = twilio_signature(url, form.items(), token)
    return await client.post(
        f"{CALLBACKS}/twilio",
        content=urlencode(form),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature,
        },
    )


async def test_twilio_status_callbacks_move_the_record(
    runtime: Runtime, client: httpx2.AsyncClient, providers: ScriptedProviders
) -> None:
    await _sent_sms(runtime, providers, "SM0001")
    form = {
        "AccountSid": "AC0123456789abcdef0123456789abcdef",
        "MessageSid": "SM0001",
        "MessageStatus": "delivered",
        "To": PHONE,
    }
    # The callback URL Twilio was given is exactly what is signed.
    [request] = providers.requests
    assert (
        f"StatusCallback={PUBLIC.replace(':', '%3A').replace('/', '%2F')}"
        in request.content.decode()
    )

    forged = await _twilio_post(client, form, token="another-token")
    assert forged.status_code == 401
    assert forged.json()["type"] == "/problems/notification-callback-unverified"
    unsigned = await client.post(f"{CALLBACKS}/twilio", data=form)
    assert unsigned.status_code == 401
    assert (await deliveries(runtime))[0].status == "sent"

    assert (await _twilio_post(client, form)).status_code == 204
    assert (await deliveries(runtime))[0].status == "delivered"
    # A late "sent" does not move it back.
    late = {**form, "MessageStatus": "sent"}
    assert (await _twilio_post(client, late)).status_code == 204
    assert (await deliveries(runtime))[0].status == "delivered"


async def test_a_tampered_twilio_report_is_refused(
    runtime: Runtime, client: httpx2.AsyncClient, providers: ScriptedProviders
) -> None:
    await _sent_sms(runtime, providers, "SM0002")
    form = {"MessageSid": "SM0002", "MessageStatus": "delivered"}
    signature = twilio_signature(f"{PUBLIC}{CALLBACKS}/twilio", form.items(), TWILIO_TOKEN)
    tampered = {**form, "MessageStatus": "undelivered", "ErrorCode": "30005"}
    answer = await client.post(
        f"{CALLBACKS}/twilio", data=tampered, headers={"X-Twilio-Signature": signature}
    )
    assert answer.status_code == 401
    assert await suppressions(runtime) == []


async def test_twilio_unknown_destination_suppresses_the_number(
    runtime: Runtime, client: httpx2.AsyncClient, providers: ScriptedProviders
) -> None:
    await _sent_sms(runtime, providers, "SM0003")
    form = {"MessageSid": "SM0003", "MessageStatus": "undelivered", "ErrorCode": "30005"}
    assert (await _twilio_post(client, form)).status_code == 204
    [record] = await deliveries(runtime)
    assert record.status == "undeliverable" and "30005" in (record.last_error or "")
    [suppression] = await suppressions(runtime)
    assert suppression.address_index == record.recipient_index
    # The next message to that number is not sent.
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body="Again", category="x.y")
    await runtime.dispatcher.run_until_idle()
    assert len(providers.requests) == 1


async def test_a_report_for_an_unknown_message_changes_nothing(
    runtime: Runtime, client: httpx2.AsyncClient
) -> None:
    form = {"MessageSid": "SM-unknown", "MessageStatus": "delivered"}
    assert (await _twilio_post(client, form)).status_code == 204
    assert await deliveries(runtime) == []
    assert (await client.post(f"{CALLBACKS}/pigeon", data=form)).status_code == 404


async def test_sendgrid_events_move_the_record_and_suppress_a_bounce(
    runtime: Runtime, client: httpx2.AsyncClient, providers: ScriptedProviders
) -> None:
    providers.answer(lambda request: httpx2.Response(202, headers={"X-Message-Id": "sgid1"}))
    async with transaction(runtime) as session:
        await send_email(session, to="Amina@Example.co.ke", subject="Hi", text="x", category="x.y")
        await send_email(session, to="juma@example.co.ke", subject="Hi", text="x", category="x.y")
    assert await runtime.dispatcher.run_until_idle() == 2
    first, second = await deliveries(runtime)
    events = [
        {
            "email": "amina@example.co.ke",
            "event": "bounce",
            "type": "bounce",
            "reason": "550 5.1.1 The email account does not exist",
            "sg_message_id": "sgid1.filterdrecv-1",
            "notification_id": str(first.id),
            "timestamp": 1767225600,
        },
        {
            "email": "juma@example.co.ke",
            "event": "delivered",
            "sg_message_id": "sgid1.filterdrecv-2",
            "notification_id": str(second.id),
            "timestamp": 1767225600,
        },
    ]
    payload = json.dumps(events).encode()
    timestamp = "1767225600"
    headers = {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": SENDGRID_KEY.sign(timestamp, payload),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }
    bad = dict(headers, **{"X-Twilio-Email-Event-Webhook-Timestamp": "1767225601"})
    refused = await client.post(f"{CALLBACKS}/sendgrid", content=payload, headers=bad)
    assert refused.status_code == 401
    other_key = dict(
        headers,
        **{"X-Twilio-Email-Event-Webhook-Signature": EventWebhookKey().sign(timestamp, payload)},
    )
    assert (
        await client.post(f"{CALLBACKS}/sendgrid", content=payload, headers=other_key)
    ).status_code == 401

    answer = await client.post(f"{CALLBACKS}/sendgrid", content=payload, headers=headers)
    assert answer.status_code == 204
    first, second = await deliveries(runtime)
    assert first.status == "undeliverable" and second.status == "delivered"
    [suppression] = await suppressions(runtime)
    assert (suppression.kind, suppression.provider) == ("email", "sendgrid")
    # The address is suppressed in its canonical form, whatever its case.
    async with transaction(runtime) as session:
        await send_email(session, to="AMINA@example.co.ke", subject="Hi", text="x", category="x.y")
    await runtime.dispatcher.run_until_idle()
    assert len(providers.requests) == 2
    assert (await deliveries(runtime))[2].status == "undeliverable"


async def test_a_sendgrid_body_that_is_not_events_is_refused(client: httpx2.AsyncClient) -> None:
    payload = b'{"event": "delivered"}'
    headers = {
        "X-Twilio-Email-Event-Webhook-Signature": SENDGRID_KEY.sign("1", payload),
        "X-Twilio-Email-Event-Webhook-Timestamp": "1",
    }
    answer = await client.post(f"{CALLBACKS}/sendgrid", content=payload, headers=headers)
    assert answer.status_code == 422
    [error] = answer.json()["errors"]
    # The body as a whole: no field, the pointer to the whole document.
    assert (error["in"], error["field"], error["pointer"], error["code"]) == (
        "body",
        "",
        "#",
        "invalid",
    )


async def test_bodies_no_provider_sends_are_refused_for_what_they_are(
    client: httpx2.AsyncClient,
) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    # Past the limit: too large, whoever sent it.
    for provider in ("twilio", "sendgrid", f"africastalking?token={AT_TOKEN}"):
        big = await client.post(
            f"{CALLBACKS}/{provider}", content=b"a=" + b"x" * 1_000_000, headers=form
        )
        assert big.status_code == 413, provider
        assert big.json()["type"] == "/problems/payload-too-large"
    # Not a form: Twilio signs a form's pairs, so it is unverified, never "invalid".
    garbled = await client.post(
        f"{CALLBACKS}/twilio",
        content=b"a=\xff\xfe",
        headers={**form, "X-Twilio-Signature": "c2lnbmF0dXJl"},
    )
    assert garbled.status_code == 401
    assert garbled.json()["type"] == "/problems/notification-callback-unverified"
    # With the right token, Africa's Talking's unreadable body is a validation error.
    unreadable = await client.post(
        f"{CALLBACKS}/africastalking?token={AT_TOKEN}", content=b"a=\xff\xfe", headers=form
    )
    assert unreadable.status_code == 422
    assert unreadable.json()["errors"][0]["detail"] == "is not a form"


async def test_africastalking_reports_need_the_token(
    runtime: Runtime, client: httpx2.AsyncClient, providers: ScriptedProviders
) -> None:
    runtime.settings.notifications_sms_provider = "africastalking"
    providers.answer(at_answer(message_id="ATXid_9"))
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body="Hello", category="x.y")
    await runtime.dispatcher.run_until_idle()
    report = {
        "id": "ATXid_9",
        "status": "Failed",
        "phoneNumber": PHONE,
        "networkCode": "63902",
        "failureReason": "UserInBlackList",
        "retryCount": "0",
    }
    for query in ("", "?token=wrong", f"?token={AT_TOKEN}x"):
        answer = await client.post(f"{CALLBACKS}/africastalking{query}", data=report)
        assert answer.status_code == 401
    assert (await deliveries(runtime))[0].status == "sent"
    answer = await client.post(f"{CALLBACKS}/africastalking?token={AT_TOKEN}", data=report)
    assert answer.status_code == 204
    assert (await deliveries(runtime))[0].status == "undeliverable"
    assert len(await suppressions(runtime)) == 1


async def test_africastalking_success_marks_delivered(
    runtime: Runtime, client: httpx2.AsyncClient, providers: ScriptedProviders
) -> None:
    runtime.settings.notifications_sms_provider = "africastalking"
    providers.answer(at_answer(message_id="ATXid_10"))
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body="Hello", category="x.y")
    await runtime.dispatcher.run_until_idle()
    report = {"id": "ATXid_10", "status": "Success", "phoneNumber": PHONE}
    answer = await client.post(f"{CALLBACKS}/africastalking?token={AT_TOKEN}", data=report)
    assert answer.status_code == 204
    [record] = await deliveries(runtime)
    assert record.status == "delivered" and record.delivered_at is not None


async def test_a_report_during_the_delivery_job_is_not_lost(
    runtime: Runtime, client: httpx2.AsyncClient, providers: ScriptedProviders, backend: str
) -> None:
    """SendGrid reports "delivered" while the job that sent the message has not
    committed yet: the report waits for the job's row lock and then moves the record on
    from the job's "sent" (PostgreSQL; SQLite runs one writer at a time anyway)."""
    if backend != "postgresql":
        pytest.skip("row locks: PostgreSQL only")
    called, release = asyncio.Event(), asyncio.Event()

    async def slow_provider(request: httpx2.Request) -> httpx2.Response:
        called.set()
        await release.wait()
        return httpx2.Response(202, headers={"X-Message-Id": "sg-race"})

    services = ProviderServices(
        runtime.settings, runtime.clock, transport=httpx2.MockTransport(slow_provider)
    )
    runtime.extensions[EXTENSION] = services
    async with transaction(runtime) as session:
        await send_email(session, to="amina@example.co.ke", subject="Hi", text="x", category="x.y")
    [record] = await deliveries(runtime)
    job = asyncio.create_task(runtime.dispatcher.run_until_idle())
    await asyncio.wait_for(called.wait(), timeout=10)
    payload = json.dumps(
        [{"event": "delivered", "notification_id": str(record.id), "sg_message_id": "sg-race.x"}]
    ).encode()
    headers = {
        "X-Twilio-Email-Event-Webhook-Signature": SENDGRID_KEY.sign("7", payload),
        "X-Twilio-Email-Event-Webhook-Timestamp": "7",
    }
    report = asyncio.create_task(
        client.post(f"{CALLBACKS}/sendgrid", content=payload, headers=headers)
    )
    await asyncio.sleep(0.3)
    assert not report.done()  # waiting for the job's lock
    release.set()
    assert (await asyncio.wait_for(report, timeout=10)).status_code == 204
    await asyncio.wait_for(job, timeout=10)
    [record] = await deliveries(runtime)
    assert (record.status, record.provider_message_id) == ("delivered", "sg-race")
    await services.close()
