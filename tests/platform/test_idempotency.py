"""Idempotency keys: fingerprints, claims, replays, take-overs, the purge job, and the
FastAPI dependency on a route of its own."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import APIRouter, FastAPI, Response
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from sqlalchemy import event, func, select
from starlette.responses import JSONResponse

from soko.platform.auth import SignedIn
from soko.platform.clock import ManualClock
from soko.platform.errors import Conflict, ValidationFailed
from soko.platform.idempotency import (
    LEASE,
    PURGE_JOB,
    REPLAYED_HEADER,
    IdempotencyDep,
    IdempotencyInFlight,
    IdempotencyKey,
    IdempotencyKeyRequired,
    IdempotencyKeyReused,
    IdempotentRequest,
    KeyStatus,
    StoredAnswer,
    _idempotent_request,
    check_key,
    claim_key,
    purge_expired,
    release_claim,
    request_fingerprint,
    scope_of,
    store_answer,
)
from soko.platform.jobs import registry
from soko.platform.outbox import MessageKind, OutboxMessage, publish
from soko.platform.runtime import Runtime, SessionDep
from tests.identity.conftest import MakeUser, make_user  # noqa: F401

TTL = dt.timedelta(hours=24)

# -- without a database ---------------------------------------------------------------------------


def test_a_fingerprint_ignores_how_the_json_is_written_but_nothing_else() -> None:
    base = request_fingerprint("POST", "/api/v1/checkout", "", b'{"a": 1, "b": [1, 2]}')
    assert request_fingerprint("post", "/api/v1/checkout", "", b'{"b":[1,2],"a":1}') == base
    assert request_fingerprint("POST", "/api/v1/checkout", "", b'{"a": 2, "b": [1, 2]}') != base
    assert request_fingerprint("POST", "/api/v1/checkout", "", b'{"a": 1, "b": [2, 1]}') != base
    assert request_fingerprint("POST", "/api/v1/other", "", b'{"a": 1, "b": [1, 2]}') != base
    assert request_fingerprint("POST", "/api/v1/checkout", "x=1", b'{"a": 1, "b": [1, 2]}') != base
    assert request_fingerprint("PUT", "/api/v1/checkout", "", b'{"a": 1, "b": [1, 2]}') != base
    # A body that is not JSON counts byte for byte.
    assert request_fingerprint("POST", "/p", "", b"a=1") != request_fingerprint(
        "POST", "/p", "", b"a=1 "
    )
    assert request_fingerprint("POST", "/p", "", b"") != request_fingerprint(
        "POST", "/p", "", b"{}"
    )


def test_keys_are_one_to_255_printable_ascii_characters() -> None:
    assert check_key("a") == "a"
    assert check_key("k" * 255) == "k" * 255
    assert check_key("order 42 / retry ~") == "order 42 / retry ~"
    for missing in (None, "", "   "):
        with pytest.raises(IdempotencyKeyRequired):
            check_key(missing)
    for bad in ("k" * 256, "tab\tkey", "caf\u00e9", "new\nline"):
        with pytest.raises(ValidationFailed):
            check_key(bad)


def test_keys_are_scoped_per_client() -> None:
    user, key = uuid.uuid4(), uuid.uuid4()
    assert scope_of(user, None) == f"user:{user}"
    assert scope_of(user, key) == f"api-key:{key}"


def test_expired_keys_are_purged_on_a_schedule() -> None:
    assert PURGE_JOB in registry.schedules
    assert PURGE_JOB in registry.jobs


# -- claims in the database ------------------------------------------------------------------------


async def claim(
    runtime: Runtime, fingerprint: str = "f1", key: str = "k1", **kw: Any
) -> IdempotentRequest:
    return await claim_key(
        runtime.db,
        scope="user:test",
        key=key,
        fingerprint=fingerprint,
        now=runtime.clock.now(),
        ttl=kw.pop("ttl", TTL),
        **kw,
    )


async def answer(runtime: Runtime, held: IdempotentRequest, status: int = 201) -> bool:
    assert held.id is not None and held.token is not None
    async with runtime.db.transaction() as session:
        return await store_answer(
            session,
            held.id,
            held.token,
            StoredAnswer(status, {"id": "g-1", "total": 900}, {"Location": "/things/g-1"}),
        )


async def rows(runtime: Runtime) -> list[IdempotencyKey]:
    async with runtime.db.transaction(read_only=True) as session:
        return list((await session.scalars(select(IdempotencyKey))).all())


async def test_a_key_is_claimed_once_then_answered_then_replayed(runtime: Runtime) -> None:
    held = await claim(runtime)
    assert held.replay is None and held.id is not None
    [row] = await rows(runtime)
    assert (row.status, row.scope, row.key) == (KeyStatus.in_flight.value, "user:test", "k1")
    assert row.expires_at == runtime.clock.now() + TTL

    with pytest.raises(IdempotencyInFlight) as in_flight:
        await claim(runtime)
    assert in_flight.value.headers["Retry-After"] == "1"

    assert await answer(runtime, held)
    replay = (await claim(runtime)).replay
    assert replay is not None
    assert replay.status_code == 201
    assert replay.body == b'{"id":"g-1","total":900}'
    assert replay.headers["location"] == "/things/g-1"
    assert replay.headers[REPLAYED_HEADER] == "true"
    # Another request under the same key, answered or not, is refused.
    with pytest.raises(IdempotencyKeyReused):
        await claim(runtime, fingerprint="f2")


async def test_a_new_key_is_claimed_in_one_statement_outside_any_transaction(
    runtime: Runtime,
) -> None:
    """On PostgreSQL the claim of a new key runs in autocommit: no BEGIN and COMMIT
    around its one INSERT. It is committed all the same (another connection reads it)."""
    engine = runtime.db.engine.sync_engine
    sent: list[tuple[str, bool]] = []

    def after(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        driver = conn.connection.driver_connection
        in_transaction = (
            driver.is_in_transaction()
            if callable(getattr(driver, "is_in_transaction", None))
            else bool(driver.in_transaction)
        )
        sent.append((statement.split(maxsplit=1)[0].upper(), in_transaction))

    event.listen(engine, "after_cursor_execute", after)
    try:
        held = await claim(runtime)
    finally:
        event.remove(engine, "after_cursor_execute", after)
    assert held.id is not None
    assert [verb for verb, _ in sent if verb != "BEGIN"] == ["INSERT"]  # SQLite: BEGIN IMMEDIATE
    if runtime.db.dialect == "postgresql":
        assert sent == [("INSERT", False)]
    [row] = await rows(runtime)
    assert row.id == held.id and row.status == KeyStatus.in_flight.value


async def test_another_request_with_a_key_in_flight_is_a_reuse(runtime: Runtime) -> None:
    await claim(runtime)
    with pytest.raises(IdempotencyKeyReused):
        await claim(runtime, fingerprint="f2")


async def test_a_claim_released_between_the_insert_and_the_read_is_claimed_afresh(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first request answered an error that is not kept (a 422, a 5xx) and gave its
    # claim up just after a retry's insert met it and before the retry read it.
    first = await claim(runtime)
    assert first.id is not None and first.token is not None
    opened = runtime.db.transaction
    released = []

    @contextlib.asynccontextmanager
    async def released_first(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        if not released:
            assert first.id is not None and first.token is not None
            released.append(True)
            await release_claim(runtime.db, first.id, first.token)
        async with opened(*args, **kwargs) as session:
            yield session

    monkeypatch.setattr(runtime.db, "transaction", released_first)
    retry = await claim(runtime)
    monkeypatch.undo()
    assert released and retry.replay is None and retry.id is not None
    assert retry.id != first.id
    [row] = await rows(runtime)
    assert (row.id, row.claim_token, row.status) == (retry.id, retry.token, "in_flight")


async def test_keys_of_different_scopes_never_meet(runtime: Runtime) -> None:
    mine = await claim(runtime)
    theirs = await claim_key(
        runtime.db, scope="user:other", key="k1", fingerprint="f2", now=runtime.clock.now(), ttl=TTL
    )
    assert mine.id != theirs.id and theirs.replay is None


async def test_a_claim_whose_lease_ran_out_is_taken_over(
    runtime: Runtime, clock: ManualClock
) -> None:
    stalled = await claim(runtime)
    clock.advance(LEASE + dt.timedelta(seconds=1))

    retry = await claim(runtime)

    assert retry.replay is None and retry.id == stalled.id and retry.token != stalled.token
    # The stalled request can no longer answer: the retry does the work.
    assert not await answer(runtime, stalled)
    assert await answer(runtime, retry)
    assert (await claim(runtime)).replay is not None


async def test_answer_refuses_a_claim_taken_over(runtime: Runtime, clock: ManualClock) -> None:
    stalled = await claim(runtime)
    clock.advance(LEASE * 2)
    await claim(runtime)
    async with runtime.db.transaction() as session:
        with pytest.raises(IdempotencyInFlight):
            await stalled.answer(session, {"late": True})


async def test_a_released_claim_lets_a_retry_run_afresh(runtime: Runtime) -> None:
    failed = await claim(runtime)
    assert failed.id is not None and failed.token is not None
    await release_claim(runtime.db, failed.id, failed.token)
    assert await rows(runtime) == []
    retry = await claim(runtime, fingerprint="f2")  # even with another body: it never happened
    assert retry.replay is None


async def test_an_expired_key_starts_afresh(runtime: Runtime, clock: ManualClock) -> None:
    assert await answer(runtime, await claim(runtime))
    clock.advance(TTL)

    again = await claim(runtime, fingerprint="f2")

    assert again.replay is None
    [row] = await rows(runtime)
    assert (row.status, row.request_hash, row.response_body) == (
        KeyStatus.in_flight.value,
        "f2",
        None,
    )


async def test_the_purge_deletes_expired_keys_only(runtime: Runtime, clock: ManualClock) -> None:
    assert await answer(runtime, await claim(runtime, key="old"))
    await claim(runtime, key="running", ttl=dt.timedelta(seconds=10))  # in flight, lease 60 s
    clock.advance(dt.timedelta(seconds=30))
    assert await answer(runtime, await claim(runtime, key="fresh"))

    async with runtime.db.transaction() as session:
        assert await purge_expired(session, clock.now()) == 0
    clock.advance(TTL - dt.timedelta(seconds=15))
    async with runtime.db.transaction() as session:
        # "old" is past its time, and so is "running", whose lease has run out too.
        assert await purge_expired(session, clock.now()) == 2
    assert [row.key for row in await rows(runtime)] == ["fresh"]


async def test_the_purge_keeps_a_key_whose_request_still_runs(
    runtime: Runtime, clock: ManualClock
) -> None:
    await claim(runtime, ttl=dt.timedelta(seconds=10))
    clock.advance(dt.timedelta(seconds=20))
    async with runtime.db.transaction() as session:
        assert await purge_expired(session, clock.now()) == 0
    clock.advance(LEASE)
    async with runtime.db.transaction() as session:
        assert await purge_expired(session, clock.now()) == 1


async def test_the_purge_job_runs_from_the_dispatcher(runtime: Runtime, clock: ManualClock) -> None:
    assert await answer(runtime, await claim(runtime))
    clock.advance(TTL + dt.timedelta(minutes=15))
    await runtime.dispatcher.run_until_idle()
    assert await rows(runtime) == []


# -- the dependency on a route --------------------------------------------------------------------


class ThingIn(BaseModel):
    name: str


def idempotent_router(gate: dict[str, asyncio.Event]) -> APIRouter:
    router = APIRouter()

    @router.post("/idempotency-probe/things", status_code=201)
    async def make_thing(
        principal: SignedIn, claim: IdempotencyDep, session: SessionDep, body: ThingIn
    ) -> Response:
        if claim.replay is not None:
            return claim.replay
        if body.name == "slow":
            gate["entered"].set()
            await gate["release"].wait()
        await publish(session, "probe.thing_made", {"name": body.name})
        if body.name == "refuse":
            raise Conflict("Not that one.", reason="taken")
        if body.name == "crash":
            raise RuntimeError("the disk is full")
        if body.name == "forget":
            return JSONResponse({"forgot": True})
        thing_id = str(uuid.uuid4())
        return await claim.answer(
            session,
            {"id": thing_id, "name": body.name},
            status_code=201,
            headers={"Location": f"/things/{thing_id}"},
        )

    return router


@pytest.fixture
def gate() -> dict[str, asyncio.Event]:
    return {"entered": asyncio.Event(), "release": asyncio.Event()}


@pytest.fixture
def probe(app: FastAPI, gate: dict[str, asyncio.Event]) -> str:
    app.include_router(idempotent_router(gate), prefix="/api/v1")
    return "/api/v1/idempotency-probe/things"


async def made(runtime: Runtime) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        found = await session.scalar(
            select(func.count()).where(
                OutboxMessage.kind == MessageKind.event.value,
                OutboxMessage.name == "probe.thing_made",
            )
        )
    return int(found or 0)


def post(client: httpx2.AsyncClient, url: str, user: Any, key: str | None, name: str) -> Any:
    headers = dict(user.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(url, json={"name": name}, headers=headers)


async def test_a_retry_replays_the_answer_without_acting_again(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    probe: str,
    make_user: MakeUser,  # noqa: F811
) -> None:
    user = await make_user()
    first = await post(client, probe, user, "key-1", "mango")
    assert first.status_code == 201 and REPLAYED_HEADER.lower() not in first.headers
    again = await post(client, probe, user, "key-1", "mango")
    assert again.status_code == 201
    assert again.headers[REPLAYED_HEADER] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert again.content == first.content
    assert await made(runtime) == 1
    reused = await post(client, probe, user, "key-1", "papaya")
    assert (reused.status_code, reused.json()["type"]) == (422, "/problems/idempotency-key-reused")
    assert await made(runtime) == 1


async def test_keys_belong_to_their_client(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    probe: str,
    make_user: MakeUser,  # noqa: F811
) -> None:
    one, two = await make_user(), await make_user()
    first = await post(client, probe, one, "shared", "mango")
    second = await post(client, probe, two, "shared", "papaya")
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json()["name"] == "papaya"
    assert REPLAYED_HEADER.lower() not in second.headers


async def test_a_refusal_is_stored_and_replayed(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    probe: str,
    make_user: MakeUser,  # noqa: F811
) -> None:
    user = await make_user()
    first = await post(client, probe, user, "key-2", "refuse")
    assert first.status_code == 409
    assert first.headers["content-type"].startswith("application/problem+json")
    again = await post(client, probe, user, "key-2", "refuse")
    assert again.status_code == 409
    assert again.headers[REPLAYED_HEADER] == "true"
    assert again.headers["content-type"].startswith("application/problem+json")
    assert again.json() == first.json()
    assert again.json()["reason"] == "taken"
    # The refused request's own writes rolled back.
    assert await made(runtime) == 0


@pytest.mark.parametrize("name", ["crash", "forget"])
async def test_a_failure_gives_the_key_back(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    probe: str,
    make_user: MakeUser,  # noqa: F811
    name: str,
) -> None:
    user = await make_user()
    first = await post(client, probe, user, "key-3", name)
    assert first.status_code == (500 if name == "crash" else 200)
    assert await rows(runtime) == []
    # The retry runs for real (and can now succeed with the same key and body).
    again = await post(client, probe, user, "key-3", name)
    assert REPLAYED_HEADER.lower() not in again.headers


async def test_a_malformed_request_gives_the_key_back(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    probe: str,
    make_user: MakeUser,  # noqa: F811
) -> None:
    user = await make_user()
    bad = await client.post(
        probe, json={"nom": "mango"}, headers={**user.headers, "Idempotency-Key": "key-4"}
    )
    assert bad.status_code == 422 and bad.json()["type"] == "/problems/validation-error"
    assert await rows(runtime) == []
    assert (await post(client, probe, user, "key-4", "mango")).status_code == 201


async def test_a_missing_key_or_caller_is_refused_before_anything_happens(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    probe: str,
    make_user: MakeUser,  # noqa: F811
) -> None:
    user = await make_user()
    missing = await post(client, probe, user, None, "mango")
    assert (missing.status_code, missing.json()["type"]) == (
        400,
        "/problems/idempotency-key-required",
    )
    anonymous = await client.post(probe, json={"name": "mango"}, headers={"Idempotency-Key": "k"})
    assert (anonymous.status_code, anonymous.json()["type"]) == (401, "/problems/unauthorized")
    assert await rows(runtime) == []
    assert await made(runtime) == 0


async def test_a_request_still_in_flight_is_not_run_twice(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    probe: str,
    make_user: MakeUser,  # noqa: F811
    gate: dict[str, asyncio.Event],
) -> None:
    user = await make_user()
    first = asyncio.create_task(post(client, probe, user, "key-5", "slow"))
    await gate["entered"].wait()

    second = await post(client, probe, user, "key-5", "slow")

    assert (second.status_code, second.json()["type"]) == (409, "/problems/idempotency-in-flight")
    assert int(second.headers["retry-after"]) >= 1
    gate["release"].set()
    assert (await first).status_code == 201
    third = await post(client, probe, user, "key-5", "slow")
    assert (third.status_code, third.headers[REPLAYED_HEADER]) == (201, "true")
    assert await made(runtime) == 1


def _needs_a_key(dependant: Any) -> bool:
    return any(
        sub.call is _idempotent_request or _needs_a_key(sub) for sub in dependant.dependencies
    )


def test_docs_name_every_route_that_takes_an_idempotency_key(app: FastAPI) -> None:
    keyed = {
        f"{method} {context.path}"
        for context in iter_route_contexts(app.routes)
        if getattr(context, "dependant", None) is not None and _needs_a_key(context.dependant)
        for method in context.methods or ()
    }
    docs = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = docs.split("## Idempotency keys", 1)[1].split("\n- ", 1)[0]
    assert keyed, "no route takes an Idempotency-Key"
    assert {name for name in keyed if f"`{name}`" not in section} == set()
