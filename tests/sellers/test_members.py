"""A store's members: owners manage them, any member may leave, and a store always
keeps an owner, also when two owners change each other at once. (People join by
invitation: tests/sellers/test_invitations.py.)"""

from __future__ import annotations

import asyncio

import httpx2

from tests.identity.conftest import MakeUser
from tests.sellers.conftest import (
    INVITATIONS,
    MEMBERS,
    MY_INVITATIONS,
    Stores,
    as_store,
    join_store,
    problem_type,
)
from tests.sellers.test_review import roles_of


async def test_only_owners_manage_members(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner, manager, staff, outsider = [await make_user() for _ in range(4)]
    await stores.apply(owner)
    for user, role in ((manager, "manager"), (staff, "staff")):
        await join_store(client, owner.headers, user, role)
    for user in (manager, staff):
        tries = [
            await client.post(INVITATIONS, json={"address": outsider.email}, headers=user.headers),
            await client.get(INVITATIONS, headers=user.headers),
            await client.patch(
                f"{MEMBERS}/{staff.user_id}", json={"role": "owner"}, headers=user.headers
            ),
            await client.delete(f"{MEMBERS}/{owner.user_id}", headers=user.headers),
        ]
        for response in tries:
            assert response.status_code == 403, response.text
            assert problem_type(response) == "seller-role-required"
            assert response.json()["required_role"] == "owner"
    # Promoted to owner, the manager manages.
    promoted = await client.patch(
        f"{MEMBERS}/{manager.user_id}", json={"role": "owner"}, headers=owner.headers
    )
    assert promoted.status_code == 200
    assert promoted.json()["role"] == "owner"
    removed = await client.delete(f"{MEMBERS}/{staff.user_id}", headers=manager.headers)
    assert removed.status_code == 204
    assert (await client.get(MEMBERS, headers=staff.headers)).status_code == 403


async def test_any_member_may_leave(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner, staff = await make_user(), await make_user()
    await stores.apply(owner)
    await join_store(client, owner.headers, staff)
    left = await client.delete(f"{MEMBERS}/{staff.user_id}", headers=staff.headers)
    assert left.status_code == 204
    again = await client.delete(f"{MEMBERS}/{staff.user_id}", headers=owner.headers)
    assert again.status_code == 404


async def test_the_last_owner_can_be_neither_removed_nor_demoted(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner, second = await make_user(), await make_user()
    await stores.apply(owner)
    for response in (
        await client.patch(
            f"{MEMBERS}/{owner.user_id}", json={"role": "manager"}, headers=owner.headers
        ),
        await client.delete(f"{MEMBERS}/{owner.user_id}", headers=owner.headers),
    ):
        assert response.status_code == 409
        assert problem_type(response) == "seller-last-owner"
    await join_store(client, owner.headers, second, "owner")
    demoted = await client.patch(
        f"{MEMBERS}/{owner.user_id}", json={"role": "staff"}, headers=owner.headers
    )
    assert demoted.status_code == 200
    assert demoted.json()["role"] == "staff"
    last = await client.delete(f"{MEMBERS}/{second.user_id}", headers=second.headers)
    assert problem_type(last) == "seller-last-owner"


async def test_two_owners_demoting_each_other_at_once_leave_one_owner(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    """Each change locks the store's row first and reads the caller's role again under
    the lock: the second change sees the first's result, and its caller is no longer an
    owner (or no longer a member)."""
    for _ in range(3):
        first, second = await make_user(), await make_user()
        await stores.apply(first)
        await join_store(client, first.headers, second, "owner")
        responses = await asyncio.gather(
            client.patch(
                f"{MEMBERS}/{second.user_id}", json={"role": "staff"}, headers=first.headers
            ),
            client.delete(f"{MEMBERS}/{first.user_id}", headers=second.headers),
        )
        assert sorted(response.status_code for response in responses) in ([200, 403], [204, 403])
        listed = (await client.get(MEMBERS, headers=first.headers)).json()
        if listed.get("items") is None:  # first left: ask the remaining owner
            listed = (await client.get(MEMBERS, headers=second.headers)).json()
        assert [item["role"] for item in listed["items"]].count("owner") == 1


async def test_another_stores_members_are_out_of_reach(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    mine_owner, their_owner, their_staff = await make_user(), await make_user(), await make_user()
    mine = await stores.apply(mine_owner)
    theirs = await stores.apply(their_owner)
    await join_store(client, their_owner.headers, their_staff)

    # Naming their store: not a member of it.
    for response in (
        await client.get(MEMBERS, headers=as_store(mine_owner, theirs["id"])),
        await client.post(
            INVITATIONS,
            json={"address": mine_owner.email, "role": "owner"},
            headers=as_store(mine_owner, theirs["id"]),
        ),
        await client.delete(
            f"{MEMBERS}/{their_staff.user_id}", headers=as_store(mine_owner, theirs["id"])
        ),
        await client.get("/api/v1/seller/profile", headers=as_store(mine_owner, theirs["id"])),
    ):
        assert response.status_code == 403
        assert problem_type(response) == "not-a-seller"
    # Their members, through my store: no such member.
    for response in (
        await client.patch(
            f"{MEMBERS}/{their_staff.user_id}",
            json={"role": "manager"},
            headers=as_store(mine_owner, mine["id"]),
        ),
        await client.delete(f"{MEMBERS}/{their_owner.user_id}", headers=mine_owner.headers),
    ):
        assert response.status_code == 404
    listed = (await client.get(MEMBERS, headers=their_owner.headers)).json()["items"]
    assert {item["user_id"] for item in listed} == {
        str(their_owner.user_id),
        str(their_staff.user_id),
    }


async def test_members_are_paginated(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner = await make_user()
    await stores.apply(owner)
    added = [await make_user() for _ in range(4)]
    for user in added:
        await join_store(client, owner.headers, user)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get(MEMBERS, params=params, headers=owner.headers)).json()
        seen += [item["user_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [str(owner.user_id), *(str(user.user_id) for user in added)]


async def test_a_member_joining_while_the_store_is_approved_becomes_a_seller(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    # Approval grants the role to the members it sees; joining an active store grants
    # it at once. Sent together, each once missed the other.
    for _ in range(3):
        owner, member = await make_user(), await make_user()
        store = await stores.apply(owner)
        invited = await client.post(
            INVITATIONS, json={"address": member.email}, headers=owner.headers
        )
        assert invited.status_code == 201, invited.text
        approved, accepted = await asyncio.gather(
            stores.decide(store["id"], "approve"),
            client.post(f"{MY_INVITATIONS}/{invited.json()['id']}/accept", headers=member.headers),
        )
        assert (approved.status_code, accepted.status_code) == (200, 201)
        assert sorted(await roles_of(client, member.headers)) == ["customer", "seller"]
