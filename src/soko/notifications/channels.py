"""Channels: what carries a notification out of Soko once its delivery job runs.

A :class:`Channel` takes a decrypted :class:`~soko.notifications.messages.Sms` or
:class:`~soko.notifications.messages.Email`. The embedded default is :class:`FileSink`;
SMS and email providers (Africa's Talking, Twilio, SMTP...) will be further channels,
chosen per kind by :func:`configured_channel` from the settings.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any, Protocol

import structlog

from soko.notifications.messages import Email, Notification, NotificationKind, Sms
from soko.platform.config import Settings

log = structlog.get_logger("soko.notifications")

SINK_DIRECTORY = "messages"
_READ_CHUNK = 1 << 20


class Channel(Protocol):
    """Hands notifications to the world.

    The outbox delivers at least once: after a crash between the hand-over and the
    commit of the delivery job, :meth:`deliver` is called again with the same
    notification. A channel must make that repeat harmless, for example by passing
    ``notification.id`` to the provider as its idempotency key. An exception means "not
    delivered": the job is retried with backoff.
    """

    async def deliver(self, notification: Notification) -> None: ...


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

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> FileSink:
        return cls(data_dir / SINK_DIRECTORY)

    def path_for(self, kind: NotificationKind) -> Path:
        return self.directory / f"{kind.value}.jsonl"

    async def deliver(self, notification: Notification) -> None:
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


def configured_channel(settings: Settings, kind: NotificationKind) -> Channel:
    """The channel that carries notifications of ``kind`` under ``settings``.

    Only the file sink exists yet; provider channels will be chosen here.
    """
    return FileSink.in_data_dir(settings.data_dir)
