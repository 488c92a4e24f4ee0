"""`soko seed demo`: a new marketplace filled with demo stores, products and accounts.

``soko.cli`` mounts the group with the app factory (``seed_commands(...)``); the
command refuses production unless forced, and refuses a database that already has
accounts (exit 1) unless ``--if-empty`` says to do nothing then, which is how
``make run`` calls it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from soko.demo.seed import (
    AppFactory,
    DemoLogin,
    DemoPasswords,
    SeedFailed,
    has_accounts,
    seed_demo,
    step_count,
)
from soko.platform.commands import command_settings, err, exit_database_unusable, out
from soko.platform.config import Settings
from soko.platform.runtime import Runtime


def seed_commands(app_factory: AppFactory) -> typer.Typer:
    """The ``soko seed`` command group, seeding through the app ``app_factory`` builds
    on a runtime."""
    seed_app = typer.Typer(help="Fill the database with data.", no_args_is_help=True)

    @seed_app.callback()
    def seed() -> None:
        """Fill the database with data."""

    @seed_app.command("demo")
    def demo(
        if_empty: Annotated[
            bool,
            typer.Option(
                "--if-empty",
                help="Do nothing (and succeed) when the database already has accounts",
            ),
        ] = False,
        if_enabled: Annotated[
            bool,
            typer.Option(
                "--if-enabled",
                help="Do nothing (and succeed) when SOKO_SEED_DEMO is false",
            ),
        ] = False,
        force: Annotated[
            bool,
            typer.Option("--force", help="Seed even with SOKO_ENV=production (random passwords)"),
        ] = False,
    ) -> None:
        """Create a demo marketplace: an administrator, four stores with products, stock
        and a buyer; then print how to sign in."""
        settings = command_settings()
        if if_enabled and not settings.seed_demo:
            return
        if settings.is_production and not force:
            err.print(
                "[bold red]refusing:[/] this is a production configuration (SOKO_ENV="
                "production); demo data does not belong there. Use --force if you mean it.",
                highlight=False,
            )
            raise typer.Exit(1)
        passwords = DemoPasswords.random() if settings.is_production else DemoPasswords()
        try:
            logins = asyncio.run(_seed(settings, app_factory, passwords, if_empty=if_empty))
        except SeedFailed as exc:
            err.print("[bold red]the demo could not be seeded:[/]", end=" ")
            err.print(str(exc), markup=False, highlight=False)
            err.print(
                "What was created before stays: start again from an empty database.",
                highlight=False,
            )
            raise typer.Exit(1) from None
        except DBAPIError as exc:
            exit_database_unusable(exc, "seed the demo")
        if logins is None:
            if if_empty:
                return
            err.print(
                "[bold red]refusing:[/] the database already has accounts; the demo goes "
                "only into a new marketplace (--if-empty does nothing in that case).",
                highlight=False,
            )
            raise typer.Exit(1)
        _print_sign_in(settings, logins)

    return seed_app


async def _seed(
    settings: Settings, app_factory: AppFactory, passwords: DemoPasswords, *, if_empty: bool
) -> list[DemoLogin] | None:
    """The demo's accounts, or ``None`` when the database already had accounts."""
    # The seed makes a hundred-odd calls from one address in a few seconds; the
    # per-address limits meant for clients would stop it half way.
    runtime = Runtime(settings.model_copy(update={"ratelimit_enabled": False}))
    # The progress bar says what is happening; a log line per in-process call would not.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        if await has_accounts(runtime):
            return None
        with Progress(
            TextColumn("[bold]seeding the demo"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            console=err,
            transient=False,
        ) as bar:
            task = bar.add_task("", total=step_count())

            def advance(done: str) -> None:
                bar.update(task, advance=1, description=done)

            return await seed_demo(runtime, app_factory, passwords=passwords, progress=advance)
    finally:
        await runtime.stop()


def _print_sign_in(settings: Settings, logins: list[DemoLogin]) -> None:
    table = Table(title="Demo accounts", title_justify="left")
    table.add_column("who")
    table.add_column("email")
    table.add_column("password")
    for login in logins:
        table.add_row(login.who, login.email, login.password)
    out.print(table)
    base = f"http://{settings.host}:{settings.port}/api/v1"
    out.print(
        f"Browse the catalog:  curl {base}/products\n"
        f"Sign in:             curl -X POST {base}/auth/login -H 'Content-Type: "
        'application/json\' -d \'{"identifier": "'
        + logins[-1].email
        + '", "password": "'
        + logins[-1].password
        + "\"}'",
        highlight=False,
        markup=False,
    )
