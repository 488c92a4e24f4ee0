"""`soko admin create`: the first administrator, made from the command line.

The password is asked twice without echo, or read from standard input with
``--password-stdin`` for scripts (never from an option: it would land in the shell's
history and the process list). It must pass the same policy as any other password.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from typing import Annotated

import typer
from sqlalchemy.exc import DBAPIError

from soko.identity.accounts import (
    create_user,
    find_user_by_email,
    find_user_by_phone,
    normalize_email,
    normalize_phone,
)
from soko.identity.audit import record_audit_event
from soko.identity.errors import AccountExists, WeakPassword
from soko.identity.models import Role
from soko.identity.passwords import PasswordPolicy, password_hasher
from soko.platform.commands import command_settings, err, exit_database_unusable, out
from soko.platform.config import Settings
from soko.platform.errors import ValidationFailed
from soko.platform.runtime import Runtime

admin_app = typer.Typer(help="Manage administrators.", no_args_is_help=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print("[bold red]error:[/]", end=" ")
    err.print(message, markup=False, highlight=False)
    return typer.Exit(code)


def _prompted_password() -> str:
    password: str = typer.prompt(
        "Password", hide_input=True, confirmation_prompt="Repeat the password"
    )
    return password


def _stdin_password() -> str:
    # One line, without its line ending: `printf '%s\n' "$PW" | soko admin create ...`.
    return sys.stdin.readline().rstrip("\r\n")


async def _create_admin(
    settings: Settings,
    *,
    email: str,
    phone: str | None,
    display_name: str,
    read_password: Callable[[], str],
) -> uuid.UUID:
    runtime = Runtime(settings)
    try:
        keys = runtime.data_keys
        # Checked before the password is asked for, so nobody types one for nothing; the
        # unique indexes still refuse a duplicate created meanwhile.
        async with runtime.db.transaction(read_only=True) as session:
            taken = await find_user_by_email(session, keys, email) is not None
            if phone is not None and not taken:
                taken = await find_user_by_phone(session, keys, phone) is not None
        if taken:
            raise AccountExists("An account already uses this email or phone number.")
        password = read_password()
        PasswordPolicy.from_settings(settings).check(
            password, email=email, phone=phone, display_name=display_name
        )
        password_hash = await password_hasher(runtime).hash(password)
        async with runtime.db.transaction() as session:
            user = await create_user(
                session,
                keys,
                now=runtime.clock.now(),
                email=email,
                phone=phone,
                display_name=display_name,
                password_hash=password_hash,
                roles=(Role.admin,),
                email_verified=True,
            )
            await record_audit_event(
                session,
                action="admin.created",
                actor_id=None,
                target_type="user",
                target_id=str(user.id),
                data={"via": "cli", "roles": [Role.admin.value]},
                clock=runtime.clock,
            )
        return user.id
    finally:
        password_hasher(runtime).close()
        await runtime.stop()


@admin_app.command("create")
def create(
    email: Annotated[str, typer.Option(help="The administrator's email; verified as given")],
    phone: Annotated[
        str | None, typer.Option(help="A phone number in E.164 form (+254712345678)")
    ] = None,
    display_name: Annotated[str, typer.Option(help="The name shown for the account")] = "",
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read the password from the first line of standard input (for scripts)",
        ),
    ] = False,
) -> None:
    """Create an administrator account (with the admin role and a verified email)."""
    settings = command_settings()
    try:
        canonical_email = normalize_email(email)
        e164 = normalize_phone(phone) if phone else None
    except ValidationFailed as problem:
        raise _fail(problem.detail, code=2) from None
    name = display_name.strip()[:120]
    try:
        user_id = asyncio.run(
            _create_admin(
                settings,
                email=canonical_email,
                phone=e164,
                display_name=name,
                read_password=_stdin_password if password_stdin else _prompted_password,
            )
        )
    except AccountExists:
        raise _fail(
            "an account already uses this email or phone number; nothing was created"
        ) from None
    except WeakPassword as problem:
        raise _fail(f"password not accepted: {problem.detail}") from None
    except DBAPIError as exc:
        exit_database_unusable(exc, "write the account")
    out.print(f"[green]administrator created:[/] {canonical_email} (id {user_id})")
