"""The sandbox provider's webhook signatures: ``sandbox-signature: t=<unix>,v1=<hex>``,
HMAC-SHA256 of ``"<t>." + raw body``, checked on the raw bytes with a 300 s tolerance."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from soko.payments.providers.base import ProviderStatus, WebhookRejectedError
from soko.payments.providers.sandbox import SandboxProvider
from soko.payments.sandbox_delivery import (
    ChargeFacts,
    SandboxEventType,
    event_body,
    signature_header,
    webhook_key,
)
from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.crypto import hkdf_sha256
from soko.platform.runtime import Runtime
from tests.conftest import TEST_SECRET, make_settings

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
FACTS = ChargeFacts(uuid.uuid4(), "pay-0193abc", "succeeded", 12_345, "KES")


async def _provider(tmp_path: Path, **overrides: object) -> tuple[SandboxProvider, Runtime]:
    settings = make_settings(
        tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}", **overrides
    )
    runtime = Runtime(settings, clock=ManualClock(NOW))
    return SandboxProvider(runtime), runtime


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[SandboxProvider]:
    provider, runtime = await _provider(tmp_path)
    yield provider
    await runtime.stop()


def _signed(settings: Settings, body: bytes, at: dt.datetime = NOW) -> dict[str, str]:
    return {"sandbox-signature": signature_header(webhook_key(settings), body, int(at.timestamp()))}


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return make_settings(tmp_path, **overrides)


def test_the_key_is_derived_from_the_secret_key_with_hkdf(tmp_path: Path) -> None:
    derived = webhook_key(_settings(tmp_path))
    assert derived == hkdf_sha256(TEST_SECRET.encode(), info=b"soko sandbox webhooks")
    assert derived != TEST_SECRET.encode()
    configured = webhook_key(_settings(tmp_path, sandbox_webhook_secret="whsec-sandbox-test"))
    assert configured == b"whsec-sandbox-test"


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body(tmp_path: Path) -> None:
    key = b"k" * 32
    body = b'{"id":"evt_x"}'
    header = signature_header(key, body, 1_700_000_000)
    expected = hmac.new(key, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


async def test_a_signed_event_verifies_and_parses(sandbox: SandboxProvider, tmp_path: Path) -> None:
    body = event_body(SandboxEventType.charge_succeeded, FACTS, created=NOW).encode()
    settings = _settings(tmp_path)
    event = sandbox.verify_webhook(_signed(settings, body), body, NOW)
    parsed = json.loads(body)
    assert event.provider == "sandbox"
    assert event.event_id == parsed["id"] and event.event_id.startswith("evt_")
    assert event.event_type == "charge.succeeded"
    assert event.status is ProviderStatus.succeeded
    assert event.reference == "pay-0193abc"
    assert event.provider_payment_id == str(FACTS.charge_id)
    assert (event.amount_minor, event.currency) == (12_345, "KES")
    assert event.occurred_at == NOW


@pytest.mark.parametrize(
    ("event_type", "status"),
    [
        (SandboxEventType.charge_pending, ProviderStatus.pending),
        (SandboxEventType.charge_failed, ProviderStatus.failed),
        (SandboxEventType.charge_abandoned, ProviderStatus.abandoned),
        (SandboxEventType.refund_succeeded, None),
    ],
)
async def test_each_event_type_maps_to_its_status(
    sandbox: SandboxProvider,
    tmp_path: Path,
    event_type: SandboxEventType,
    status: ProviderStatus | None,
) -> None:
    body = event_body(event_type, FACTS, created=NOW).encode()
    event = sandbox.verify_webhook(_signed(_settings(tmp_path), body), body, NOW)
    assert event.status == status
    assert event.event_type == event_type.value


async def test_the_raw_bytes_are_verified_not_re_serialised_json(
    sandbox: SandboxProvider, tmp_path: Path
) -> None:
    compact = event_body(SandboxEventType.charge_succeeded, FACTS, created=NOW)
    spaced = json.dumps(json.loads(compact), indent=2).encode()
    assert spaced != compact.encode()
    settings = _settings(tmp_path)
    # Signed as sent (spaced): verifies, though re-serialising would give other bytes.
    assert sandbox.verify_webhook(_signed(settings, spaced), spaced, NOW).status == "succeeded"
    # The signature of the compact form does not cover the spaced bytes.
    with pytest.raises(WebhookRejectedError):
        sandbox.verify_webhook(_signed(settings, compact.encode()), spaced, NOW)


async def test_a_tampered_body_is_rejected(sandbox: SandboxProvider, tmp_path: Path) -> None:
    body = event_body(SandboxEventType.charge_failed, FACTS, created=NOW).encode()
    headers = _signed(_settings(tmp_path), body)
    tampered = body.replace(b'"failed"', b'"succeeded"').replace(b"charge.failed", b"charge.su")
    assert tampered != body
    with pytest.raises(WebhookRejectedError, match="does not match"):
        sandbox.verify_webhook(headers, tampered, NOW)
    amount_changed = body.replace(b"12345", b"12346")
    with pytest.raises(WebhookRejectedError, match="does not match"):
        sandbox.verify_webhook(headers, amount_changed, NOW)


async def test_a_signature_under_another_secret_is_rejected(
    sandbox: SandboxProvider, tmp_path: Path
) -> None:
    body = event_body(SandboxEventType.charge_succeeded, FACTS, created=NOW).encode()
    other = _settings(tmp_path, sandbox_webhook_secret="not-the-secret-soko-uses")
    with pytest.raises(WebhookRejectedError, match="does not match"):
        sandbox.verify_webhook(_signed(other, body), body, NOW)


async def test_a_configured_secret_is_used_on_both_sides(tmp_path: Path) -> None:
    provider, runtime = await _provider(tmp_path, sandbox_webhook_secret="whsec-configured")
    try:
        body = event_body(SandboxEventType.charge_succeeded, FACTS, created=NOW).encode()
        configured = _settings(tmp_path, sandbox_webhook_secret="whsec-configured")
        assert provider.verify_webhook(_signed(configured, body), body, NOW).event_id
        with pytest.raises(WebhookRejectedError):  # the derived key no longer verifies
            provider.verify_webhook(_signed(_settings(tmp_path), body), body, NOW)
    finally:
        await runtime.stop()


@pytest.mark.parametrize(
    ("offset_seconds", "accepted"),
    [(-301, False), (-299, True), (0, True), (299, True), (301, False), (-86_400, False)],
)
async def test_the_timestamp_must_be_within_five_minutes(
    sandbox: SandboxProvider, tmp_path: Path, offset_seconds: int, accepted: bool
) -> None:
    body = event_body(SandboxEventType.charge_succeeded, FACTS, created=NOW).encode()
    signed_at = NOW + dt.timedelta(seconds=offset_seconds)
    headers = _signed(_settings(tmp_path), body, signed_at)
    if accepted:
        assert sandbox.verify_webhook(headers, body, NOW).event_id
    else:
        with pytest.raises(WebhookRejectedError, match="tolerance"):
            sandbox.verify_webhook(headers, body, NOW)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "v1=" + "0" * 64,  # no timestamp
        f"t={int(NOW.timestamp())}",  # no signature
        f"t={int(NOW.timestamp())},t={int(NOW.timestamp())},v1=" + "0" * 64,
        f"t=abc,v1={'0' * 64}",
        f"t={int(NOW.timestamp())},v1=" + "0" * 63,  # too short to count
        f"t=-{int(NOW.timestamp())},v1=" + "0" * 64,
    ],
)
async def test_missing_or_malformed_signature_headers_are_rejected(
    sandbox: SandboxProvider, header: str | None
) -> None:
    body = event_body(SandboxEventType.charge_succeeded, FACTS, created=NOW).encode()
    headers = {} if header is None else {"sandbox-signature": header}
    with pytest.raises(WebhookRejectedError):
        sandbox.verify_webhook(headers, body, NOW)


async def test_any_matching_v1_signature_is_enough(
    sandbox: SandboxProvider, tmp_path: Path
) -> None:
    """As with Stripe, a sender rotating secrets may send two v1 values."""
    body = event_body(SandboxEventType.charge_succeeded, FACTS, created=NOW).encode()
    good = _signed(_settings(tmp_path), body)["sandbox-signature"]
    t, v1 = good.split(",")
    header = f"{t},v1={'ab' * 32},{v1},v0=ignored"
    assert sandbox.verify_webhook({"sandbox-signature": header}, body, NOW).event_id


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.update(type="charge.refunded"),
        lambda e: e.update(id="not-an-event-id"),
        lambda e: e.update(created="yesterday"),
        lambda e: e["data"].update(amount_minor=-5),
        lambda e: e["data"].update(amount_minor=True),
        lambda e: e["data"].update(currency="kes"),
        lambda e: e["data"].update(reference="<script>"),
        lambda e: e.pop("data"),
        lambda e: e.update(created=10**20),
    ],
)
async def test_correctly_signed_but_malformed_events_are_rejected(
    sandbox: SandboxProvider, tmp_path: Path, mutate: object
) -> None:
    event = json.loads(event_body(SandboxEventType.charge_succeeded, FACTS, created=NOW))
    mutate(event)  # type: ignore[operator]
    body = json.dumps(event).encode()
    with pytest.raises(WebhookRejectedError):
        sandbox.verify_webhook(_signed(_settings(tmp_path), body), body, NOW)


async def test_a_body_that_is_not_json_is_rejected(
    sandbox: SandboxProvider, tmp_path: Path
) -> None:
    for body in (b"\xff\xfe", b"[1, 2]", b"not json"):
        with pytest.raises(WebhookRejectedError):
            sandbox.verify_webhook(_signed(_settings(tmp_path), body), body, NOW)


async def test_readiness_never_calls_out(sandbox: SandboxProvider) -> None:
    assert sandbox.readiness() == {"status": "up", "circuit": "closed", "backend": "sandbox"}
