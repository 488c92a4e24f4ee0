"""Channels: what carries a notification out of Soko once its delivery job runs.

A :class:`Channel` takes a decrypted :class:`~soko.notifications.messages.Sms` or
:class:`~soko.notifications.messages.Email`. The embedded default is :class:`FileSink`;
the providers of :mod:`soko.notifications.providers` (SMTP, SendGrid, Africa's Talking,
Twilio) are the others, chosen per kind by :func:`configured_channel` from the settings.
The HTTP client and the per-provider circuit breakers they share live in one
:class:`ProviderServices` per process (:func:`provider_services`).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any, Protocol

import httpx2
import structlog

from soko.notifications.messages import Email, Notification, NotificationKind, Sms
from soko.notifications.providers import (
    AfricasTalkingSms,
    SendGridEmail,
    Sent,
    SmtpEmail,
    TwilioSms,
)
from soko.platform.breaker import CircuitBreaker
from soko.platform.clock import Clock
from soko.platform.config import Settings

log = structlog.get_logger("soko.notifications")

SINK_DIRECTORY = "messages"
_READ_CHUNK = 1 << 20


class Channel(Protocol):
    """Hands notifications to the world.

    The outbox delivers at least once: after a crash between the hand-over and the
    commit of the delivery job, :meth:`deliver` is called again with the same
    notification. A channel must make that repeat harmless where it can, for example by
    passing ``notification.id`` to the provider as its idempotency key. An exception
    means "not delivered" (see :mod:`soko.notifications.providers` for which).
    """

    provider: str

    async def deliver(self, notification: Notification) -> Sent: ...


class FileSink:
    """The embedded default channel: each notification becomes one JSON line in
    ``<data_dir>/messages/sms.jsonl`` or ``email.jsonl`` and one log line.

    The log line names the notification and its category, with the recipient under a
    ``phone``/``email`` key so the log's masking step shortens it to its last digits or
    its domain; it never carries the text, which may hold a sign-in code or a reset
    link. **A developer reads codes and links from the files**, for example::

        tail -f var/messages/sms.jsonl

    Each line holds ``id`` (the notification's; stable across redeliveries), ``kind``,
    ``created_at``, ``category``, ``to`` and ``body`` (SMS) or ``subject``, ``text`` and
    ``html`` (email). The directory is created 0700 and the files 0600: they hold
    personal data and secrets in clear, fit for development only.

    Exactly one line per notification: the check and the append happen under an
    exclusive ``flock`` on the file, so a redelivered notification whose id is already
    in the file is skipped, and writers in other threads or processes never interleave
    (each line is also a single ``O_APPEND`` write). The check reads the whole file,
    which is fine at development volumes; deleting the file forgets the ids in it.
    """

    provider = "file"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> FileSink:
        return cls(data_dir / SINK_DIRECTORY)

    def path_for(self, kind: NotificationKind) -> Path:
        return self.directory / f"{kind.value}.jsonl"

    async def deliver(self, notification: Notification) -> Sent:
        path = self.path_for(notification.kind)
        line = json.dumps(
            sink_record(notification), ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8")
        written = await asyncio.to_thread(
            _append_once, path, _id_marker(str(notification.id)), line + b"\n"
        )
        recipient = "phone" if notification.kind is NotificationKind.sms else "email"
        fields: dict[str, Any] = {
            "notification_id": str(notification.id),
            "category": notification.category,
            recipient: notification.to,
            "file": str(path),
        }
        if written:
            log.info(f"{notification.kind.value} written to the development sink", **fields)
        else:
            log.info(f"{notification.kind.value} already in the development sink", **fields)
        return Sent(self.provider, str(notification.id), delivered=True)


def sink_record(notification: Notification) -> dict[str, Any]:
    """The JSON object :class:`FileSink` writes for ``notification``; ``id`` first."""
    record: dict[str, Any] = {
        "id": str(notification.id),
        "kind": notification.kind.value,
        "created_at": notification.created_at.isoformat(),
        "category": notification.category,
        "to": notification.to,
    }
    if isinstance(notification, Sms):
        record["body"] = notification.body
    elif isinstance(notification, Email):
        record.update(subject=notification.subject, text=notification.text, html=notification.html)
    return record


def _id_marker(notification_id: str) -> bytes:
    # The compact form of the record's first key. Inside a JSON string every quote is
    # escaped, so no text of a message can contain this byte sequence.
    return b'{"id":"' + notification_id.encode("ascii") + b'"'


def _append_once(path: Path, marker: bytes, line: bytes) -> bool:
    """Append ``line`` unless a line starting with ``marker`` is there; True if written."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        info = os.fstat(fd)
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        if _holds(fd, info.st_size, marker):
            return False
        if info.st_size and os.pread(fd, 1, info.st_size - 1) != b"\n":
            # A line torn by a crash mid-write: end it, so ours starts a line of its own.
            line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        return True
    finally:
        os.close(fd)  # also releases the lock


def _holds(fd: int, size: int, marker: bytes) -> bool:
    # A record starts the file or follows a newline; chunks overlap so a marker split
    # between two reads is still found.
    needle = b"\n" + marker
    carry = b"\n"
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(_READ_CHUNK, size - offset), offset)
        if not chunk:
            break
        window = carry + chunk
        if needle in window:
            return True
        carry = window[-(len(needle) - 1) :]
        offset += len(chunk)
    return False


def read_sink_file(path: Path) -> list[dict[str, Any]]:
    """Every record in a :class:`FileSink` file, oldest first; a line torn by a crash
    is left out."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    for raw in content.splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class ProviderServices:
    """What the provider channels of one process share: an HTTP client with the
    configured timeout, and one circuit breaker per provider
    (:class:`soko.platform.breaker.CircuitBreaker`, in this process's memory: each
    worker judges a provider by its own calls)."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.http = httpx2.AsyncClient(
            timeout=settings.notifications_http_timeout_seconds,
            transport=transport,
            follow_redirects=False,
        )
        self.breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, provider: str) -> CircuitBreaker:
        breaker = self.breakers.get(provider)
        if breaker is None:
            breaker = CircuitBreaker(
                f"notifications.{provider}",
                failure_threshold=self.settings.notifications_breaker_failures,
                reset_seconds=self.settings.notifications_breaker_reset_seconds,
                clock=self.clock,
            )
            self.breakers[provider] = breaker
        return breaker

    async def close(self) -> None:
        await self.http.aclose()


EXTENSION = "notifications"


def provider_services(runtime: Any) -> ProviderServices:
    """The runtime's :class:`ProviderServices`, made on first use and closed when the
    runtime stops. A test puts its own (with a mock transport) in
    ``runtime.extensions["notifications"]`` first."""
    services = runtime.extensions.get(EXTENSION)
    if not isinstance(services, ProviderServices):
        services = ProviderServices(runtime.settings, runtime.clock)
        runtime.extensions[EXTENSION] = services
        runtime.on_stop(services.close)
    return services


def callback_url(settings: Settings, provider: str) -> str:
    """Where ``provider`` sends its delivery reports: ``SOKO_PUBLIC_URL`` + the route."""
    return f"{settings.public_url.rstrip('/')}/api/v1/notifications/callbacks/{provider}"


def configured_channel(
    settings: Settings, kind: NotificationKind, services: ProviderServices | None = None
) -> Channel:
    """The channel that carries notifications of ``kind`` under ``settings``: the file
    sink unless ``SOKO_NOTIFICATIONS_EMAIL_PROVIDER`` / ``_SMS_PROVIDER`` names a
    provider (which needs the process's ``services``)."""
    name = (
        settings.notifications_sms_provider
        if kind is NotificationKind.sms
        else settings.notifications_email_provider
    )
    if name == "file" or services is None:
        return FileSink.in_data_dir(settings.data_dir)
    timeout = settings.notifications_http_timeout_seconds
    channel: Any
    if name == "smtp":
        channel = SmtpEmail(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value(),
            sender=settings.notifications_email_from,
            timeout=timeout,
        )
    elif name == "sendgrid":
        channel = SendGridEmail(
            services.http,
            base=settings.sendgrid_api_base,
            api_key=settings.sendgrid_api_key.get_secret_value(),
            sender=settings.notifications_email_from,
        )
    elif name == "africastalking":
        channel = AfricasTalkingSms(
            services.http,
            base=settings.africastalking_api_base,
            username=settings.africastalking_username,
            api_key=settings.africastalking_api_key.get_secret_value(),
            sender=settings.notifications_sms_sender,
        )
    elif name == "twilio":
        channel = TwilioSms(
            services.http,
            base=settings.twilio_api_base,
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token.get_secret_value(),
            sender=settings.notifications_sms_sender,
            status_callback=callback_url(settings, "twilio"),
        )
    else:  # the settings' patterns allow nothing else
        raise ValueError(f"unknown notification provider {name!r}")
    typed: Channel = channel
    return typed
