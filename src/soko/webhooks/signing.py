"""Signatures of the Standard Webhooks scheme (https://www.standardwebhooks.com).

A secret is ``whsec_`` followed by the base64 of 32 random bytes. A message is signed
with HMAC-SHA256, keyed with the secret's decoded bytes, over
``"{webhook-id}.{webhook-timestamp}.{body}"``; the ``webhook-signature`` header holds
``v1,<base64 signature>``, several of them separated by spaces while a rotated secret
still signs beside the new one. Receivers verify with the ``standardwebhooks`` libraries.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Sequence

from soko.platform.crypto import MacAlgorithm, mac

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 24
SIGNATURE_VERSION = "v1"


def new_secret() -> str:
    """A fresh signing secret in the Standard Webhooks format."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key a ``whsec_`` secret stands for."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ and base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"a webhook secret holds at least {MIN_SECRET_BYTES} bytes")
    return key


def sign(secret: str, *, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one message under ``secret``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = mac(secret_key(secret), signed, algorithm=MacAlgorithm.sha256)
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_header(
    secrets_in_use: Sequence[str], *, message_id: str, timestamp: int, body: bytes
) -> str:
    """The ``webhook-signature`` value: one signature per secret, space-separated."""
    if not secrets_in_use:
        raise ValueError("at least one secret signs")
    return " ".join(
        sign(secret, message_id=message_id, timestamp=timestamp, body=body)
        for secret in secrets_in_use
    )
