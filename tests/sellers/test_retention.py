"""The invitation purge: invitations that ended more than the retention window ago go,
with their encrypted addresses; open ones and recently ended ones stay."""

from __future__ import annotations

import datetime as dt

import httpx2
from sqlalchemy import select

from soko.platform.clock import ManualClock
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from soko.sellers.models import SellerInvitation
from soko.sellers.retention import PURGE_JOB, purge_invitations
from tests.identity.conftest import MakeUser
from tests.sellers.conftest import INVITATIONS, MY_INVITATIONS, Stores

KEEP = dt.timedelta(days=30)


async def _left(runtime: Runtime) -> set[str]:
    async with runtime.db.sessionmaker() as session:
        return {str(row) for row in (await session.scalars(select(SellerInvitation.id))).all()}


async def test_ended_invitations_go_after_the_window_and_open_ones_stay(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    make_user: MakeUser,
    stores: Stores,
) -> None:
    owner, invitee = await make_user(), await make_user()
    await stores.apply(owner)

    async def invite(address: str) -> str:
        answer = await client.post(INVITATIONS, json={"address": address}, headers=owner.headers)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    accepted = await invite(invitee.email)
    answer = await client.post(f"{MY_INVITATIONS}/{accepted}/accept", headers=invitee.headers)
    assert answer.status_code == 201
    expired = await invite("never-answered@example.com")
    # Move the clock by hand in the rows: the sessions' tokens stay valid.
    async with runtime.db.transaction() as session:
        for row in (await session.scalars(select(SellerInvitation))).all():
            row.created_at -= KEEP + dt.timedelta(days=8)
            row.expires_at -= KEEP + dt.timedelta(days=8)
            if row.decided_at is not None:
                row.decided_at -= KEEP + dt.timedelta(days=8)
    recent = await invite("recent@example.com")
    revoked_lately = await invite("changed-mind@example.com")
    assert (
        await client.delete(f"{INVITATIONS}/{revoked_lately}", headers=owner.headers)
    ).status_code == 204

    async with runtime.db.transaction() as session:
        assert await purge_invitations(session, clock.now(), keep=KEEP) == (2, False)
    assert await _left(runtime) == {recent, revoked_lately}
    assert accepted not in await _left(runtime) and expired not in await _left(runtime)


async def test_the_purge_runs_from_the_dispatcher(runtime: Runtime, clock: ManualClock) -> None:
    clock.advance(dt.timedelta(hours=1))
    await runtime.dispatcher.run_until_idle()
    async with runtime.db.sessionmaker() as session:
        runs = (
            await session.scalars(
                select(OutboxMessage.status).where(OutboxMessage.name == PURGE_JOB)
            )
        ).all()
    assert runs and set(runs) == {"done"}
