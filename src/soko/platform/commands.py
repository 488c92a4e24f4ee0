"""What every `soko` command shares: its settings, its consoles and its exits.

The top-level CLI and the domains' command groups (``soko admin``, ``soko keys``,
``soko audit``) read the configuration the same way the server does, print problems the
same way, and log through the same masked chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import typer
from rich.console import Console
from sqlalchemy.exc import DBAPIError

from soko.platform.config import ConfigError, Settings, ensure_secrets, load_settings
from soko.platform.logging import configure_logging

# soft_wrap: a problem is one line in a log file or a pipe, whatever the terminal width.
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def command_settings(check: Callable[[Settings], None] | None = None) -> Settings:
    """The validated settings (with development secrets filled in, so a command sees
    the keys the server sees), or exit 2 with one line per problem. ``check`` adds
    checks that raise :class:`ConfigError`."""
    try:
        settings = ensure_secrets(load_settings())
        if check is not None:
            check(settings)
    except ConfigError as exc:
        err.print("[bold red]Soko cannot start: the configuration has problems[/]")
        for line in exc.problems:
            err.print(f"  - {line}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    configure_logging(settings)
    return settings


def exit_database_unusable(exc: DBAPIError, doing: str) -> NoReturn:
    """Exit 2 saying why the database could not be used (its first line only: never a
    statement or its parameters), with the usual cause named."""
    first_line = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
    err.print(f"[bold red]cannot {doing}:[/]", end=" ")
    err.print(
        f"{first_line} (is the database migrated? `soko migrate upgrade`)",
        markup=False,
        highlight=False,
    )
    raise typer.Exit(2)
