"""Log lines are free of passwords, tokens, one-time codes, authenticator secrets,
recovery codes, API keys, email addresses and phone numbers, while every identity flow
runs: sign-up by email and by SMS code, sign-in right and wrong, refresh, MFA enrollment
and challenges, password reset, email verification, API keys, sign-out."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from soko.platform.logging import configure_logging
from soko.platform.runtime import Runtime
from tests.identity.privacy_support import Exposure, walk_every_flow


@pytest.fixture
def captured_logs(runtime: Runtime, app: Any) -> Iterator[io.StringIO]:
    """Everything logged through Soko's logging chain (masking included), as JSON lines.
    Configured after the app, which configures logging to standard error when built."""
    stream = io.StringIO()
    configure_logging(runtime.settings, stream=stream)
    yield stream
    configure_logging(runtime.settings)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _without_timestamps(lines: list[dict[str, Any]]) -> str:
    # A timestamp's microseconds are six digits that could equal a code by chance.
    return "\n".join(
        json.dumps({k: v for k, v in line.items() if k != "timestamp"}, ensure_ascii=False)
        for line in lines
    )


# Ids (UUIDs, and request ids of 16 or more hex digits) hold random runs of digits that
# could equal a code by chance, about once in ten thousand runs of this test.
_IDS = re.compile(
    r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b|\b[0-9a-f]{16,}\b",
    re.IGNORECASE,
)


def _codes_in(text: str, codes: list[str]) -> list[str]:
    # A code counts as a whole number: not inside a longer run of digits or a decimal,
    # nor inside an id.
    text = _IDS.sub("<id>", text)
    return [code for code in codes if re.search(rf"(?<![\d.]){code}(?!\d)", text)]


async def test_no_secret_or_personal_data_reaches_the_logs(
    app: Any, runtime: Runtime, captured_logs: io.StringIO
) -> None:
    seen: Exposure = await walk_every_flow(app, runtime)
    lines = _lines(captured_logs)
    text = _without_timestamps(lines)

    # The capture saw the flows: requests, the reset request, the delivered messages
    # (with their recipients masked, not dropped).
    events = [line.get("event", "") for line in lines]
    assert "password_reset_requested" in events
    delivered = [line for line in lines if "development sink" in str(line.get("event"))]
    assert {line.get("category") for line in delivered} >= {
        "identity.email_verification",
        "identity.password_reset",
        "identity.sign_in_code",
    }
    assert all(
        str(line.get("email", line.get("phone", ""))).startswith("***") for line in delivered
    )

    lowered = text.lower()
    assert [value for value in seen.personal_data() if value.lower() in lowered] == []
    assert [value for value in seen.secrets() if value in text] == []
    assert len(seen.codes) >= 4
    assert _codes_in(text, seen.codes) == []


def test_a_code_counts_only_as_a_whole_number() -> None:
    assert _codes_in('{"event": "texted 482913 to the user"}', ["482913"]) == ["482913"]
    assert _codes_in('{"detail": "code=482913&next=1"}', ["482913"]) == ["482913"]
    assert _codes_in('{"duration": 0.482913, "id": 14829135}', ["482913"]) == []
    assert _codes_in('{"request_id": "0a482913be7f4c41a1d2e3f405162738"}', ["482913"]) == []
    assert _codes_in('{"user": "01938a7e-4829-13be-7f4c-41a1d2e3f405"}', ["482913"]) == []
    assert _codes_in('{"request_id": "0a4829", "code": "482913"}', ["482913"]) == ["482913"]
