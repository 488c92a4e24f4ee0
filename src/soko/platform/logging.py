"""Structured logging: JSON lines in production, readable lines in a terminal.

Every line goes through the same chain, whether it was written with structlog or by a
library through the standard ``logging`` module (uvicorn, SQLAlchemy, asyncpg):

1. the request context bound with :func:`bind_request_context` (``request_id``,
   ``method`` and ``path`` from :class:`soko.platform.http.RequestContextMiddleware`,
   ``user_id`` once a domain has authenticated the caller),
2. the matched route template and the OpenTelemetry trace and span ids, when known,
3. :func:`mask_sensitive`, which runs last, right before rendering, so nothing that
   reaches the output escapes it.

What the mask removes, and why it keeps what it keeps:

* Values under a secret-looking key (``password``, ``new_password``, ``client_secret``,
  ``access_token``, ``authorization``, ``cookie``, ``api_key``, ``otp``, ``code``,
  ``pin``, ``card_number``, ``cvv``...) become ``[redacted]``, whatever their type.
* Inside any string, the message included: bearer tokens and JWTs, password hashes,
  passwords in URLs (``postgresql://soko:[redacted]@db/soko``), and ``key=value`` /
  ``"key": "value"`` pairs with such keys become ``[redacted]``.
* Card numbers (13 to 19 digits, spaces or dashes allowed, Luhn-valid) keep their last
  four digits: ``****1111``. That is what PCI DSS allows to be shown, and it is what a
  customer quotes to support.
* Email addresses keep only their domain: ``***@example.com``. The domain tells an
  operator which mail provider is refusing mail; the local part is what identifies a
  person. (A personal domain still says something; we accept that.)
* Phone numbers, in E.164 (``+254712345678``) or local formats (``0712 345 678``,
  ``(555) 123-4567``, ``555-123-4567``), keep their last three digits: ``***678``. A
  bare run of digits without ``+``, a leading ``0`` or a separator is left alone: it is
  far more often an amount or an id than a phone number.
* Values under ``email`` or ``phone``-like keys are masked even when they do not look
  like an address or a number.

Only strings are scanned: an integer that happens to pass the Luhn check is not a card
number often enough to be worth mangling timestamps and amounts. Card numbers held as
integers must sit under a card-like key, which redacts them.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from opentelemetry import trace
from starlette.types import Scope

from soko.platform.config import LogFormat, Settings
from soko.platform.http import route_template

REDACTED = "[redacted]"
UNMATCHED_ROUTE = "<unmatched>"
_MAX_DEPTH = 12

EventDict = MutableMapping[str, Any]


# -- request context ------------------------------------------------------------------


def bind_request_context(**values: Any) -> None:
    """Add ``values`` (``user_id=...``, ``seller_id=...``) to every later log line of the
    current request. Call it from async code running in the request's task (an ``async
    def`` dependency or route): a value bound in a worker thread does not come back."""
    structlog.contextvars.bind_contextvars(**values)


_REQUEST_SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "soko_request_scope", default=None
)


@contextmanager
def request_scope(scope: Scope) -> Iterator[None]:
    """Make ``scope`` the current request's, so log lines can name the matched route
    once the router has chosen it (the route is not known when the request starts)."""
    token = _REQUEST_SCOPE.set(scope)
    try:
        yield
    finally:
        _REQUEST_SCOPE.reset(token)


def add_route(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    if "route" not in event_dict:
        scope = _REQUEST_SCOPE.get()
        if scope is not None:
            route = route_template(scope)
            if route != UNMATCHED_ROUTE:
                event_dict["route"] = route
    return event_dict


def add_trace_ids(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """The current OpenTelemetry trace and span, so a log line leads to its trace."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


# -- masking --------------------------------------------------------------------------

# Keys whose values are secret whatever they look like. A key is split into words
# (``newPassword`` -> new, password); one of these words anywhere marks it secret.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "tokens",
        "authorization",
        "cookie",
        "cookies",
        "otp",
        "totp",
        "cvv",
        "cvc",
        "pin",
        "apikey",
        "credential",
        "credentials",
        "jwt",
    }
)
# Whole keys (words joined) that are secret although their words alone are harmless:
# ``status_code`` must survive while ``code`` and ``verification_code`` must not.
_SECRET_KEYS = frozenset(
    {
        "code",
        "pan",
        "cardnumber",
        "creditcard",
        "creditcardnumber",
        "cardno",
        "securitycode",
        "verificationcode",
        "confirmationcode",
        "authcode",
        "authorizationcode",
        "resetcode",
        "otpcode",
        "apikey",
        "xapikey",
        "privatekey",
        "signingkey",
        "secretkey",
        "sessionid",
        "setcookie",
    }
)
_EMAIL_KEYS = frozenset({"email", "emailaddress", "mail"})
_PHONE_KEYS = frozenset(
    {"phone", "phonenumber", "mobile", "mobilenumber", "msisdn", "tel", "telephone"}
)
# Keys the chain itself writes, never personal data: scanning them could only corrupt
# them (a hex request id may hold a digit run that looks like a card number).
_TRUSTED_KEYS = frozenset(
    {"timestamp", "level", "logger", "request_id", "trace_id", "span_id", "route", "method"}
)

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_WORD = re.compile(r"[a-z0-9]+")


@functools.lru_cache(maxsize=4096)
def _key_kind(key: str) -> str:
    """``secret``, ``email``, ``phone`` or ``plain`` for a dictionary key."""
    words = _WORD.findall(_CAMEL_BOUNDARY.sub("_", key).lower())
    joined = "".join(words)
    if joined in _SECRET_KEYS or any(word in _SECRET_WORDS for word in words):
        return "secret"
    if joined in _EMAIL_KEYS or "email" in words:
        return "email"
    if joined in _PHONE_KEYS or "phone" in words or "msisdn" in words:
        return "phone"
    return "plain"


_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]{8,}")
_BASIC = re.compile(r"\b(Basic)\s+[A-Za-z0-9+/]{8,}={0,2}")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_PASSWORD_HASH = re.compile(r"\$(?:argon2(?:id|i|d)|2[aby]|scrypt|pbkdf2[-_a-z0-9]*)\$[^\s'\",)]+")
_SECRET_PAIR = re.compile(
    r"(?i)(?<![a-z0-9])"
    r"((?:[a-z0-9]+[_-])*"
    r"(?:password|passwd|passphrase|secret|token|api[_-]?key|otp|cvv|cvc|authorization"
    r"|cookie|session[_-]?id|card[_-]?number)"
    r"(?:[_-][a-z0-9]+)*)"
    r"([\"']?\s*[:=]\s*[\"']?)"
    r"([^\s\"'&,;})\]]+)"
)
# ``code`` and ``pin`` are common words; only their query-string and JSON forms count.
_SHORT_SECRET_PAIR = re.compile(
    r"(?i)((?<=[?&;])(?:code|pin)=|\"(?:code|pin)\"\s*:\s*\"?)([^&\s#\"',}]+)"
)
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@"
    r"((?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,})(?![A-Za-z0-9-])"
)
_CARD = re.compile(r"(?<![\w+-])\d(?:[ -]?\d){12,18}(?![\w-])")
_PHONE_INTERNATIONAL = re.compile(
    r"(?<![\w+-])\+\d{1,3}(?:[ -]?\(\d{1,4}\))?(?:[ -]?\d{1,4}){1,5}(?![\w-])"
)
_PHONE_TRUNK = re.compile(r"(?<![\w+-])0\d{2,4}(?:[ -]?\d{2,4}){1,3}(?![\w-])")
_PHONE_NANP = re.compile(r"(?<![\w+-])(?:\(\d{3}\)\s?|\d{3}-)\d{3}-\d{4}(?![\w-])")
_DIGITS = re.compile(r"\d")
_NOT_DIGIT = re.compile(r"\D")


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = _NOT_DIGIT.sub("", match.group(0))
    if 13 <= len(digits) <= 19 and _luhn_valid(digits):
        return "****" + digits[-4:]
    return match.group(0)


def _phone_masker(low: int, high: int) -> Any:
    def mask(match: re.Match[str]) -> str:
        digits = _NOT_DIGIT.sub("", match.group(0))
        if low <= len(digits) <= high:
            return "***" + digits[-3:]
        return match.group(0)

    return mask


_mask_international = _phone_masker(8, 15)
_mask_trunk = _phone_masker(9, 12)
_mask_nanp = _phone_masker(10, 10)


def mask_text(text: str) -> str:
    """``text`` with secrets, card numbers, emails and phone numbers masked."""
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(r"\1 " + REDACTED, text)
    if "Basic" in text:
        text = _BASIC.sub(r"\1 " + REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "$" in text:
        text = _PASSWORD_HASH.sub(REDACTED, text)
    if "=" in text or ":" in text:
        text = _SECRET_PAIR.sub(r"\1\2" + REDACTED, text)
        text = _SHORT_SECRET_PAIR.sub(r"\1" + REDACTED, text)
    if "@" in text:
        if "://" in text:
            text = _URL_PASSWORD.sub(r"\1" + REDACTED + "@", text)
        text = _EMAIL.sub(r"***@\1", text)
    if len(_DIGITS.findall(text, 0, 4096)) >= 8 or len(text) > 4096:
        text = _CARD.sub(_mask_card, text)
        if "+" in text:
            text = _PHONE_INTERNATIONAL.sub(_mask_international, text)
        text = _PHONE_TRUNK.sub(_mask_trunk, text)
        if "-" in text:
            text = _PHONE_NANP.sub(_mask_nanp, text)
    return text


def _mask_email_value(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    text = str(value)
    _, at, domain = text.rpartition("@")
    return f"***@{mask_text(domain)}" if at else "***"


def _mask_phone_value(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    digits = _NOT_DIGIT.sub("", str(value))
    return "***" + digits[-3:] if len(digits) > 3 else "***"


def _mask_entry(key: Any, value: Any, depth: int) -> Any:
    if isinstance(key, str):
        kind = _key_kind(key)
        if kind == "secret":
            return REDACTED
        if kind == "email":
            return _mask_email_value(value)
        if kind == "phone":
            return _mask_phone_value(value)
    return _mask_value(value, depth)


def _mask_value(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= _MAX_DEPTH:
        return "[too deep to log]"
    if isinstance(value, Mapping):
        return {
            (mask_text(k) if isinstance(k, str) else k): _mask_entry(k, v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_mask_value(item, depth + 1) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return mask_text(bytes(value).decode("utf-8", "replace"))
    # Anything else is rendered as text anyway; mask that text (a model's repr may
    # hold an email or a token).
    return mask_text(str(value))


def mask_sensitive(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: remove secrets and personal data from ``event_dict``.

    It never raises: if masking fails, the line is replaced by one that says so,
    because dropping a detail is better than leaking one.
    """
    try:
        masked: dict[str, Any] = {}
        for key, value in event_dict.items():
            if key in _TRUSTED_KEYS:
                masked[key] = value
            else:
                masked[key] = _mask_entry(key, value, 0)
        return masked
    except Exception as exc:
        return {
            "event": "log line withheld: masking failed",
            "masking_error": type(exc).__name__,
            **{key: event_dict[key] for key in _TRUSTED_KEYS if key in event_dict},
        }


def mask_field(key: str, value: Any) -> Any:
    """``value`` masked as it would be in a log line under ``key``; for other outputs
    (trace attributes) that must hide the same things."""
    try:
        return _mask_entry(key, value, 0)
    except Exception:
        return REDACTED


# -- configuration --------------------------------------------------------------------


def _chosen_format(settings: Settings, stream: TextIO) -> LogFormat:
    if settings.log_format is not LogFormat.auto:
        return settings.log_format
    if settings.is_production:
        return LogFormat.json
    isatty = getattr(stream, "isatty", None)
    return LogFormat.console if isatty is not None and isatty() else LogFormat.json


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Route structlog and the standard library's records through one masked chain,
    written to ``stream`` (standard error by default)."""
    output = stream if stream is not None else sys.stderr
    fmt = _chosen_format(settings, output)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_route,
        add_trace_ids,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if fmt is LogFormat.console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            mask_sensitive,
            renderer,
        ],
    )
    handler = logging.StreamHandler(output)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
