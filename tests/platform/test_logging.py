from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import httpx2
import pytest
import structlog
from fastapi import FastAPI

from soko.platform.config import Environment, Settings
from soko.platform.logging import (
    bind_request_context,
    configure_logging,
    mask_sensitive,
    mask_text,
)
from tests.conftest import make_settings

CARD = "4111 1111 1111 1111"
CARD_DASHED = "5500-0000-0000-0004"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1c2VyLTEiLCJleHAiOjE5MDAwMDAwMDB9"
    ".c2lnbmF0dXJlLXRoYXQtaXMtbm90LXJlYWw"
)
ARGON2_HASH = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"
SECRETS = [
    "hunter2-password",
    "refresh-abcdef123456",
    "access-zyxwvu987654",
    "918273",  # an OTP
    "4111111111111111",
    CARD,
    CARD_DASHED,
    JWT,
    "opaque-bearer-value-123",
    "jane.doe",
    "254712345678",
    "712 345",
    "0712 345 678",
    "sk_live_abcdef",
    ARGON2_HASH,
]


def _capture(tmp_path: Path, **overrides: Any) -> tuple[io.StringIO, Settings]:
    stream = io.StringIO()
    settings = make_settings(tmp_path, **overrides)
    configure_logging(settings, stream=stream)
    return stream, settings


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_no_secret_or_personal_data_reaches_the_output(tmp_path: Path) -> None:
    stream, _ = _capture(tmp_path)
    log = structlog.get_logger("soko.test")
    log.info(
        "signing in jane.doe@example.com from +254 712 345 678 with Bearer opaque-bearer-value-123",
        password="hunter2-password",
        refreshToken="refresh-abcdef123456",
        headers={"Authorization": f"Bearer {JWT}", "Cookie": "session=abc", "Accept": "*/*"},
        attempts=[{"otp": "918273", "card_number": 4111111111111111}],
        note=f"paid with {CARD} and {CARD_DASHED}; hash {ARGON2_HASH}",
        phone="0712 345 678",
        contact_email="jane.doe@example.com",
        query="/login?code=918273&next=/home&api_key=sk_live_abcdef",
        body='{"password": "hunter2-password", "pin": "712 345"}',
        status_code=401,
    )
    logging.getLogger("uvicorn.error").warning(
        "token=%s for %s", "access-zyxwvu987654", "jane.doe@example.com"
    )
    output = stream.getvalue()
    for secret in SECRETS:
        assert secret not in output, secret

    structured, foreign = _lines(stream)
    assert structured["event"] == ("signing in ***@example.com from ***678 with Bearer [redacted]")
    assert structured["password"] == "[redacted]"
    assert structured["refreshToken"] == "[redacted]"
    assert structured["headers"] == {
        "Authorization": "[redacted]",
        "Cookie": "[redacted]",
        "Accept": "*/*",
    }
    assert structured["attempts"] == [{"otp": "[redacted]", "card_number": "[redacted]"}]
    assert "****1111" in structured["note"] and "****0004" in structured["note"]
    assert structured["phone"] == "***678"
    assert structured["contact_email"] == "***@example.com"
    assert structured["query"] == "/login?code=[redacted]&next=/home&api_key=[redacted]"
    assert structured["status_code"] == 401
    assert foreign["event"] == "token=[redacted] for ***@example.com"
    assert foreign["logger"] == "uvicorn.error"
    assert foreign["level"] == "warning"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call +254712345678 now", "call ***678 now"),
        ("call (555) 123-4567", "call ***567"),
        ("call 555-123-4567", "call ***567"),
        ("call 07700 900123", "call ***123"),
        ("card 4111-1111-1111-1111!", "card ****1111!"),
        ("write to a.b+c@mail.example.co.ke", "write to ***@mail.example.co.ke"),
        ("redis://:s3cret@cache.internal:6379", "redis://:[redacted]@cache.internal:6379"),
        ("postgresql://soko:pw@db:5432/soko", "postgresql://soko:[redacted]@db:5432/soko"),
        ("password: 'x y'", "password: '[redacted] y'"),
        ('{"code": "123456"}', '{"code": "[redacted]"}'),
    ],
)
def test_mask_text_patterns(text: str, expected: str) -> None:
    assert mask_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails the Luhn check",
        "order 01234567-1234-7abc-8def-0123456789ab from 192.168.100.200",
        "request 0190a6f43c2b7d5e9f01234567890123 took 12.5 ms",
        "status code: 404 on 2030-01-01T10:00:00+00:00, amount 1250000",
        "shipping pin_hint and code review",
    ],
)
def test_mask_text_leaves_ordinary_values_alone(text: str) -> None:
    assert mask_text(text) == text


def test_key_names_decide_redaction() -> None:
    event = {
        "event": "x",
        "status_code": 200,
        "code": "123456",
        "verification_code": "654321",
        "currency_code": "KES",
        "country_code": "KE",
        "new_password": "p",
        "client_secret": "s",
        "X-API-Key": "k",
        "pin": "1234",
        "shipping": "standard",
        "cvv": 123,
        "user_id": "u-1",
    }
    masked = mask_sensitive(None, "info", event)
    assert masked == {
        "event": "x",
        "status_code": 200,
        "code": "[redacted]",
        "verification_code": "[redacted]",
        "currency_code": "KES",
        "country_code": "KE",
        "new_password": "[redacted]",
        "client_secret": "[redacted]",
        "X-API-Key": "[redacted]",
        "pin": "[redacted]",
        "shipping": "standard",
        "cvv": "[redacted]",
        "user_id": "u-1",
    }


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("jane.doe@example.com")


def test_masking_never_raises_and_withholds_the_line(tmp_path: Path) -> None:
    stream, _ = _capture(tmp_path)
    bind_request_context(request_id="req-1")
    try:
        structlog.get_logger("soko.test").info("odd", value=_Unprintable(), email="a@b.co")
    finally:
        structlog.contextvars.clear_contextvars()
    (line,) = _lines(stream)
    assert line["event"] == "log line withheld: masking failed"
    assert line["masking_error"] == "RuntimeError"
    assert line["request_id"] == "req-1"
    assert "jane" not in stream.getvalue() and "a@b.co" not in stream.getvalue()


def test_deeply_nested_values_are_cut(tmp_path: Path) -> None:
    stream, _ = _capture(tmp_path)
    nested: dict[str, Any] = {"password": "deep-secret"}
    for _ in range(30):
        nested = {"inner": nested}
    structlog.get_logger("soko.test").info("nested", data=nested)
    assert "deep-secret" not in stream.getvalue()
    assert "[too deep to log]" in stream.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_in_a_terminal_json_in_production(tmp_path: Path) -> None:
    terminal = _Terminal()
    configure_logging(make_settings(tmp_path, log_format="auto"), stream=terminal)
    structlog.get_logger("soko.test").info("hello", password="hunter2-password")
    shown = terminal.getvalue()
    assert "hello" in shown and not shown.lstrip().startswith("{")
    assert "hunter2-password" not in shown and "[redacted]" in shown

    terminal = _Terminal()
    production = make_settings(tmp_path, log_format="auto").model_copy(
        update={"env": Environment.production}
    )
    configure_logging(production, stream=terminal)
    structlog.get_logger("soko.test").info("hello")
    assert json.loads(terminal.getvalue())["event"] == "hello"


async def test_lines_written_during_a_request_carry_its_context(
    app: FastAPI, client: httpx2.AsyncClient, settings: Settings
) -> None:
    log = structlog.get_logger("soko.test")

    async def endpoint(item: str) -> dict[str, str]:
        bind_request_context(user_id="user-42")
        log.info("item viewed", item=item, email="jane.doe@example.com")
        logging.getLogger("sqlalchemy.engine").warning("library line for %s", item)
        return {"item": item}

    app.add_api_route("/test/items/{item}", endpoint)
    stream = io.StringIO()
    configure_logging(settings, stream=stream)

    response = await client.get("/test/items/abc", headers={"X-Request-ID": "req-logging-1"})
    assert response.status_code == 200
    # The test client's own line (logger "httpx2") is written after the request ends.
    ours, library = [line for line in _lines(stream) if line["logger"] != "httpx2"]
    for line in (ours, library):
        assert line["request_id"] == "req-logging-1"
        assert line["route"] == "/test/items/{item}"
        assert line["path"] == "/test/items/abc"
        assert line["method"] == "GET"
        assert line["user_id"] == "user-42"
    assert ours["email"] == "***@example.com"
    assert library["event"] == "library line for abc"

    # The next request starts clean: no user from the previous one, a new request id.
    async def anonymous() -> None:
        log.info("anonymous visit")

    app.add_api_route("/test/anonymous", anonymous)
    stream.truncate(0)
    stream.seek(0)
    await client.get("/test/anonymous")
    (line,) = [line for line in _lines(stream) if line["event"] == "anonymous visit"]
    assert "user_id" not in line
    assert line["route"] == "/test/anonymous"
    assert line["request_id"] not in ("", "req-logging-1")


async def test_unhandled_error_line_names_request_and_route(
    app: FastAPI, client: httpx2.AsyncClient, settings: Settings
) -> None:
    async def broken() -> None:
        raise RuntimeError("failed for jane.doe@example.com with token=abcdef123456")

    app.add_api_route("/test/broken", broken)
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    response = await client.get("/test/broken", headers={"X-Request-ID": "req-broken"})
    assert response.status_code == 500
    (line,) = [line for line in _lines(stream) if line["event"] == "unhandled_error"]
    assert line["request_id"] == "req-broken"
    assert line["route"] == "/test/broken"
    assert "RuntimeError" in line["exception"]
    assert "jane.doe" not in stream.getvalue() and "abcdef123456" not in stream.getvalue()
