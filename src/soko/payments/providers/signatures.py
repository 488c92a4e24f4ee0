"""The timestamped signature header Stripe defines, which the sandbox provider reuses:
``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">[,v1=<hex>...]``.

Any ``v1`` value that matches passes (a sender rotating secrets sends two); other items
are ignored; the timestamp must be within the tolerance either way. The MAC is computed
over the raw bytes received, never over re-serialised JSON, and compared with every
candidate in constant time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

from soko.payments.providers.base import WebhookRejectedError

TOLERANCE_SECONDS = 300
# A header with more signatures than this is not one a provider sent.
MAX_SIGNATURES = 8


def _digest(key: bytes, timestamp: int, raw_body: bytes) -> str:
    return hmac.new(
        key, str(timestamp).encode("ascii") + b"." + raw_body, hashlib.sha256
    ).hexdigest()


def sign_timestamped(key: bytes, raw_body: bytes, timestamp: int) -> str:
    """The header value for ``raw_body`` sent at ``timestamp`` (Unix seconds)."""
    return f"t={timestamp},v1={_digest(key, timestamp, raw_body)}"


def verify_timestamped(
    header: str | None,
    *,
    key: bytes,
    raw_body: bytes,
    now: dt.datetime,
    name: str,
    tolerance_seconds: int = TOLERANCE_SECONDS,
) -> int:
    """Check ``header`` (named ``name`` in refusals) against ``raw_body``; returns the
    signed timestamp. Raises :class:`WebhookRejectedError`."""
    timestamp, signatures = _parse(header, name)
    expected = _digest(key, timestamp, raw_body)
    # Compare with every candidate (no early exit) so timing says nothing.
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected, candidate.lower())
    if not matched:
        raise WebhookRejectedError(f"{name} does not match the body")
    if abs(now.timestamp() - timestamp) > tolerance_seconds:
        raise WebhookRejectedError(f"{name} timestamp is outside the tolerance")
    return timestamp


def _parse(header: str | None, name: str) -> tuple[int, list[str]]:
    if not header:
        raise WebhookRejectedError(f"no {name} header")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if not value.isascii() or not value.isdigit() or timestamp is not None:
                raise WebhookRejectedError(f"{name} has a bad timestamp")
            timestamp = int(value)
        elif key == "v1" and value.isascii():
            signatures.append(value)
    if timestamp is None or not signatures:
        raise WebhookRejectedError(f"{name} lacks a timestamp or a v1 signature")
    if len(signatures) > MAX_SIGNATURES:
        raise WebhookRejectedError(f"{name} has too many signatures")
    return timestamp, signatures
