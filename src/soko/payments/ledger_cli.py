"""`soko ledger verify`: check that the ledger balances, from the command line.

Exits 0 when every transaction's entries sum to zero and the trial balance is zero in
every currency, 1 when not (the unbalanced transactions are listed), 2 when the
database cannot be read. Meant for cron and for operators after a restore.
"""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from soko.payments.ledger import LedgerCheck, verify_ledger
from soko.platform.commands import command_settings, err, out
from soko.platform.db import lift_statement_timeout
from soko.platform.runtime import Runtime

EXIT_BALANCED = 0
EXIT_UNBALANCED = 1
EXIT_UNREADABLE = 2


def print_check(result: LedgerCheck, console: Console = out) -> None:
    """The check as an operator reads it: the verdict, the trial balance per currency,
    and the transactions that do not balance."""
    table = Table(title="Trial balance", show_lines=False)
    table.add_column("currency")
    table.add_column("sum of entries (minor units)", justify="right")
    for currency, total in sorted(result.trial_balance.items()):
        table.add_row(currency, str(total))
    if result.trial_balance:
        console.print(table)
    console.print(
        f"{result.entries} entries checked in {result.seconds * 1000:.1f} ms", highlight=False
    )
    if result.balanced:
        console.print("[bold green]The ledger balances.[/]")
        return
    console.print("[bold red]The ledger does not balance.[/]")
    for transaction_id in result.unbalanced_transaction_ids:
        console.print(f"  unbalanced transaction {transaction_id}", highlight=False)
    if result.unbalanced_truncated:
        console.print("  ... and more", highlight=False)


async def verify_command(runtime: Runtime, console: Console = out) -> int:
    """Run the check on ``runtime``'s database, print it, and return the exit code."""
    try:
        async with runtime.db.transaction(read_only=True) as session:
            # Two statements over the whole ledger: as long as they need, unlike the
            # API's check, which a request's statement timeout bounds.
            await lift_statement_timeout(session)
            result = await verify_ledger(session)
    except DBAPIError as exc:
        first_line = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
        err.print("[bold red]cannot read the ledger:[/]", end=" ")
        err.print(
            f"{first_line} (is the database migrated? `soko migrate upgrade`)",
            markup=False,
            highlight=False,
        )
        return EXIT_UNREADABLE
    print_check(result, console)
    return EXIT_BALANCED if result.balanced else EXIT_UNBALANCED


def ledger_commands() -> typer.Typer:
    """The ``soko ledger`` command group (``app.add_typer(ledger_commands(),
    name="ledger")``)."""
    ledger_app = typer.Typer(help="The payments ledger.", no_args_is_help=True)

    @ledger_app.callback()
    def ledger() -> None:
        """The payments ledger."""

    @ledger_app.command("verify")
    def verify() -> None:
        """Check that every transaction balances and the trial balance is zero."""
        settings = command_settings()

        async def run() -> int:
            runtime = Runtime(settings)
            try:
                return await verify_command(runtime)
            finally:
                await runtime.stop()

        raise typer.Exit(asyncio.run(run()))

    return ledger_app
