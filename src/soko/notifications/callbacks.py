"""Providers' delivery reports: checking that the provider sent them, and reading them.

* Twilio signs each status callback with ``X-Twilio-Signature``: base64 of the
  HMAC-SHA1, keyed by the account's auth token, of the full URL Twilio requested
  followed by every POST parameter's name and value, sorted by name (then value),
  concatenated with no separators (https://www.twilio.com/docs/usage/security).
* SendGrid's Signed Event Webhook sends ``X-Twilio-Email-Event-Webhook-Signature``
  (base64 DER ECDSA P-256 over SHA-256) and ``...-Timestamp``; the signed bytes are the
  timestamp followed by the raw body, checked with the public key from the dashboard.
* Africa's Talking signs nothing: its callback URL carries a long random token
  (``?token=``, ``SOKO_NOTIFICATIONS_CALLBACK_TOKEN``), compared in constant time.
  Anyone who learns the URL can forge reports, so the token is a secret like a
  password, and a forged report can at worst mark a message delivered or failed and
  suppress a number (never send anything).

The parsers turn each report into :class:`Report` values in Soko's words.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from soko.notifications.models import DeliveryStatus
from soko.notifications.providers import TWILIO_RECIPIENT_CODES
from soko.platform.crypto import digests_match

TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"
SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"


@dataclass(frozen=True, slots=True)
class Report:
    """One provider report: which message (our id or the provider's) and its news."""

    status: DeliveryStatus
    delivery_id: uuid.UUID | None = None
    provider_message_id: str | None = None
    error: str | None = None


# -- checks --------------------------------------------------------------------------------------


def twilio_signature(url: str, params: Iterable[tuple[str, str]], auth_token: str) -> str:
    """The ``X-Twilio-Signature`` Twilio computes for a POST of ``params`` to ``url``."""
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def twilio_signature_valid(
    url: str, params: Iterable[tuple[str, str]], auth_token: str, signature: str | None
) -> bool:
    if not auth_token or not signature:
        return False
    return digests_match(twilio_signature(url, params, auth_token), signature)


def _sendgrid_key(public_key: str) -> ec.EllipticCurvePublicKey | None:
    text = public_key.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def sendgrid_signature_valid(
    public_key: str, payload: bytes, signature: str | None, timestamp: str | None
) -> bool:
    """Whether SendGrid's Event Webhook signature holds over ``timestamp + payload``."""
    if not public_key or not signature or not timestamp:
        return False
    key = _sendgrid_key(public_key)
    if key is None:
        return False
    try:
        raw_signature = base64.b64decode(signature, validate=True)
        key.verify(raw_signature, timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def token_valid(expected: str, given: str | None) -> bool:
    """Africa's Talking's URL token: constant time, and never valid when unset."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


# -- parsers -------------------------------------------------------------------------------------

TWILIO_STATUSES = {
    "sent": DeliveryStatus.sent,
    "delivered": DeliveryStatus.delivered,
    "read": DeliveryStatus.delivered,
    "undelivered": DeliveryStatus.failed,
    "failed": DeliveryStatus.failed,
}
# Twilio's delivery errors that mean the number is wrong or refuses messages.
TWILIO_UNDELIVERABLE_CODES = TWILIO_RECIPIENT_CODES | {30005, 30006}


def parse_twilio(form: Mapping[str, str]) -> Report | None:
    sid = form.get("MessageSid") or form.get("SmsSid")
    status = TWILIO_STATUSES.get(form.get("MessageStatus", ""))
    if not sid or status is None:
        return None  # queued, sending, accepted...: nothing the record does not know
    error = None
    code_text = form.get("ErrorCode") or ""
    if status is DeliveryStatus.failed:
        error = f"twilio reported {form.get('MessageStatus')} {code_text}".strip()
        if code_text.isdigit() and int(code_text) in TWILIO_UNDELIVERABLE_CODES:
            status = DeliveryStatus.undeliverable
    return Report(status=status, provider_message_id=sid, error=error)


AT_STATUSES = {
    "Sent": DeliveryStatus.sent,
    "Submitted": DeliveryStatus.sent,
    "Buffered": DeliveryStatus.sent,
    "Success": DeliveryStatus.delivered,
    "Failed": DeliveryStatus.failed,
    "Rejected": DeliveryStatus.failed,
    "AbsentSubscriber": DeliveryStatus.failed,
    "Expired": DeliveryStatus.failed,
}
# Africa's Talking's failure reasons that mean the number will never take a message
# (their spelling, "Subcriber" included).
AT_UNDELIVERABLE_REASONS = {
    "UserDoesNotExist",
    "NotNetworkSubcriber",
    "NotNetworkSubscriber",
    "UserInBlackList",
    "UserInBlacklist",
    "UserAccountSuspended",
}


def parse_africastalking(form: Mapping[str, str]) -> Report | None:
    message_id = form.get("id")
    status = AT_STATUSES.get(form.get("status", ""))
    if not message_id or status is None:
        return None
    error = None
    if status is DeliveryStatus.failed:
        reason = form.get("failureReason", "")
        error = f"africastalking reported {form.get('status')} {reason}".strip()
        if reason in AT_UNDELIVERABLE_REASONS:
            status = DeliveryStatus.undeliverable
    return Report(status=status, provider_message_id=message_id, error=error)


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def parse_sendgrid(events: Any) -> list[Report]:
    """SendGrid posts a JSON array of events; ``notification_id`` is our custom arg."""
    if not isinstance(events, list):
        raise ValueError("a SendGrid event webhook body is a JSON array")
    reports = []
    for event in events:
        if not isinstance(event, dict):
            continue
        name = event.get("event")
        error = None
        if name == "delivered":
            status = DeliveryStatus.delivered
        elif name == "bounce":
            reason = str(event.get("reason", ""))[:200]
            error = f"sendgrid {event.get('type', 'bounce')}: {reason}".strip()
            # "blocked" is the receiving server refusing for now (reputation, content);
            # a "bounce" is the address not existing.
            blocked = event.get("type") == "blocked"
            status = DeliveryStatus.failed if blocked else DeliveryStatus.undeliverable
        elif name == "dropped":
            reason = str(event.get("reason", ""))[:200]
            error = f"sendgrid dropped: {reason}"
            invalid = "bounce" in reason.lower() or "invalid" in reason.lower()
            status = DeliveryStatus.undeliverable if invalid else DeliveryStatus.failed
        else:
            continue  # processed, deferred, open, click...: no change of delivery state
        sg_id = str(event.get("sg_message_id", "")).split(".", 1)[0] or None
        reports.append(
            Report(
                status=status,
                delivery_id=_uuid(event.get("notification_id")),
                provider_message_id=sg_id,
                error=error,
            )
        )
    return reports
