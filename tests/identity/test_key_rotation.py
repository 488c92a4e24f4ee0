"""Encryption key rotation: every stored email, phone and authenticator secret, store
payout details and webhook signing secret moves to the active key, still decrypts, is
still found through its blind index, and nothing a user changes meanwhile is
overwritten."""

from __future__ import annotations

import asyncio
import base64
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import event, select, update
from sqlalchemy.util import await_only
from typer.testing import CliRunner

from soko.identity import mfa
from soko.identity.accounts import (
    create_user,
    find_user_by_email,
    find_user_by_phone,
    set_email,
    user_email,
    user_phone,
)
from soko.identity.key_rotation import (
    ACTION_ROTATION_FINISHED,
    ACTION_ROTATION_REQUESTED,
    REENCRYPT_JOB,
    KeyUsage,
    RotationCursor,
    key_usage,
    request_rotation,
    rotate_all,
    rotate_batch,
    values_to_rotate,
)
from soko.identity.keys_cli import derived_blind_index_key, derived_key_specs, keys_app
from soko.identity.models import AuditEvent, Role, TotpFactor, User
from soko.platform.clock import ManualClock
from soko.platform.config import ensure_secrets, load_settings
from soko.platform.crypto import DataKeys, Keyring, derive_keys, new_key_spec
from soko.platform.otp import decode_secret, totp
from soko.platform.outbox import MessageStatus, OutboxMessage
from soko.platform.runtime import Runtime
from soko.sellers import service as sellers_service
from soko.sellers.models import Seller
from soko.sellers.schemas import SellerApplication
from soko.webhooks import service as webhooks_service
from soko.webhooks.models import WebhookEndpoint
from tests.conftest import TEST_SECRET, make_settings

K1 = new_key_spec("k1")
K2 = new_key_spec("k2")
BLIND_INDEX_KEY = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _runtime(tmp_path: Path, database_url: str, keys: str, clock: ManualClock) -> Runtime:
    settings = make_settings(
        tmp_path,
        database_url=database_url,
        encryption_keys=keys,
        blind_index_key=BLIND_INDEX_KEY,
    )
    return Runtime(settings, clock=clock)


@dataclass(frozen=True)
class Person:
    user_id: uuid.UUID
    email: str | None
    phone: str | None
    totp_secret: str | None = None


@pytest.fixture
async def before(tmp_path: Path, database_url: str, clock: ManualClock) -> AsyncIterator[Runtime]:
    """The service as it ran before the rotation: k1 only."""
    runtime = _runtime(tmp_path, database_url, K1, clock)
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def after(tmp_path: Path, database_url: str, clock: ManualClock) -> AsyncIterator[Runtime]:
    """The service restarted with k2 put first: k2 encrypts, k1 still decrypts."""
    runtime = _runtime(tmp_path, database_url, f"{K2},{K1}", clock)
    try:
        yield runtime
    finally:
        await runtime.stop()


async def _people(runtime: Runtime, count: int = 7) -> list[Person]:
    """Accounts with an email and a phone, one or the other, and some authenticators."""
    people: list[Person] = []
    async with runtime.db.transaction() as session:
        for n in range(count):
            email = f"mwangi-{n}@example.com" if n % 3 != 2 else None
            phone = f"+2547123456{n:02d}" if n % 3 != 1 else None
            user = await create_user(
                session,
                runtime.data_keys,
                now=runtime.clock.now(),
                email=email,
                phone=phone,
                roles=(Role.customer,),
            )
            secret = None
            if n % 2 == 0:
                secret = (await mfa.enroll_totp(session, runtime, user)).secret
            people.append(Person(user.id, email, phone, secret))
    return people


async def _usage(runtime: Runtime) -> set[tuple[str, str]]:
    async with runtime.db.transaction(read_only=True) as session:
        return {(u.column, u.key_id) for u in await key_usage(session)}


async def _ciphertexts(runtime: Runtime) -> dict[str, str | None]:
    async with runtime.db.transaction(read_only=True) as session:
        found: dict[str, str | None] = {}
        for user in (await session.scalars(select(User))).all():
            found[f"email:{user.id}"] = user.email_ciphertext
            found[f"phone:{user.id}"] = user.phone_ciphertext
        for factor in (await session.scalars(select(TotpFactor))).all():
            found[f"totp:{factor.user_id}"] = factor.secret_ciphertext
        return found


async def _assert_readable(runtime: Runtime, people: list[Person]) -> None:
    """Every value decrypts through the code that reads it, and every blind index finds
    its account."""
    async with runtime.db.transaction(read_only=True) as session:
        for person in people:
            user = await session.get(User, person.user_id)
            assert user is not None
            assert user_email(runtime.data_keys, user) == person.email
            assert user_phone(runtime.data_keys, user) == person.phone
            if person.email is not None:
                found = await find_user_by_email(session, runtime.data_keys, person.email)
                assert found is not None and found.id == person.user_id
            if person.phone is not None:
                found = await find_user_by_phone(session, runtime.data_keys, person.phone)
                assert found is not None and found.id == person.user_id
    # The authenticator secret is read by mfa itself: confirming with a code made from
    # the secret shown at enrollment proves the rotated value still opens.
    for person in people:
        if person.totp_secret is None:
            continue
        code = totp(decode_secret(person.totp_secret), runtime.clock.now())
        async with runtime.db.transaction() as session:
            user = await session.get(User, person.user_id)
            assert user is not None
            codes = await mfa.confirm_totp(session, runtime, user, code, ip="", request_id="")
        assert len(codes) == 10


def _value_count(people: list[Person]) -> int:
    return sum(
        (p.email is not None) + (p.phone is not None) + (p.totp_secret is not None) for p in people
    )


def _expected_usage(people: list[Person], key_id: str) -> set[tuple[str, str]]:
    usage = set()
    if any(p.email for p in people):
        usage.add(("users.email", key_id))
    if any(p.phone for p in people):
        usage.add(("users.phone", key_id))
    if any(p.totp_secret for p in people):
        usage.add(("totp_factors.secret", key_id))
    return usage


async def test_the_job_moves_every_value_to_the_new_key_in_batches(
    before: Runtime, after: Runtime, tmp_path: Path, database_url: str, clock: ManualClock
) -> None:
    people = await _people(before)
    assert await _usage(before) == _expected_usage(people, "k1")

    async with after.db.transaction() as session:
        assert await values_to_rotate(session, after.data_keys.keyring) == 14
        await request_rotation(session, after.data_keys.keyring, clock=clock, batch_size=2)
    await after.dispatcher.run_until_idle()

    assert await _usage(after) == _expected_usage(people, "k2")
    async with after.db.transaction(read_only=True) as session:
        assert await values_to_rotate(session, after.data_keys.keyring) == 0
        jobs = (
            await session.scalars(select(OutboxMessage).where(OutboxMessage.name == REENCRYPT_JOB))
        ).all()
        events = (
            await session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action.in_([ACTION_ROTATION_REQUESTED, ACTION_ROTATION_FINISHED]))
                .order_by(AuditEvent.seq)
            )
        ).all()
    # 14 values two at a time: seven full batches, then one that finds the end.
    assert _value_count(people) == 14
    assert len(jobs) == 8
    assert {job.status for job in jobs} == {MessageStatus.done.value}
    assert [(e.action, e.data["key_id"]) for e in events] == [
        (ACTION_ROTATION_REQUESTED, "k2"),
        (ACTION_ROTATION_FINISHED, "k2"),
    ]
    assert events[1].data["rotated"] == 14
    assert events[1].data["unreadable"] == 0

    # Without k1 at all, everything still decrypts: nothing was left under it.
    only_k2 = _runtime(tmp_path, database_url, K2, clock)
    try:
        await _assert_readable(only_k2, people)
    finally:
        await only_k2.stop()


async def test_a_second_rotation_changes_nothing(
    before: Runtime, after: Runtime, clock: ManualClock
) -> None:
    people = await _people(before, count=4)
    totals = await rotate_all(after.db.transaction, after.data_keys.keyring, clock=clock)
    assert totals == {"rotated": _value_count(people), "changed_meanwhile": 0, "unreadable": 0}
    rotated = await _ciphertexts(after)

    again = await rotate_all(after.db.transaction, after.data_keys.keyring, clock=clock)
    assert again == {"rotated": 0, "changed_meanwhile": 0, "unreadable": 0}
    async with after.db.transaction() as session:
        await request_rotation(session, after.data_keys.keyring, clock=clock)
    await after.dispatcher.run_until_idle()

    assert await _ciphertexts(after) == rotated
    await _assert_readable(after, people)


async def test_concurrent_rotations_leave_every_value_readable(
    before: Runtime, after: Runtime, tmp_path: Path, database_url: str, clock: ManualClock
) -> None:
    people = await _people(before, count=9)
    other = _runtime(tmp_path, database_url, f"{K2},{K1}", clock)
    try:
        results = await asyncio.gather(
            rotate_all(after.db.transaction, after.data_keys.keyring, clock=clock, batch_size=3),
            rotate_all(other.db.transaction, other.data_keys.keyring, clock=clock, batch_size=2),
        )
    finally:
        await other.stop()
    # Each value was re-encrypted exactly once between the two; the loser of a race
    # found its update matching nothing.
    assert sum(r["rotated"] for r in results) == _value_count(people)
    assert all(r["unreadable"] == 0 for r in results)
    assert await _usage(after) == _expected_usage(people, "k2")
    await _assert_readable(after, people)


async def test_an_email_changed_during_the_rotation_is_not_overwritten(
    before: Runtime, after: Runtime, backend: str, clock: ManualClock
) -> None:
    people = await _people(before, count=3)
    target = people[0]  # the oldest id: the first email the rotation updates
    new_address = "wambui-new@example.com"
    # What a process still on the old configuration writes when the owner changes the
    # address: a value under k1.
    changed = User(id=target.user_id)
    set_email(before.data_keys, changed, new_address)

    async def change_elsewhere() -> None:
        async with before.db.transaction() as session:
            await session.execute(
                update(User)
                .where(User.id == target.user_id)
                .values(email_ciphertext=changed.email_ciphertext, email_index=changed.email_index)
            )

    fired: list[bool] = []

    def owner_writes_first(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if fired or not statement.lstrip().upper().startswith("UPDATE USERS"):
            return
        if not any(
            p in (target.user_id, target.user_id.hex, str(target.user_id)) for p in parameters
        ):
            return
        fired.append(True)
        if backend == "postgresql":
            # A truly concurrent transaction commits between the rotation's read and its
            # update (the rotation holds no lock on a row it has only read).
            await_only(change_elsewhere())
        else:
            # SQLite has one writer at a time: the rotation holds the write lock, so the
            # only way the value can move between its read and its update is a write on
            # its own connection.
            cursor.execute(
                "UPDATE users SET email_ciphertext = ?, email_index = ? WHERE id = ?",
                (changed.email_ciphertext, changed.email_index, target.user_id.hex),
            )

    engine = after.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", owner_writes_first)
    try:
        async with after.db.transaction() as session:
            outcome = await rotate_batch(session, after.data_keys.keyring, None, batch_size=500)
    finally:
        event.remove(engine, "before_cursor_execute", owner_writes_first)

    assert fired == [True]
    assert outcome.changed_meanwhile == 1
    assert outcome.rotated == _value_count(people) - 1
    assert outcome.next is None
    async with after.db.transaction(read_only=True) as session:
        user = await session.get(User, target.user_id)
        assert user is not None
        assert user_email(after.data_keys, user) == new_address
        assert user.email_ciphertext == changed.email_ciphertext
        found = await find_user_by_email(session, after.data_keys, new_address)
        assert found is not None and found.id == target.user_id
    # The value written under the old key is picked up by the next rotation.
    totals = await rotate_all(after.db.transaction, after.data_keys.keyring, clock=clock)
    assert totals == {"rotated": 1, "changed_meanwhile": 0, "unreadable": 0}
    assert await _usage(after) == _expected_usage(people, "k2")


async def test_a_value_under_a_key_no_longer_configured_is_counted_and_skipped(
    before: Runtime, after: Runtime, clock: ManualClock
) -> None:
    people = await _people(before, count=3)
    lost = Keyring.from_config(new_key_spec("k0"))
    async with before.db.transaction() as session:
        user = await session.get(User, people[1].user_id)
        assert user is not None
        user.email_ciphertext = lost.encrypt("lost@example.com", context=f"users.email:{user.id}")

    async with after.db.transaction() as session:
        await request_rotation(session, after.data_keys.keyring, clock=clock, batch_size=2)
    await after.dispatcher.run_until_idle()  # ends: an unreadable value is passed over

    async with after.db.transaction(read_only=True) as session:
        usage = await key_usage(session)
        left = await values_to_rotate(session, after.data_keys.keyring)
        finished = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.action == ACTION_ROTATION_FINISHED)
            )
        ).one()
    assert KeyUsage("users.email", "k0", 1) in usage
    assert {u.key_id for u in usage} == {"k0", "k2"}
    assert left == 1
    assert finished.data["unreadable"] == 1
    assert finished.data["rotated"] == _value_count(people) - 1


async def _store_and_endpoint(runtime: Runtime, owner: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID]:
    """A store with payout details, and a webhook endpoint whose secret was rotated once
    (so it holds a current and a previous secret): the other domains' encrypted values."""
    async with runtime.db.transaction() as session:
        seller = await sellers_service.apply(
            session,
            runtime,
            owner,
            SellerApplication(
                slug="mama-mboga",
                store_name="Mama Mboga",
                payout_details={"method": "mpesa", "till": "123456"},
            ),
        )
        endpoint, _ = await webhooks_service.create_endpoint(
            session,
            runtime,
            webhooks_service.Scope(seller_id=seller.id, user_id=owner),
            url="https://hooks.example.com/soko",
            event_types=["order.placed"],
        )
        await webhooks_service.rotate_secret(session, runtime, endpoint)
        return seller.id, endpoint.id


async def _store_values(
    runtime: Runtime, seller_id: uuid.UUID, endpoint_id: uuid.UUID
) -> tuple[dict[str, str] | None, list[str]]:
    """The payout details and the signing secrets, read by the code that uses them."""
    async with runtime.db.transaction(read_only=True) as session:
        seller = await session.get(Seller, seller_id)
        endpoint = await session.get(WebhookEndpoint, endpoint_id)
        assert seller is not None and endpoint is not None
        return (
            sellers_service.payout_details(runtime.data_keys, seller),
            webhooks_service.signing_secrets(runtime, endpoint, runtime.clock.now()),
        )


async def test_every_domains_encrypted_values_move_and_still_open_without_the_old_key(
    before: Runtime, after: Runtime, tmp_path: Path, database_url: str, clock: ManualClock
) -> None:
    """Stores' payout details and webhook signing secrets are encrypted with the same
    keys as emails: a rotation that left them behind would make them unreadable once the
    old key is removed, as the status said it could be."""
    people = await _people(before, count=2)
    seller_id, endpoint_id = await _store_and_endpoint(before, people[0].user_id)
    payout, secrets_before = await _store_values(before, seller_id, endpoint_id)
    assert payout == {"method": "mpesa", "till": "123456"}
    assert len(secrets_before) == 2
    assert {
        ("sellers.payout_details", "k1"),
        ("webhooks_endpoints.secret_ciphertext", "k1"),
        ("webhooks_endpoints.previous_secret_ciphertext", "k1"),
    } <= await _usage(before)

    async with after.db.transaction() as session:
        assert await values_to_rotate(session, after.data_keys.keyring) == _value_count(people) + 3
        await request_rotation(session, after.data_keys.keyring, clock=clock, batch_size=2)
    await after.dispatcher.run_until_idle()

    assert {key_id for _, key_id in await _usage(after)} == {"k2"}
    only_k2 = _runtime(tmp_path, database_url, K2, clock)
    try:
        assert await _store_values(only_k2, seller_id, endpoint_id) == (payout, secrets_before)
        await _assert_readable(only_k2, people)
    finally:
        await only_k2.stop()


async def test_the_cursor_survives_the_job_payload() -> None:
    cursor = RotationCursor("users.phone", uuid.uuid4())
    assert RotationCursor.from_payload(cursor.to_payload()) == cursor
    assert RotationCursor.from_payload({"column": None}) is None
    with pytest.raises(ValueError):
        RotationCursor.from_payload({"column": "users.password_hash"})


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def cli_env(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The environment of a `soko` run over an empty database, with k1 configured.

    ``database_url`` gives each backend an empty schema and cleans up after the test."""
    env = {
        "SOKO_DATABASE_URL": database_url,
        "SOKO_DATA_DIR": str(tmp_path / "data"),
        "SOKO_ENV": "development",
        "SOKO_SECRET_KEY": TEST_SECRET,
        "SOKO_ENCRYPTION_KEYS": K1,
        "SOKO_BLIND_INDEX_KEY": BLIND_INDEX_KEY,
        "COLUMNS": "200",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env


def _soko(*args: str) -> Any:
    app = typer.Typer()
    app.add_typer(keys_app, name="keys")
    return CliRunner().invoke(app, ["keys", *args])


def _with_env_runtime(work: Any) -> Any:
    """Run ``work(runtime)`` with the runtime the environment configures."""

    async def main() -> Any:
        runtime = Runtime(ensure_secrets(load_settings()), clock=ManualClock())
        try:
            return await work(runtime)
        finally:
            await runtime.stop()

    return asyncio.run(main())


def _printed_setting(output: str, name: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(f"{name}=")]
    assert len(lines) == 1, output
    return lines[0].removeprefix(f"{name}=")


def test_cli_new_puts_a_fresh_key_before_the_configured_ones(cli_env: dict[str, str]) -> None:
    result = _soko("new")
    assert result.exit_code == 0, result.output
    value = _printed_setting(result.output, "SOKO_ENCRYPTION_KEYS")
    keyring = Keyring.from_config(value)
    assert keyring.key_ids == ("k2", "k1")
    assert value.endswith("," + K1)
    assert "SOKO_BLIND_INDEX_KEY=" not in result.output  # configured: left alone
    # A fresh key every time.
    assert _printed_setting(_soko("new").output, "SOKO_ENCRYPTION_KEYS") != value

    taken = _soko("new", "--key-id", "k1")
    assert taken.exit_code == 2
    assert "already in use" in taken.output
    assert _soko("new", "--key-id", "not a key id").exit_code == 2
    named = _soko("new", "--key-id", "2027-q1")
    assert Keyring.from_config(_printed_setting(named.output, "SOKO_ENCRYPTION_KEYS")).key_ids == (
        "2027-q1",
        "k1",
    )


def test_cli_new_writes_out_the_development_keys_so_their_data_stays_readable(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOKO_ENCRYPTION_KEYS")
    monkeypatch.delenv("SOKO_BLIND_INDEX_KEY")
    derived = derive_keys(TEST_SECRET.encode())
    stored = derived.keyring.encrypt("+254712345678", context="users.phone:x")

    result = _soko("new")
    assert result.exit_code == 0, result.output
    configured = DataKeys.from_config(
        master_secret=None,
        encryption_keys=_printed_setting(result.output, "SOKO_ENCRYPTION_KEYS"),
        blind_index_key=_printed_setting(result.output, "SOKO_BLIND_INDEX_KEY"),
    )
    assert configured.keyring.active_key_id == "k1"
    assert configured.keyring.key_ids == ("k1", "d1")
    assert configured.keyring.decrypt(stored, context="users.phone:x") == "+254712345678"
    assert configured.blind_index.compute("users.phone", "+254712345678") == (
        derived.blind_index.compute("users.phone", "+254712345678")
    )
    assert derived_key_specs(TEST_SECRET.encode(), ("d1",)).startswith("d1:")
    assert derived_blind_index_key(TEST_SECRET.encode()) == _printed_setting(
        result.output, "SOKO_BLIND_INDEX_KEY"
    )


async def _cli_people(runtime: Runtime) -> list[Person]:
    return await _people(runtime, count=5)


def test_cli_rotates_inline_and_reports_each_key(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    people = _with_env_runtime(_cli_people)
    status = _soko("status")
    assert status.exit_code == 0, status.output
    assert "active key: k1" in status.output
    assert "every value is under the active key" in status.output

    monkeypatch.setenv("SOKO_ENCRYPTION_KEYS", f"{K2},{K1}")
    status = _soko("status")
    assert "active key: k2" in status.output
    assert "older: to re-encrypt" in status.output
    assert f"{_value_count(people)} values are under older keys" in status.output

    result = _soko("rotate", "--wait", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert f"re-encrypted {_value_count(people)} values" in result.output
    assert "0 unreadable" in result.output

    status = _soko("status")
    assert "every value is under the active key" in status.output
    assert " k1 " not in status.output

    async def check(runtime: Runtime) -> None:
        assert await _usage(runtime) == _expected_usage(people, "k2")
        await _assert_readable(runtime, people)

    _with_env_runtime(check)
    again = _soko("rotate", "--wait")
    assert again.exit_code == 0, again.output
    assert "re-encrypted 0 values" in again.output


def test_cli_rotate_queues_the_job_for_the_workers(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    people = _with_env_runtime(_cli_people)
    nothing = _soko("rotate")
    assert nothing.exit_code == 0, nothing.output
    assert "every value is already under the active key k1" in nothing.output

    monkeypatch.setenv("SOKO_ENCRYPTION_KEYS", f"{K2},{K1}")
    result = _soko("rotate")
    assert result.exit_code == 0, result.output
    assert f"re-encryption of {_value_count(people)} values under key k2 is queued" in (
        result.output
    )

    async def work_and_check(runtime: Runtime) -> None:
        assert await _usage(runtime) == _expected_usage(people, "k1")  # not yet
        await runtime.dispatcher.run_until_idle()
        assert await _usage(runtime) == _expected_usage(people, "k2")
        await _assert_readable(runtime, people)

    _with_env_runtime(work_and_check)


def test_cli_status_flags_values_under_a_key_that_is_not_configured(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_env_runtime(_cli_people)
    monkeypatch.setenv("SOKO_ENCRYPTION_KEYS", K2)  # k1 dropped too early
    status = _soko("status")
    assert status.exit_code == 0, status.output
    assert "NOT CONFIGURED" in status.output
    result = _soko("rotate", "--wait")
    assert result.exit_code == 1
    assert "could not be decrypted" in result.output
