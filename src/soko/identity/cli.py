"""Identity commands for the `soko` command line: `soko audit verify`."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.exc import DBAPIError

from soko.identity.audit import ChainReport, audit_chain_length, verify_audit_chain
from soko.platform.config import ConfigError, Settings, load_settings
from soko.platform.db import Database, create_engine

audit_app = typer.Typer(help="Inspect the audit log.", no_args_is_help=True)

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        err.print("[bold red]Soko cannot start: the configuration has problems[/]")
        for line in exc.problems:
            err.print(f"  - {line}", markup=False, highlight=False)
        raise typer.Exit(2) from None


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
    settings = _settings()
    try:
        report = asyncio.run(_verify(settings, batch_size))
    except DBAPIError as exc:
        first_line = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
        err.print("[bold red]cannot read the audit log:[/]", end=" ")
        err.print(
            f"{first_line} (is the database migrated? `soko migrate upgrade`)",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(2) from None
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
