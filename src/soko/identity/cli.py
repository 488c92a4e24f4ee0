"""Identity commands for the `soko` command line: `soko audit verify`."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.exc import DBAPIError

from soko.identity.audit import ChainReport, audit_chain_length, verify_audit_chain
from soko.platform.commands import command_settings, err, exit_database_unusable, out
from soko.platform.config import Settings
from soko.platform.db import Database, create_engine

audit_app = typer.Typer(help="Inspect the audit log.", no_args_is_help=True)


async def _verify(settings: Settings, batch_size: int) -> ChainReport:
    database = Database(create_engine(settings.effective_database_url, pool_size=1))
    try:
        async with database.transaction(read_only=True) as session:
            total = await audit_chain_length(session)
            with Progress(
                TextColumn("verifying the audit log"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
                disable=total < batch_size,  # a bar for one batch is noise
            ) as progress:
                task = progress.add_task("verify", total=total)
                return await verify_audit_chain(
                    session,
                    batch_size=batch_size,
                    on_progress=lambda checked: progress.update(task, completed=checked),
                )
    finally:
        await database.dispose()


@audit_app.command("verify")
def verify(
    batch_size: Annotated[
        int, typer.Option(min=1, max=100_000, help="Events read per query")
    ] = 2000,
) -> None:
    """Check the audit log's hash chain; exit 0 when intact, 1 when broken."""
    settings = command_settings()
    try:
        report = asyncio.run(_verify(settings, batch_size))
    except DBAPIError as exc:
        exit_database_unusable(exc, "read the audit log")
    if report.ok:
        out.print(f"[green]audit log intact:[/] {report.checked} events verified")
        if report.last_seq is not None:
            # The chain cannot tell that its newest events were deleted; comparing the
            # head with one noted earlier (or kept elsewhere) can.
            out.print(f"head: seq {report.last_seq} hash {report.last_hash}", highlight=False)
        return
    reason = report.reason.value if report.reason is not None else "unknown"
    out.print(
        f"[bold red]audit log broken at seq {report.broken_seq}:[/] {reason} ({report.detail})",
        highlight=False,
    )
    out.print(f"{report.checked} events verified before the break", highlight=False)
    raise typer.Exit(1)
