"""The Standard Webhooks signature: the specification's own test vector, and agreement
with the official ``standardwebhooks`` library in both directions."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from soko.webhooks.signing import new_secret, secret_key, sign, signature_header

# The vector of the reference implementation's tests: standard-webhooks/standard-webhooks,
# libraries/python/tests/test_webhooks.py (defaultSecret, defaultMsgID, the timestamp and
# payload of its signing test, and the signature it expects).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_reference_vector() -> None:
    signature = sign(
        VECTOR_SECRET, message_id=VECTOR_ID, timestamp=VECTOR_TIMESTAMP, body=VECTOR_BODY
    )
    assert signature == VECTOR_SIGNATURE


def test_the_official_library_agrees() -> None:
    theirs = Webhook(VECTOR_SECRET).sign(
        VECTOR_ID, dt.datetime.fromtimestamp(VECTOR_TIMESTAMP, tz=dt.UTC), VECTOR_BODY.decode()
    )
    assert theirs == VECTOR_SIGNATURE


def test_new_secrets_are_whsec_and_32_random_bytes() -> None:
    first, second = new_secret(), new_secret()
    assert first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32
    assert len(secret_key(first)) == 32


@pytest.mark.parametrize(
    "bad", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_!!!", "whsec_" + "QUJD" * 2]
)
def test_malformed_secrets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        secret_key(bad)


def test_a_message_signed_by_two_secrets_verifies_under_each() -> None:
    old, new = new_secret(), new_secret()
    now = int(dt.datetime.now(dt.UTC).timestamp())
    body = b'{"id":"evt_1","type":"order.paid","created_at":"2030-01-01T00:00:00Z","data":{}}'
    header = signature_header([new, old], message_id="evt_1", timestamp=now, body=body)
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(now), "webhook-signature": header}
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers)["type"] == "order.paid"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body.replace(b"paid", b"sent"), headers)
    with pytest.raises(ValueError, match="at least one"):
        signature_header([], message_id="evt_1", timestamp=now, body=body)
