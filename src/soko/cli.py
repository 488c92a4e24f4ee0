"""The `soko` command line: serve, worker, migrate, check-config, version."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

import soko
from soko.platform.commands import command_settings, err, out
from soko.platform.config import ConfigError, Settings

if TYPE_CHECKING:
    from soko.platform.runtime import Runtime

app = typer.Typer(
    name="soko",
    help="Soko, the backend platform for marketplaces of goods and services.",
    no_args_is_help=True,
    add_completion=False,
)
migrate_app = typer.Typer(help="Apply and author database migrations.", no_args_is_help=True)
app.add_typer(migrate_app, name="migrate")


def _demo_app(runtime: Runtime) -> object:
    from soko.app import create_app  # lazily, like serve

    return create_app(runtime=runtime)


def _load_every_model() -> None:
    from soko.app import load_models

    load_models()


def _mount_domain_commands() -> None:
    from soko.demo.cli import seed_commands
    from soko.identity.admin_cli import admin_app
    from soko.identity.cli import audit_app
    from soko.identity.keys_cli import keys_app
    from soko.payments.ledger_cli import ledger_commands

    app.add_typer(admin_app, name="admin")
    app.add_typer(audit_app, name="audit")
    # Key rotation walks the encrypted columns every domain declares with its tables.
    app.add_typer(keys_app, name="keys", callback=_load_every_model)
    app.add_typer(ledger_commands(), name="ledger")
    app.add_typer(seed_commands(_demo_app), name="seed")


_mount_domain_commands()

# Soft wrap: a problem line stays one line when the output is a pipe or a log file,
# instead of being cut at 80 columns.

# What `soko serve` hands uvicorn; a module attribute so tests can serve a factory of
# their own through the same path.
APP_FACTORY = "soko.app:create_app_from_env"


def _settings() -> Settings:
    from soko.app import check_domain_settings

    return command_settings(check_domain_settings)


@app.command()
def version() -> None:
    """Print Soko's version."""
    out.print(f"soko {soko.__version__}")


@app.command("check-config")
def check_config() -> None:
    """Validate the configuration and print a summary of it (secrets hidden); exit 2 on
    anything `soko serve` would refuse. (`soko worker` also needs shared backends.)"""
    settings = _settings()
    problems = settings.multi_process_problems()
    out.print(f"environment      {settings.env.value}")
    out.print(f"public URL       {settings.public_url}")
    out.print(f"app URL          {settings.app_url or '(none: the pages Soko serves)'}")
    out.print(f"database         {_redact_url(settings.effective_database_url)}")
    out.print(f"redis            {_redact_url(settings.redis_url) or '(none)'}")
    out.print(
        f"cache/limits/pubsub  {settings.cache_backend.value}/"
        f"{settings.ratelimit_backend.value}/{settings.pubsub_backend.value}"
    )
    out.print(f"outbox dispatch  {settings.outbox_dispatch.value}")
    out.print(f"data directory   {settings.data_dir}")
    if problems:
        for line in problems:
            err.print(f"[bold red]invalid configuration:[/] {line}", highlight=False)
        raise typer.Exit(2)
    out.print("[green]configuration is valid[/]")


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    if not url:
        return ""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable)"


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (SOKO_HOST)")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port to bind (SOKO_PORT)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, max=256, help="API processes (SOKO_WORKERS)")
    ] = None,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development)")] = False,
) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from soko.platform import serving

    settings = _settings()
    processes = workers or settings.workers
    problems = settings.multi_process_problems(processes)
    if problems:
        for line in problems:
            err.print(f"[bold red]refusing to start:[/] {line}", highlight=False)
        raise typer.Exit(2)
    # Every process builds its settings from the environment: the options go there,
    # so the default SOKO_PUBLIC_URL follows the port actually served.
    if workers:
        os.environ["SOKO_WORKERS"] = str(workers)
    if host:
        os.environ["SOKO_HOST"] = host
    if port:
        os.environ["SOKO_PORT"] = str(port)
    out.print(
        f"Soko {soko.__version__} serving on http://{host or settings.host}:{port or settings.port}"
        f" ({processes} process{'es' if processes > 1 else ''}, {settings.env.value})"
    )
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the
    # handler it found; by default that kills the process (exit 143) after a clean stop.
    options: dict[str, Any] = {
        "factory": True,
        "host": host or settings.host,
        "port": port or settings.port,
        "workers": processes if not reload else None,
        "reload": reload,
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": ",".join(settings.trusted_proxies) or None,
        # Rounded up: a grace of 0.5 s must not become 0 s, which cancels in-flight
        # requests at once.
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace_seconds),
        "log_config": None,
        "server_header": False,
        # httptools (uvicorn's default where it is installed), each response in one write.
        "http": serving.CoalescingHttpToolsProtocol,
    }
    previous = signal.signal(signal.SIGTERM, _stopped_by_sigterm)
    try:
        if processes > 1 and not reload and serving.socket_per_worker_supported():
            # Each process listens on a socket of its own, so the kernel spreads
            # connections across them (soko.platform.serving).
            serving.run_workers(serving.ReusePortConfig(APP_FACTORY, **options))
        else:
            uvicorn.run(APP_FACTORY, **options)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped_by_sigterm(_signum: int, _frame: FrameType | None) -> None:
    # Reached after uvicorn has drained (or before it took over): a requested stop.
    raise SystemExit(0)


@app.command()
def worker(
    once: Annotated[bool, typer.Option(help="Run what is due, then exit")] = False,
) -> None:
    """Run outbox jobs, event handlers and scheduled jobs until stopped (SIGTERM drains)."""
    from soko.app import load_handlers, load_models
    from soko.platform.logging import configure_logging
    from soko.platform.runtime import Runtime
    from soko.platform.tracing import configure_tracing

    settings = _settings()
    # A worker is always a process beside the API's: what its jobs cache, count or push
    # must reach the API processes, so nothing shared may stay in this process's memory.
    memory = settings.in_memory_shared_concerns()
    if memory:
        err.print(
            "[bold red]refusing to start:[/] `soko worker` runs beside the API processes but "
            f"{', '.join(memory)} still live in one process's memory: set SOKO_REDIS_URL "
            "and SOKO_CACHE_BACKEND, SOKO_RATELIMIT_BACKEND and SOKO_PUBSUB_BACKEND to redis",
            highlight=False,
        )
        raise typer.Exit(2)
    configure_logging(settings)
    tracing = configure_tracing(settings)
    load_models()
    load_handlers()

    async def main() -> None:
        runtime = Runtime(settings)
        if tracing is not None:
            tracing.instrument_database(runtime.db.engine)
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        try:
            dispatcher = runtime.dispatcher
            work = asyncio.create_task(dispatcher.run_until_idle() if once else dispatcher.run())
            stop_requested = asyncio.create_task(stopping.wait())
            # Whichever comes first: a stop request drains; a dispatcher that ends or dies
            # ends the worker (and shows why) rather than leaving a process that looks
            # alive and runs nothing.
            await asyncio.wait({work, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
            stop_requested.cancel()
            if not work.done():
                err.print("worker stopping: finishing or releasing claimed jobs")
                await dispatcher.stop(settings.shutdown_grace_seconds)
            await work
        finally:
            await runtime.stop()
            if tracing is not None:
                tracing.shutdown()

    asyncio.run(main())


def _alembic_config(settings: Settings) -> object:
    from alembic.config import Config

    from soko.platform.schema import migrations_location

    config = Config()
    config.set_main_option("script_location", str(migrations_location()))
    config.attributes["database_url"] = settings.effective_database_url
    return config


@migrate_app.command("upgrade")
def migrate_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision")] = "head",
) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from alembic import command

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with err.status(f"Applying migrations up to {revision}..."):
        command.upgrade(_alembic_config(settings), revision)  # type: ignore[arg-type]
    err.print(f"[green]database is at {revision}[/]")


@migrate_app.command("downgrade")
def migrate_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, such as -1 or base")],
) -> None:
    """Revert migrations down to REVISION."""
    from alembic import command

    settings = _settings()
    with err.status(f"Reverting migrations down to {revision}..."):
        command.downgrade(_alembic_config(settings), revision)  # type: ignore[arg-type]
    err.print(f"[green]database is at {revision}[/]")


@migrate_app.command("current")
def migrate_current() -> None:
    """Show the revision the database is at."""
    from alembic import command

    command.current(_alembic_config(_settings()), verbose=False)  # type: ignore[arg-type]


@migrate_app.command("revision")
def migrate_revision(
    message: Annotated[str, typer.Option("-m", "--message", help="What the revision does")],
    autogenerate: Annotated[bool, typer.Option(help="Diff the models against the database")] = True,
) -> None:
    """Create a new migration revision."""
    from alembic import command

    command.revision(
        _alembic_config(_settings()),  # type: ignore[arg-type]
        message=message,
        autogenerate=autogenerate,
    )


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # raised by code paths that load settings themselves
        for line in exc.problems:
            err.print(f"  - {line}", markup=False)
        sys.exit(2)
