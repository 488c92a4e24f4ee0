"""`soko keys`: the keys that encrypt personal data at rest.

``soko keys new`` prints a fresh key and the ``SOKO_ENCRYPTION_KEYS`` value that puts it
first; ``soko keys rotate`` re-encrypts every value under the active key (as a background
job, or inline with ``--wait``); ``soko keys status`` counts the values under each key, so
an operator knows when an old key can be dropped.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from soko.identity.key_rotation import (
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_SIZE,
    BatchOutcome,
    KeyUsage,
    key_usage,
    record_rotation_request,
    request_rotation,
    rotate_all,
    values_to_rotate,
)
from soko.platform.commands import command_settings, err, exit_database_unusable, out
from soko.platform.config import Settings
from soko.platform.crypto import (
    BLIND_INDEX_KEY_LABEL,
    ENCRYPTION_KEY_LABEL,
    DataKeys,
    KeyConfigError,
    Keyring,
    hkdf_sha256,
    new_key_spec,
)
from soko.platform.runtime import Runtime

keys_app = typer.Typer(
    help="Keys that encrypt personal data at rest: new, rotate, status.", no_args_is_help=True
)


T = TypeVar("T")


def configured_data_keys(settings: Settings) -> DataKeys:
    """The data keys exactly as :class:`Runtime` builds them, without starting anything."""
    return DataKeys.from_config(
        master_secret=settings.secret_key.get_secret_value().encode(),
        encryption_keys=settings.encryption_keys.get_secret_value(),
        blind_index_key=settings.blind_index_key.get_secret_value(),
    )


def _run(settings: Settings, work: Callable[[Runtime], Awaitable[T]]) -> T:
    async def main() -> T:
        runtime = Runtime(settings)
        try:
            return await work(runtime)
        finally:
            await runtime.stop()

    try:
        return asyncio.run(main())
    except DBAPIError as exc:
        exit_database_unusable(exc, "read the database")


# -- soko keys new --------------------------------------------------------------------------

_NUMBERED_ID = re.compile(r"k(\d+)")


def next_key_id(existing: tuple[str, ...]) -> str:
    """``k<n>`` one past the highest numbered key id in use (``k1`` when there is none)."""
    numbers = [int(m.group(1)) for kid in existing if (m := _NUMBERED_ID.fullmatch(kid))]
    return f"k{max(numbers, default=0) + 1}"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def derived_key_specs(master_secret: bytes, key_ids: tuple[str, ...]) -> str:
    """The ``SOKO_ENCRYPTION_KEYS`` entries equal to keys derived from the secret key, so
    data written in development stays readable once keys are configured explicitly."""
    return ",".join(
        f"{kid}:{_b64url(hkdf_sha256(master_secret, info=(ENCRYPTION_KEY_LABEL + kid).encode()))}"
        for kid in key_ids
    )


def derived_blind_index_key(master_secret: bytes) -> str:
    return _b64url(hkdf_sha256(master_secret, info=BLIND_INDEX_KEY_LABEL.encode()))


@keys_app.command("new")
def new(
    key_id: Annotated[
        str | None,
        typer.Option(help="The new key's id (1-32 of A-Z a-z 0-9 _ -); default: the next k<n>"),
    ] = None,
) -> None:
    """Print a fresh encryption key and the SOKO_ENCRYPTION_KEYS value that makes it active.

    Nothing is changed: set the printed value on every API and worker process, restart
    them, then run `soko keys rotate`.
    """
    settings = command_settings()
    master = settings.secret_key.get_secret_value().encode()
    configured = settings.encryption_keys.get_secret_value().strip()
    keyring = configured_data_keys(settings).keyring
    chosen = key_id or next_key_id(keyring.key_ids)
    if chosen in keyring.key_ids:
        err.print(f"[bold red]error:[/] key id {chosen!r} is already in use", highlight=False)
        raise typer.Exit(2)
    try:
        spec = new_key_spec(chosen)
    except KeyConfigError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    older = configured if configured else derived_key_specs(master, keyring.key_ids)
    out.print(f"new key: {spec}", markup=False, highlight=False)
    out.print(
        "Set this on every API and worker process (the new key first, then the current "
        "ones, which keep decrypting what they encrypted):",
        highlight=False,
    )
    out.print(f"SOKO_ENCRYPTION_KEYS={spec},{older}", markup=False, highlight=False)
    if not configured:
        out.print(
            "The keys after the new one are the development keys derived from "
            "SOKO_SECRET_KEY, written out so they no longer depend on it.",
            highlight=False,
        )
    if not settings.blind_index_key.get_secret_value().strip():
        out.print(
            "The blind index key is derived from SOKO_SECRET_KEY too; pin it as it is "
            "(another one would stop every lookup by email or phone from matching):",
            highlight=False,
        )
        out.print(
            f"SOKO_BLIND_INDEX_KEY={derived_blind_index_key(master)}",
            markup=False,
            highlight=False,
        )
    out.print(
        "Then restart, run `soko keys rotate`, and drop an old key once `soko keys status` "
        "shows no value under it and the notifications queued before the switch are sent.",
        highlight=False,
    )


# -- soko keys status -----------------------------------------------------------------------


def _key_state(keyring: Keyring, key_id: str) -> str:
    if key_id == keyring.active_key_id:
        return "active"
    if key_id in keyring.key_ids:
        return "older: to re-encrypt"
    return "NOT CONFIGURED: cannot be decrypted"


@keys_app.command("status")
def status() -> None:
    """Count the encrypted values under each key id (read from the ciphertext headers)."""
    settings = command_settings()

    async def read(runtime: Runtime) -> tuple[list[KeyUsage], Keyring]:
        async with runtime.db.transaction(read_only=True) as session:
            return await key_usage(session), runtime.data_keys.keyring

    usage, keyring = _run(settings, read)
    out.print(f"active key: {keyring.active_key_id}", highlight=False)
    if not usage:
        out.print("no encrypted value is stored yet", highlight=False)
        return
    table = Table("column", "key id", "values", "key")
    for row in usage:
        table.add_row(row.column, row.key_id, str(row.values), _key_state(keyring, row.key_id))
    out.print(table)
    older = sum(
        u.values for u in usage if u.key_id != keyring.active_key_id and u.key_id in keyring.key_ids
    )
    unknown = sum(u.values for u in usage if u.key_id not in keyring.key_ids)
    if older:
        out.print(f"{older} values are under older keys: run `soko keys rotate`", highlight=False)
    if unknown:
        out.print(
            f"[bold red]{unknown} values are under keys that are not configured:[/] put those "
            "keys back in SOKO_ENCRYPTION_KEYS or the values stay unreadable",
            highlight=False,
        )
    if not older and not unknown:
        out.print("every value is under the active key", highlight=False)


# -- soko keys rotate -----------------------------------------------------------------------


@keys_app.command("rotate")
def rotate(
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Re-encrypt here and now with a progress display, not as a job"
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH_SIZE, help="Values re-encrypted per transaction")
    ] = DEFAULT_BATCH_SIZE,
) -> None:
    """Re-encrypt every value that is not under the active key (the first one of
    SOKO_ENCRYPTION_KEYS). Safe to run twice or while the service runs."""
    settings = command_settings()
    if wait:
        _rotate_now(settings, batch_size)
    else:
        _enqueue_rotation(settings, batch_size)


def _enqueue_rotation(settings: Settings, batch_size: int) -> None:
    async def enqueue(runtime: Runtime) -> tuple[int, str]:
        keyring = runtime.data_keys.keyring
        async with runtime.db.transaction() as session:
            waiting = await values_to_rotate(session, keyring)
            if waiting:
                job_id = await request_rotation(
                    session, keyring, clock=runtime.clock, batch_size=batch_size
                )
                return waiting, str(job_id)
        return 0, ""

    keyring = configured_data_keys(settings).keyring
    waiting, job_id = _run(settings, enqueue)
    if not waiting:
        out.print(
            f"every value is already under the active key {keyring.active_key_id}",
            highlight=False,
        )
        return
    out.print(
        f"re-encryption of {waiting} values under key {keyring.active_key_id} is queued "
        f"(job {job_id}); `soko worker` or the API's in-process dispatcher runs it. "
        "Follow it with `soko keys status`.",
        highlight=False,
    )


def _rotate_now(settings: Settings, batch_size: int) -> None:
    async def run(runtime: Runtime) -> dict[str, int]:
        keyring = runtime.data_keys.keyring
        async with runtime.db.transaction(read_only=True) as session:
            waiting = await values_to_rotate(session, keyring)
        async with runtime.db.transaction() as session:
            await record_rotation_request(session, keyring, clock=runtime.clock, via="inline")
        with Progress(
            TextColumn(f"re-encrypting under key {keyring.active_key_id}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
        ) as progress:
            task = progress.add_task("rotate", total=waiting)

            def advance(outcome: BatchOutcome) -> None:
                done = outcome.rotated + outcome.changed_meanwhile + outcome.unreadable
                progress.advance(task, done)

            return await rotate_all(
                runtime.db.transaction,
                keyring,
                clock=runtime.clock,
                batch_size=batch_size,
                on_batch=advance,
            )

    totals = _run(settings, run)
    out.print(
        f"re-encrypted {totals['rotated']} values; {totals['changed_meanwhile']} changed "
        f"meanwhile (already rewritten by their owner); {totals['unreadable']} unreadable",
        highlight=False,
    )
    if totals["unreadable"]:
        err.print(
            "[bold red]some values could not be decrypted with any configured key;[/] "
            "`soko keys status` shows under which key ids",
            highlight=False,
        )
        raise typer.Exit(1)
