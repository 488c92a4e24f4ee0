"""The audit log: hash chain, tamper detection, serialized appends, masking, the admin
list and `soko audit verify`."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import httpx2
import pytest
import typer
from fastapi import FastAPI, Request
from sqlalchemy import delete, select, text, update
from typer.testing import CliRunner

from soko.identity.audit import (
    AUDIT_LOCK_KEY,
    GENESIS_HASH,
    ChainBreak,
    canonical_parts,
    event_hash,
    record_audit_event,
    verify_audit_chain,
)
from soko.identity.cli import audit_app
from soko.identity.models import AuditChainHead, AuditEvent, Role
from soko.identity.permissions import permissions_for
from soko.platform.auth import Principal
from soko.platform.clock import ManualClock
from soko.platform.db import Base, create_engine
from soko.platform.runtime import Runtime

ADMIN_ID = uuid.UUID("00000000-0000-7000-8000-00000000000a")


async def _append(runtime: Runtime, count: int, *, per_transaction: int = 1) -> None:
    written = 0
    while written < count:
        async with runtime.db.transaction() as session:
            for _ in range(min(per_transaction, count - written)):
                written += 1
                await record_audit_event(
                    session,
                    action="user.blocked" if written % 2 else "auth.login",
                    actor_id=ADMIN_ID,
                    target_type="user",
                    target_id=f"user-{written}",
                    ip="203.0.113.7",
                    request_id=f"req-{written}",
                    data={"n": written, "reason": "test", "nested": {"list": [1, 2.5, None]}},
                    clock=runtime.clock,
                )
        assert isinstance(runtime.clock, ManualClock)
        runtime.clock.advance(1)


async def _verify(runtime: Runtime, **kwargs: Any) -> Any:
    async with runtime.db.transaction(read_only=True) as session:
        return await verify_audit_chain(session, **kwargs)


# -- the chain ---------------------------------------------------------------------------


async def test_a_long_chain_verifies_in_batches(runtime: Runtime) -> None:
    await _append(runtime, 230, per_transaction=9)
    progress: list[int] = []
    report = await _verify(runtime, batch_size=17, on_progress=progress.append)
    assert report.ok, report
    assert report.checked == 230
    assert report.broken_seq is None and report.reason is None
    assert report.last_seq == 230
    # Every batch reported, in order, ending at the total.
    assert progress == sorted(progress) and progress[-1] == 230
    assert len(progress) == -(-230 // 17)
    async with runtime.db.transaction(read_only=True) as session:
        rows = (await session.execute(select(AuditEvent).order_by(AuditEvent.seq))).scalars().all()
    assert [row.seq for row in rows] == list(range(1, 231))
    assert rows[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    assert report.last_hash == rows[-1].hash


async def test_an_empty_log_is_intact(runtime: Runtime) -> None:
    report = await _verify(runtime)
    assert report.ok and report.checked == 0 and report.last_seq is None


async def test_the_hash_is_sha256_over_the_documented_canonical_json(runtime: Runtime) -> None:
    """An outside verifier can recompute a hash from the documented form alone."""
    await _append(runtime, 2)
    async with runtime.db.transaction(read_only=True) as session:
        second = (await session.execute(select(AuditEvent).where(AuditEvent.seq == 2))).scalar_one()
    canonical = {
        "seq": 2,
        "id": str(second.id),
        "occurred_at": second.occurred_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
        + "+00:00",
        "action": second.action,
        "actor_id": str(ADMIN_ID),
        "target_type": "user",
        "target_id": "user-2",
        "ip": "203.0.113.7",
        "request_id": "req-2",
        "data": {"n": 2, "reason": "test", "nested": {"list": [1, 2.5, None]}},
        "prev_hash": second.prev_hash,
    }
    body = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert second.hash == hashlib.sha256(body.encode()).hexdigest()
    assert second.id.version == 7


async def test_an_event_rolls_back_with_its_transaction(runtime: Runtime) -> None:
    with pytest.raises(RuntimeError):
        async with runtime.db.transaction() as session:
            await record_audit_event(session, action="user.blocked", clock=runtime.clock)
            raise RuntimeError("the caller's work failed")
    async with runtime.db.transaction() as session:
        event = await record_audit_event(session, action="user.unblocked", clock=runtime.clock)
    assert event.seq == 1 and event.prev_hash == GENESIS_HASH
    assert (await _verify(runtime)).ok


# -- tampering -----------------------------------------------------------------------------


async def _tamper_data(session: Any) -> None:
    await session.execute(
        update(AuditEvent).where(AuditEvent.seq == 5).values(data={"n": 5, "reason": "edited"})
    )


async def _tamper_action(session: Any) -> None:
    await session.execute(update(AuditEvent).where(AuditEvent.seq == 5).values(action="auth.x"))


async def _tamper_occurred_at(session: Any) -> None:
    row = (await session.execute(select(AuditEvent).where(AuditEvent.seq == 5))).scalar_one()
    await session.execute(
        update(AuditEvent)
        .where(AuditEvent.seq == 5)
        .values(occurred_at=row.occurred_at - dt.timedelta(microseconds=1))
    )


async def _tamper_actor(session: Any) -> None:
    await session.execute(
        update(AuditEvent).where(AuditEvent.seq == 5).values(actor_id=uuid.uuid4())
    )


async def _delete_middle(session: Any) -> None:
    await session.execute(delete(AuditEvent).where(AuditEvent.seq == 5))


async def _delete_first(session: Any) -> None:
    await session.execute(delete(AuditEvent).where(AuditEvent.seq == 1))


async def _swap(session: Any) -> None:
    # Exchange the positions of events 5 and 6 through a free seq.
    await session.execute(update(AuditEvent).where(AuditEvent.seq == 5).values(seq=-1))
    await session.execute(update(AuditEvent).where(AuditEvent.seq == 6).values(seq=5))
    await session.execute(update(AuditEvent).where(AuditEvent.seq == -1).values(seq=6))


async def _edit_and_rehash(session: Any) -> None:
    """A forger who edits event 5 and recomputes its hash still breaks event 6's link."""
    row = (await session.execute(select(AuditEvent).where(AuditEvent.seq == 5))).scalar_one()
    forged = event_hash(
        seq=row.seq,
        id=row.id,
        occurred_at=row.occurred_at,
        action="auth.login",
        actor_id=row.actor_id,
        target_type=row.target_type,
        target_id=row.target_id,
        ip=row.ip,
        request_id=row.request_id,
        data=row.data,
        prev_hash=row.prev_hash,
    )
    await session.execute(
        update(AuditEvent).where(AuditEvent.seq == 5).values(action="auth.login", hash=forged)
    )


async def _insert_before_the_first(session: Any) -> None:
    await session.execute(
        AuditEvent.__table__.insert().values(
            seq=0,
            id=uuid.uuid4(),
            occurred_at=dt.datetime(2029, 1, 1, tzinfo=dt.UTC),
            action="forged",
            data={},
            prev_hash=GENESIS_HASH,
            hash=GENESIS_HASH,
        )
    )


@pytest.mark.parametrize(
    ("tamper", "broken_seq", "reason"),
    [
        (_tamper_data, 5, ChainBreak.hash_mismatch),
        (_tamper_action, 5, ChainBreak.hash_mismatch),
        (_tamper_occurred_at, 5, ChainBreak.hash_mismatch),
        (_tamper_actor, 5, ChainBreak.hash_mismatch),
        (_delete_middle, 5, ChainBreak.gap),
        (_delete_first, 1, ChainBreak.gap),
        (_swap, 5, ChainBreak.prev_hash_mismatch),
        (_edit_and_rehash, 6, ChainBreak.prev_hash_mismatch),
        (_insert_before_the_first, 1, ChainBreak.gap),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)).lstrip("_"),
)
async def test_tampering_is_detected_at_the_right_seq(
    runtime: Runtime, tamper: Any, broken_seq: int, reason: ChainBreak
) -> None:
    await _append(runtime, 12, per_transaction=3)
    assert (await _verify(runtime, batch_size=4)).ok
    async with runtime.db.transaction() as session:
        await tamper(session)
    report = await _verify(runtime, batch_size=4)
    assert not report.ok
    assert report.broken_seq == broken_seq
    assert report.reason is reason
    assert report.checked == broken_seq - 1
    assert report.detail


# -- concurrency --------------------------------------------------------------------------


async def test_concurrent_appends_make_one_gap_free_chain(runtime: Runtime, backend: str) -> None:
    tasks = 20
    # On PostgreSQL every transaction is open and has run a statement before any of them
    # appends, so the appends truly race for the chain's head. SQLite admits one writer at
    # a time (BEGIN IMMEDIATE), so waiting inside the transaction would deadlock: there
    # the tasks only start together.
    inside = asyncio.Barrier(tasks) if backend == "postgresql" else None
    start = asyncio.Barrier(tasks)

    async def one(index: int) -> None:
        await start.wait()
        async with runtime.db.transaction() as session:
            if inside is not None:
                await session.execute(text("SELECT 1"))
                await inside.wait()
            for step in range(2):
                await record_audit_event(
                    session,
                    action="auth.login",
                    target_id=f"task-{index}-{step}",
                    clock=runtime.clock,
                )
                await asyncio.sleep(0)

    await asyncio.gather(*(one(i) for i in range(tasks)))
    report = await _verify(runtime)
    assert report.ok, report
    assert report.checked == 2 * tasks
    async with runtime.db.transaction(read_only=True) as session:
        rows = (await session.execute(select(AuditEvent.seq, AuditEvent.target_id))).all()
    assert sorted(seq for seq, _ in rows) == list(range(1, 2 * tasks + 1))
    assert {target for _, target in rows} == {
        f"task-{i}-{step}" for i in range(tasks) for step in range(2)
    }


@pytest.mark.parametrize(
    ("actor", "target", "ip", "request_id", "data"),
    [
        (None, None, None, None, {}),
        (ADMIN_ID, "user-1", "203.0.113.7", "req-1", {"n": 1, "nested": {"list": [1, 2.5]}}),
        (ADMIN_ID, 'quote " and \\ back', "2001:db8::1", "r", {"z": "Ωmega ☕", "a": None}),
        (None, "x", None, "req", {"prev_hash": "not the chain's", "seq": 99, "b": [{}, []]}),
    ],
)
def test_the_canonical_form_cut_around_the_chain_fields_is_the_whole(
    actor: uuid.UUID | None, target: str | None, ip: str | None, request_id: str | None, data: Any
) -> None:
    """``prefix + prev_hash + middle + seq + suffix`` (what PostgreSQL and
    :func:`event_hash` hash) is the documented canonical JSON, whatever the values
    hold."""
    fields: dict[str, Any] = {
        "id": uuid.UUID("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
        "occurred_at": dt.datetime(2026, 12, 6, 21, 0, 0, 12, tzinfo=dt.UTC),
        "action": "auth.login",
        "actor_id": actor,
        "target_type": "user" if target else None,
        "target_id": target,
        "ip": ip,
        "request_id": request_id,
        "data": data,
    }
    prefix, middle, suffix = canonical_parts(**fields)
    for seq, prev_hash in ((1, GENESIS_HASH), (123456, hashlib.sha256(b"x").hexdigest())):
        whole = prefix + prev_hash.encode() + middle + str(seq).encode() + suffix
        documented = {
            **fields,
            "id": str(fields["id"]),
            "occurred_at": "2026-12-06T21:00:00.000012+00:00",
            "actor_id": str(actor) if actor is not None else None,
            "seq": seq,
            "prev_hash": prev_hash,
        }
        body = json.dumps(documented, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert whole == body.encode("utf-8")
        assert hashlib.sha256(whole).hexdigest() == event_hash(
            seq=seq, prev_hash=prev_hash, **fields
        )


async def _head_row(runtime: Runtime) -> tuple[int, str, str] | None:
    async with runtime.db.transaction(read_only=True) as session:
        row = (
            await session.execute(
                select(AuditChainHead.seq, AuditChainHead.prev_hash, AuditChainHead.hash)
            )
        ).first()
    return None if row is None else (row.seq, row.prev_hash, row.hash)


async def _newest(runtime: Runtime) -> tuple[int, str, str]:
    async with runtime.db.transaction(read_only=True) as session:
        row = (
            await session.execute(
                select(AuditEvent.seq, AuditEvent.prev_hash, AuditEvent.hash)
                .order_by(AuditEvent.seq.desc())
                .limit(1)
            )
        ).one()
    return (row.seq, row.prev_hash, row.hash)


async def _append_without_the_head_row(
    runtime: Runtime,
    action: str,
    *,
    read: asyncio.Event | None = None,
    go: asyncio.Event | None = None,
) -> None:
    """An append as Soko made them before the head row existed: the advisory lock, the
    newest event read, the next inserted. ``read`` is set once the newest event was read
    (the lock held); the insert then waits for ``go``."""
    async with runtime.db.transaction() as session:
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_LOCK_KEY})
        newest = (
            await session.execute(
                select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
            )
        ).first()
        seq, prev_hash = (newest.seq + 1, newest.hash) if newest else (1, GENESIS_HASH)
        if read is not None:
            read.set()
        if go is not None:
            await go.wait()
        fields: dict[str, Any] = {
            "seq": seq,
            "id": uuid.uuid4(),
            "occurred_at": runtime.clock.now(),
            "action": action,
            "actor_id": None,
            "target_type": None,
            "target_id": None,
            "ip": None,
            "request_id": None,
            "data": {},
            "prev_hash": prev_hash,
        }
        session.add(AuditEvent(**fields, hash=event_hash(**fields)))


async def _waiting_for_an_advisory_lock(runtime: Runtime) -> bool:
    async with runtime.db.transaction(read_only=True) as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())"
            )
        )
    return bool(waiting)


async def test_on_postgresql_the_head_row_follows_every_append(
    runtime: Runtime, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite appends read the newest event; the head row is PostgreSQL's")
    assert await _head_row(runtime) is None
    await _append(runtime, 3, per_transaction=2)
    assert await _head_row(runtime) == await _newest(runtime)
    assert (await _newest(runtime))[0] == 3


async def test_on_postgresql_a_missing_or_stale_head_row_is_set_from_the_newest_event(
    runtime: Runtime, backend: str
) -> None:
    """Events appended without the head row (before it existed, or by a process of the
    release before it during a rolling deploy), or a head row deleted: the next append
    sets the head from the newest event and chains on it."""
    if backend != "postgresql":
        pytest.skip("SQLite appends read the newest event; the head row is PostgreSQL's")
    await _append_without_the_head_row(runtime, "test.before")
    await _append(runtime, 1)  # no head row yet: set from the event above
    assert await _head_row(runtime) == await _newest(runtime) and (await _newest(runtime))[0] == 2
    await _append_without_the_head_row(runtime, "test.beside")  # the head row is now behind
    await _append(runtime, 2, per_transaction=2)
    assert (await _newest(runtime))[0] == 5
    async with runtime.db.transaction() as session:
        await session.execute(delete(AuditChainHead))
    await _append(runtime, 1)
    assert await _head_row(runtime) == await _newest(runtime) and (await _newest(runtime))[0] == 6
    report = await _verify(runtime)
    assert report.ok and report.checked == 6, report


async def test_on_postgresql_an_append_waits_for_one_made_without_the_head_row(
    runtime: Runtime, backend: str
) -> None:
    """During a rolling deploy a process of the release before the head row appends
    beside those of this one. It holds the advisory lock from its read of the newest
    event to its commit; an append of this release started meanwhile takes that lock
    too, so it waits, then finds its seq taken and chains after the other's event
    (without the lock it would take the seq first, and the other's insert would fail)."""
    if backend != "postgresql":
        pytest.skip("SQLite admits one writer at a time")
    await _append(runtime, 1)  # the head row is current: the next seq is 2
    read, go = asyncio.Event(), asyncio.Event()
    older = asyncio.create_task(
        _append_without_the_head_row(runtime, "test.older", read=read, go=go)
    )
    async with asyncio.timeout(10):
        await read.wait()  # the older append has read seq 1 and holds the lock

    async def append_newer() -> AuditEvent:
        async with runtime.db.transaction() as session:
            return await record_audit_event(session, action="test.newer", clock=runtime.clock)

    newer_task = asyncio.create_task(append_newer())
    # The newer append waits for the lock (had it not taken it, it would be done by now
    # with seq 2, and no lock would be waited for).
    async with asyncio.timeout(10):
        while not await _waiting_for_an_advisory_lock(runtime):
            assert not newer_task.done(), "the newer append did not wait for the lock"
            await asyncio.sleep(0.01)
    go.set()
    await older
    newer = await newer_task
    assert newer.seq == 3
    report = await _verify(runtime)
    assert report.ok and report.checked == 3, report
    assert await _head_row(runtime) == await _newest(runtime)


async def test_on_postgresql_verify_finds_the_newest_events_cut_off_or_replaced(
    runtime: Runtime, backend: str
) -> None:
    """The chain alone cannot tell its newest events were deleted, or the newest one
    rewritten with a hash recomputed to match; the head row can, unless it was edited
    too."""
    if backend != "postgresql":
        pytest.skip("SQLite appends read the newest event; the head row is PostgreSQL's")
    await _append(runtime, 5)
    async with runtime.db.transaction() as session:
        await session.execute(delete(AuditEvent).where(AuditEvent.seq >= 4))
    report = await _verify(runtime)
    assert not report.ok and report.reason is ChainBreak.gap
    assert (report.broken_seq, report.checked, report.last_seq) == (4, 3, 3)
    assert "seq 5" in report.detail

    async with runtime.db.transaction() as session:  # the head moved back as well
        await session.execute(
            update(AuditChainHead).values(seq=3, hash=(await _newest(runtime))[2])
        )
    assert (await _verify(runtime)).ok

    async with runtime.db.transaction(read_only=True) as session:
        third = (await session.execute(select(AuditEvent).where(AuditEvent.seq == 3))).scalar_one()
    forged = {
        "seq": 3,
        "id": third.id,
        "occurred_at": third.occurred_at,
        "action": "auth.login",  # was user.blocked
        "actor_id": third.actor_id,
        "target_type": third.target_type,
        "target_id": third.target_id,
        "ip": third.ip,
        "request_id": third.request_id,
        "data": third.data,
        "prev_hash": third.prev_hash,
    }
    async with runtime.db.transaction() as session:
        await session.execute(
            update(AuditEvent)
            .where(AuditEvent.seq == 3)
            .values(action="auth.login", hash=event_hash(**forged))
        )
    report = await _verify(runtime)
    assert not report.ok and report.reason is ChainBreak.head_mismatch and report.broken_seq == 3


async def test_verify_says_nothing_of_a_head_row_behind_the_chain(
    runtime: Runtime, backend: str
) -> None:
    """Events appended without the head row (SQLite never writes it; a process of the
    release before it during a rolling deploy) leave it behind: no break."""
    await _append(runtime, 2)
    if backend == "postgresql":
        await _append_without_the_head_row(runtime, "test.later")
    else:
        await _append(runtime, 1)
    report = await _verify(runtime)
    assert report.ok and report.checked == 3, report


# -- masking ------------------------------------------------------------------------------


async def test_secrets_and_personal_data_are_masked_before_storage(runtime: Runtime) -> None:
    data = {
        "password": "hunter2-Very-Secret",
        "new_password": "another-Secret-99",
        "refresh_token": "rt_4f9a8c7e6d5b4a39",
        "otp": "492817",
        "code": "730152",
        "recovery_codes": ["k3j4-h5g6", "p9o8-i7u6"],
        "api_key": "sk_live_abcdef123456",
        "note": "sent Bearer abcdefghijklmnop to the client",
        "email": "amina.otieno@example.com",
        "phone": "+254712345678",
        "details": {"authorization": "Basic dXNlcjpwYXNz", "client_secret": "cs-998877"},
        "status_code": 401,
        "reason": "bad password",
        "when": dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "user": ADMIN_ID,
    }
    async with runtime.db.transaction() as session:
        event = await record_audit_event(
            session, action="auth.login_failed", data=data, clock=runtime.clock
        )
    async with runtime.db.transaction(read_only=True) as session:
        raw = (await session.execute(text("SELECT data FROM audit_events"))).scalar_one()
    stored_text = raw if isinstance(raw, str) else json.dumps(raw)
    for secret in (
        "hunter2",
        "another-Secret",
        "rt_4f9a8c7e6d5b4a39",
        "492817",
        "730152",
        "k3j4",
        "p9o8",
        "sk_live",
        "abcdefghijklmnop",
        "amina.otieno",
        "712345",
        "dXNlcjpwYXNz",
        "cs-998877",
    ):
        assert secret not in stored_text, secret
    stored = event.data
    assert stored["password"] == "[redacted]"
    assert stored["recovery_codes"] == "[redacted]"
    assert stored["email"] == "***@example.com"
    assert stored["phone"] == "***678"
    assert stored["status_code"] == 401
    assert stored["reason"] == "bad password"
    assert stored["when"] == "2030-01-02T03:04:05.000000+00:00"
    assert stored["user"] == str(ADMIN_ID)
    assert (await _verify(runtime)).ok


# -- the admin list -------------------------------------------------------------------------


def _principal(role: Role) -> Principal:
    return Principal(
        user_id=ADMIN_ID if role is Role.admin else uuid.uuid4(),
        roles=frozenset({role.value}),
        permissions=permissions_for({role.value}),
    )


@pytest.fixture
def signed_in(app: FastAPI) -> FastAPI:
    """``Authorization: Bearer <role>`` signs in as that role; no header is anonymous."""

    async def authenticate(request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            return None
        return _principal(Role(header.removeprefix("Bearer ")))

    app.state.authenticator = authenticate
    return app


def _as(role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {role.value}"}


async def _seed_for_listing(runtime: Runtime) -> list[uuid.UUID]:
    actors = [uuid.uuid4(), uuid.uuid4()]
    clock = runtime.clock
    assert isinstance(clock, ManualClock)
    for index in range(7):
        async with runtime.db.transaction() as session:
            await record_audit_event(
                session,
                action="user.blocked" if index % 2 else "auth.login",
                actor_id=actors[index % 2],
                target_type="user",
                target_id=f"user-{index % 3}",
                ip="198.51.100.1",
                request_id=f"req-{index}",
                data={"index": index, "password": "never-shown"},
                clock=clock,
            )
        clock.advance(dt.timedelta(minutes=10))
    return actors


async def test_admin_pages_through_audit_events_newest_first(
    runtime: Runtime, signed_in: FastAPI, client: httpx2.AsyncClient
) -> None:
    await _seed_for_listing(runtime)
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        response = await client.get(
            "/api/v1/admin/audit-events", params=params, headers=_as(Role.admin)
        )
        assert response.status_code == 200, response.text
        body = response.json()
        seen += [item["seq"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [7, 6, 5, 4, 3, 2, 1]
    assert pages == 3
    first = (
        await client.get("/api/v1/admin/audit-events?limit=1", headers=_as(Role.admin))
    ).json()["items"][0]
    assert set(first) == {
        "seq",
        "id",
        "occurred_at",
        "action",
        "actor_id",
        "target_type",
        "target_id",
        "ip",
        "request_id",
        "data",
    }
    assert first["data"] == {"index": 6, "password": "[redacted]"}
    assert first["ip"] == "198.51.100.1" and first["request_id"] == "req-6"
    assert dt.datetime.fromisoformat(first["occurred_at"]) == dt.datetime(
        2030, 1, 1, 1, 0, tzinfo=dt.UTC
    )


async def test_audit_events_filter_by_action_actor_target_and_time(
    runtime: Runtime, signed_in: FastAPI, client: httpx2.AsyncClient
) -> None:
    actors = await _seed_for_listing(runtime)

    async def seqs(**params: Any) -> list[int]:
        response = await client.get(
            "/api/v1/admin/audit-events", params=params, headers=_as(Role.admin)
        )
        assert response.status_code == 200, response.text
        return [item["seq"] for item in response.json()["items"]]

    assert await seqs(action="user.blocked") == [6, 4, 2]
    assert await seqs(actor_id=str(actors[0])) == [7, 5, 3, 1]
    assert await seqs(target_id="user-0") == [7, 4, 1]
    assert await seqs(target_type="order") == []
    # Events are 10 minutes apart from 2030-01-01T00:00Z; since is inclusive, until not.
    assert await seqs(since="2030-01-01T00:20:00Z", until="2030-01-01T00:50:00+00:00") == [5, 4, 3]
    assert await seqs(since="2030-01-01T03:00:00+03:00") == [7, 6, 5, 4, 3, 2, 1]
    assert await seqs(action="auth.login", actor_id=str(actors[0]), target_id="user-1") == [5]


async def test_audit_events_refuse_naive_times_and_foreign_cursors(
    runtime: Runtime, signed_in: FastAPI, client: httpx2.AsyncClient
) -> None:
    await _seed_for_listing(runtime)
    naive = await client.get(
        "/api/v1/admin/audit-events?since=2030-01-01T00:20:00", headers=_as(Role.admin)
    )
    assert naive.status_code == 422
    forged = await client.get("/api/v1/admin/audit-events?cursor=abc.def", headers=_as(Role.admin))
    assert forged.status_code == 400
    assert forged.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (None, 401),
        (Role.customer, 403),
        (Role.seller, 403),
        (Role.operator, 403),
        (Role.support, 200),
        (Role.admin, 200),
    ],
)
async def test_audit_events_need_the_audit_read_permission(
    signed_in: FastAPI, client: httpx2.AsyncClient, role: Role | None, status: int
) -> None:
    headers = _as(role) if role is not None else {}
    response = await client.get("/api/v1/admin/audit-events", headers=headers)
    assert response.status_code == status, response.text
    if status != 200:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "items" not in response.json()


# -- soko audit verify ---------------------------------------------------------------------


def _cli_database(tmp_path: Path, events: int) -> str:
    url = f"sqlite+aiosqlite:///{(tmp_path / 'cli.db').as_posix()}"

    async def setup() -> None:
        engine = create_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        await engine.dispose()
        from soko.platform.db import Database

        database = Database(create_engine(url))
        clock = ManualClock()
        try:
            for index in range(events):
                async with database.transaction() as session:
                    await record_audit_event(
                        session, action="auth.login", target_id=str(index), clock=clock
                    )
                clock.advance(1)
        finally:
            await database.dispose()

    asyncio.run(setup())
    return url


def _run_sql(url: str, statement: str) -> None:
    async def run() -> None:
        engine = create_engine(url)
        async with engine.begin() as conn:
            await conn.execute(text(statement))
        await engine.dispose()

    asyncio.run(run())


def _invoke(tmp_path: Path, url: str, *args: str) -> Any:
    env = {
        "SOKO_DATABASE_URL": url,
        "SOKO_DATA_DIR": str(tmp_path / "data"),
        "SOKO_ENV": "development",
        "COLUMNS": "200",
    }
    app = typer.Typer()
    app.add_typer(audit_app, name="audit")
    return CliRunner().invoke(app, ["audit", "verify", *args], env=env)


def test_cli_verify_passes_an_intact_chain(tmp_path: Path) -> None:
    url = _cli_database(tmp_path, 25)
    result = _invoke(tmp_path, url, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "intact" in result.output
    assert "25 events verified" in result.output
    assert "head: seq 25" in result.output


def test_cli_verify_passes_an_empty_log(tmp_path: Path) -> None:
    url = _cli_database(tmp_path, 0)
    result = _invoke(tmp_path, url)
    assert result.exit_code == 0, result.output
    assert "0 events verified" in result.output


def test_cli_verify_fails_on_a_tampered_chain(tmp_path: Path) -> None:
    url = _cli_database(tmp_path, 10)
    _run_sql(url, "UPDATE audit_events SET target_id = 'edited' WHERE seq = 7")
    result = _invoke(tmp_path, url, "--batch-size", "3")
    assert result.exit_code == 1, result.output
    assert "broken at seq 7" in result.output
    assert "hash_mismatch" in result.output
    assert "6 events verified before the break" in result.output


def test_cli_verify_fails_on_a_deleted_event(tmp_path: Path) -> None:
    url = _cli_database(tmp_path, 10)
    _run_sql(url, "DELETE FROM audit_events WHERE seq = 4")
    result = _invoke(tmp_path, url)
    assert result.exit_code == 1, result.output
    assert "broken at seq 4" in result.output
    assert "gap" in result.output


def test_cli_verify_explains_a_database_without_the_audit_table(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{(tmp_path / 'empty.db').as_posix()}"
    result = _invoke(tmp_path, url)
    assert result.exit_code == 2
    assert "cannot read the audit log" in result.output
