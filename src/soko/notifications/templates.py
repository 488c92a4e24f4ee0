"""Message templates: Jinja2 in a sandbox, one file per template and locale.

A template is one Jinja source with named blocks, one per part:

* ``subject``: the email's subject (one line);
* ``text``: the email's plain-text body;
* ``html``: the email's HTML body, rendered with autoescape on;
* ``sms``: the SMS text (optional: a template without it sends no SMS), at most
  :data:`SMS_MAX_SEGMENTS` segments (:func:`sms_segments`);
* ``title``: the in-app notification's title (its body is ``text``).

Bundled defaults live in ``soko/notifications/templates/<locale>/<name>.jinja``; an
administrator's override of one (name, locale) is stored in ``notifications_templates``
and used instead. Sending reads the overrides through the cache (:func:`render`, every
override in one entry, dropped whenever one changes: :data:`TEMPLATES_TAG`), since
every message would otherwise ask the database whether its template was overridden.
Sources are compiled in a :class:`SandboxedEnvironment` (no attribute access to Python
internals, no imports), twice: with autoescape for the ``html`` block and without for
the other parts, which are not HTML.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.notifications.models import TemplateOverride
from soko.platform.db import dialect_insert
from soko.platform.money import minor_units
from soko.platform.runtime import Runtime, invalidate_after_commit

LOCALES = ("en", "sw")
PARTS = ("subject", "text", "html", "sms", "title")
REQUIRED_PARTS = ("subject", "text", "html", "title")
SMS_MAX_SEGMENTS = 3
SOURCE_MAX_LENGTH = 20_000
SUBJECT_MAX_LENGTH = 200

# GSM 03.38: the basic character set, and the extension table (escape + char: 2 septets).
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = set("^{}\\[~]|€\f")


@dataclass(frozen=True, slots=True)
class SmsLength:
    """How an SMS text travels: its encoding, length in septets (GSM-7) or UTF-16 code
    units (UCS-2), and the number of segments it takes."""

    encoding: str
    units: int
    segments: int


def sms_segments(text: str) -> SmsLength:
    """Segments per 3GPP TS 23.038/23.040: GSM-7 takes 160 septets in one segment or
    153 per segment when concatenated (the header takes the rest); any character
    outside GSM-7 makes the whole text UCS-2, 70 code units or 67 per segment. An
    extension character (``€``, ``[``...) costs two septets."""
    if all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text):
        units = sum(2 if ch in GSM7_EXTENSION else 1 for ch in text)
        single, multi, encoding = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, multi, encoding = 70, 67, "UCS-2"
    segments = 1 if units <= single else -(-units // multi)
    return SmsLength(encoding=encoding, units=units, segments=segments)


def format_money(amount_minor: int | None, currency: str | None) -> str:
    if amount_minor is None or not currency:
        return ""
    try:
        places = minor_units(currency)
    except ValueError:
        places = 2
    sign = "-" if amount_minor < 0 else ""
    whole, fraction = divmod(abs(amount_minor), 10**places)
    text = f"{whole:,}" + (f".{fraction:0{places}d}" if places else "")
    return f"{currency} {sign}{text}"


def _environment(autoescape: bool) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        autoescape=autoescape,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters["money"] = format_money
    return env


_PLAIN = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


@functools.lru_cache(maxsize=512)
def _compiled(source: str, autoescape: bool) -> Any:
    return (_HTML if autoescape else _PLAIN).from_string(source)


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str
    title: str
    sms: str | None


def _block(source: str, part: str, context: dict[str, Any]) -> str | None:
    template = _compiled(source, part == "html")
    block = template.blocks.get(part)
    if block is None:
        return None
    return "".join(block(template.new_context(context))).strip()


def render_source(source: str, context: dict[str, Any]) -> Rendered:
    """Render every part of ``source``; raises :class:`TemplateProblem` listing what is
    wrong (a syntax error, an undefined name, a missing part, a part too long)."""
    errors: list[dict[str, str]] = []
    if len(source) > SOURCE_MAX_LENGTH:
        raise TemplateProblem([{"part": "source", "message": "the template is too long"}])
    parts: dict[str, str | None] = {}
    for part in PARTS:
        try:
            parts[part] = _block(source, part, context)
        except TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if line else ""
            errors.append({"part": part, "message": f"{type(exc).__name__}{where}: {exc}"})
            if part == PARTS[0]:
                break  # a syntax error fails every part alike
    if errors:
        raise TemplateProblem(errors)
    for part in REQUIRED_PARTS:
        if not parts.get(part):
            errors.append({"part": part, "message": f"the {part!r} block is missing or empty"})
    subject = parts.get("subject") or ""
    if "\n" in subject or "\r" in subject or len(subject) > SUBJECT_MAX_LENGTH:
        errors.append(
            {"part": "subject", "message": f"one line of at most {SUBJECT_MAX_LENGTH} characters"}
        )
    sms = parts.get("sms") or None
    if sms is not None:
        length = sms_segments(sms)
        if length.segments > SMS_MAX_SEGMENTS:
            errors.append(
                {
                    "part": "sms",
                    "message": f"{length.segments} segments ({length.units} {length.encoding} "
                    f"units); at most {SMS_MAX_SEGMENTS}",
                }
            )
    if errors:
        raise TemplateProblem(errors)
    return Rendered(
        subject=subject,
        text=parts["text"] or "",
        html=parts["html"] or "",
        title=(parts["title"] or "")[:200],
        sms=sms,
    )


class TemplateProblem(ValueError):
    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['part']}: {e['message']}" for e in errors))


# -- where sources come from -------------------------------------------------------------------


def template_names() -> list[str]:
    """Every bundled template's name, sorted."""
    folder = resources.files("soko.notifications") / "templates" / "en"
    return sorted(
        entry.name.removesuffix(".jinja")
        for entry in folder.iterdir()
        if entry.name.endswith(".jinja")
    )


@functools.lru_cache(maxsize=256)
def bundled_source(name: str, locale: str) -> str | None:
    if locale not in LOCALES or not name.replace(".", "").replace("_", "").isalnum():
        return None
    if not name.isascii():
        return None
    path = resources.files("soko.notifications") / "templates" / locale / f"{name}.jinja"
    try:
        return path.read_text("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


def override_key(name: str, locale: str) -> str:
    return f"{name}:{locale}"


def _locales_tried(locale: str) -> tuple[str, ...]:
    return (locale,) if locale == "en" else (locale, "en")


def _chosen_source(name: str, locale: str, overrides: Mapping[str, str]) -> str | None:
    """The source used for (name, locale) given the ``overrides`` by key: the override
    if any, else the bundled one; a locale without the template falls back to English."""
    for tried in _locales_tried(locale):
        override = overrides.get(override_key(name, tried))
        source = override if override is not None else bundled_source(name, tried)
        if source is not None:
            return source
    return None


@functools.lru_cache(maxsize=1)
def _overrides_of_keys_statement() -> Any:
    overrides: Any = TemplateOverride.__table__
    return select(overrides.c.key, overrides.c.source).where(
        overrides.c.key.in_(bindparam("keys", expanding=True))
    )


async def effective_source(session: AsyncSession, name: str, locale: str) -> str | None:
    """The source used for (name, locale), read in ``session``: the override if any,
    else the bundled one; a locale without the template falls back to English."""
    keys = [override_key(name, tried) for tried in _locales_tried(locale)]
    rows = await session.execute(_overrides_of_keys_statement(), {"keys": keys})
    return _chosen_source(name, locale, {key: source for key, source in rows})


# The cache tag of the overrides; every change to one invalidates it.
TEMPLATES_TAG = "notifications:templates"
_OVERRIDES_CACHE_KEY = "notifications:template-overrides:v1"
# A safety net: every change invalidates the entry.
_OVERRIDES_TTL_SECONDS = 300.0


@functools.lru_cache(maxsize=1)
def _all_overrides_statement() -> Any:
    overrides: Any = TemplateOverride.__table__
    return select(overrides.c.key, overrides.c.source)


async def _overrides(runtime: Runtime) -> dict[str, str]:
    """Every override's source by key, from the cache. Read on a connection of its own,
    never a caller's transaction, whose uncommitted writes must not reach the cache."""

    async def load() -> dict[str, str]:
        async with runtime.db.reading() as connection:
            rows = await connection.execute(_all_overrides_statement())
            return {key: source for key, source in rows}

    found: dict[str, str] = await runtime.cache.get_or_set(
        _OVERRIDES_CACHE_KEY, load, ttl=_OVERRIDES_TTL_SECONDS, tags=(TEMPLATES_TAG,), near=True
    )
    return found


def overrides_changed(session: AsyncSession) -> None:
    """Call after changing an override in ``session``: sending sees it once it commits."""
    invalidate_after_commit(session, TEMPLATES_TAG)


async def render(runtime: Runtime, name: str, locale: str, context: dict[str, Any]) -> Rendered:
    """Render the template (name, locale) a message is sent with: the override if any,
    else the bundled one; a locale without the template falls back to English."""
    source = _chosen_source(name, locale, await _overrides(runtime))
    if source is None:
        raise LookupError(f"no template named {name!r}")
    return render_source(source, context)


# Sample data for previews and validation: every name any bundled template uses.
SAMPLE_CONTEXT: dict[str, Any] = {
    "app": {"name": "Soko", "url": "https://soko.example"},
    "recipient": {"name": "Wanjiku Kamau"},
    "order": {
        "id": str(uuid.UUID(int=1)),
        "number": "SK-20300101-0001",
        "total_minor": 250_000,
        "currency": "KES",
        "status": "paid",
        "reason": "The buyer changed their mind",
        "carrier": "G4S",
        "tracking_number": "G4S123456",
        "refund_minor": 250_000,
    },
    "dispute": {
        "id": str(uuid.UUID(int=2)),
        "outcome": "refund",
        "refund_minor": 120_000,
        "currency": "KES",
    },
    "store": {"name": "Duka la Mama", "reason": "Listing counterfeit goods"},
    "payment": {"amount_minor": 250_000, "currency": "KES"},
    "sign_in": {"device": "Chrome on Android", "at": "2030-01-01T08:30:00+00:00"},
    "now": dt.datetime(2030, 1, 1, tzinfo=dt.UTC).isoformat(),
}


async def store_override(
    session: AsyncSession, key: str, source: str, user_id: uuid.UUID | None, now: dt.datetime
) -> None:
    """Store an administrator's source for ``key`` (an upsert that counts versions, so
    two concurrent saves both land, the later one winning)."""
    insert = dialect_insert(session)
    statement = insert(TemplateOverride).values(
        key=key, source=source, version=1, updated_at=now, updated_by=user_id
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["key"],
            set_={
                "source": source,
                "version": TemplateOverride.version + 1,
                "updated_at": now,
                "updated_by": user_id,
            },
        )
    )
