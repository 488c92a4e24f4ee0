"""Joining a store by invitation: nobody becomes a member without accepting, only an
account that verified the invited address may accept, inviting reveals nothing about
who has an account, and the daily limits hold when invitations are sent together."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import httpx2
from sqlalchemy import select, text

from soko.identity.models import AuditEvent
from soko.notifications.public import read_sink
from soko.platform.runtime import Runtime
from soko.sellers.invitations import (
    INVITATIONS_PER_ADDRESS_PER_DAY,
    INVITATIONS_PER_INVITER_PER_DAY,
)
from soko.sellers.models import SellerInvitation
from tests.identity.conftest import MakeUser, SignedInUser
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


async def _invite(
    client: httpx2.AsyncClient, headers: dict[str, str], address: str, role: str = "staff"
) -> httpx2.Response:
    return await client.post(INVITATIONS, json={"address": address, "role": role}, headers=headers)


async def _accept(client: httpx2.AsyncClient, user: SignedInUser, invitation_id: Any) -> Any:
    return await client.post(f"{MY_INVITATIONS}/{invitation_id}/accept", headers=user.headers)


async def _decline(client: httpx2.AsyncClient, user: SignedInUser, invitation_id: Any) -> Any:
    return await client.post(f"{MY_INVITATIONS}/{invitation_id}/decline", headers=user.headers)


async def _mine(client: httpx2.AsyncClient, user: SignedInUser) -> list[dict[str, Any]]:
    response = await client.get(MY_INVITATIONS, headers=user.headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def _store_invitations(
    client: httpx2.AsyncClient, headers: dict[str, str]
) -> dict[str, dict[str, Any]]:
    response = await client.get(INVITATIONS, headers=headers)
    assert response.status_code == 200, response.text
    return {item["id"]: item for item in response.json()["items"]}


async def _age(runtime: Runtime, by: dt.timedelta) -> None:
    """Every invitation sent ``by`` earlier (the clock stays, so access tokens do too)."""
    async with runtime.db.transaction() as session:
        for invitation in (await session.scalars(select(SellerInvitation))).all():
            invitation.created_at -= by
            invitation.expires_at -= by


async def _delivered(runtime: Runtime, kind: str, to: str) -> list[dict[str, Any]]:
    await runtime.dispatcher.run_until_idle()
    return [
        message
        for message in read_sink(runtime.settings.data_dir, kind)  # type: ignore[arg-type]
        if message["to"] == to and message["category"] == "sellers.invitation"
    ]


async def test_an_invited_person_sees_the_invitation_accepts_it_and_joins(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, stores: Stores
) -> None:
    owner, manager = await make_user(), await make_user()
    store = await stores.apply(owner, store_name="Mama Mboga")

    invited = await _invite(client, owner.headers, manager.email.upper(), "manager")
    assert invited.status_code == 201, invited.text
    invitation = invited.json()
    assert invitation["address"] == manager.email
    assert invitation["address_kind"] == "email"
    assert (invitation["role"], invitation["status"]) == ("manager", "pending")
    assert invitation["invited_by"] == str(owner.user_id)
    created = dt.datetime.fromisoformat(invitation["created_at"])
    assert dt.datetime.fromisoformat(invitation["expires_at"]) - created == dt.timedelta(days=7)

    # Nothing changed yet: the person is not a member until they say yes.
    assert (await client.get(MEMBERS, headers=manager.headers)).status_code == 403
    [message] = await _delivered(runtime, "email", manager.email)
    assert "Mama Mboga" in message["subject"]
    assert "manager" in message["text"]
    [waiting] = await _mine(client, manager)
    assert waiting["id"] == invitation["id"]
    assert (waiting["store_name"], waiting["slug"], waiting["role"]) == (
        "Mama Mboga",
        store["slug"],
        "manager",
    )
    assert waiting["invited_by_name"] == "Test user"

    accepted = await _accept(client, manager, invitation["id"])
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["id"] == store["id"]
    assert accepted.json()["role"] == "manager"
    listed = (await client.get(MEMBERS, headers=manager.headers)).json()["items"]
    assert [(item["user_id"], item["role"], item["added_by"]) for item in listed] == [
        (str(owner.user_id), "owner", str(owner.user_id)),
        (str(manager.user_id), "manager", str(owner.user_id)),
    ]
    assert await _mine(client, manager) == []
    seen = (await _store_invitations(client, owner.headers))[invitation["id"]]
    assert seen["status"] == "accepted"
    assert seen["decided_at"] is not None

    # A pending store's members are not sellers yet; approval makes them all sellers.
    assert await roles_of(client, manager.headers) == ["customer"]
    assert (await stores.decide(store["id"], "approve")).status_code == 200
    assert sorted(await roles_of(client, manager.headers)) == ["customer", "seller"]
    # Joining an active store: a seller at once.
    staff = await make_user()
    await join_store(client, owner.headers, staff)
    assert sorted(await roles_of(client, staff.headers)) == ["customer", "seller"]


async def test_a_phone_number_is_invited_by_sms_and_accepted_by_its_verified_owner(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, stores: Stores
) -> None:
    owner = await make_user()
    await stores.apply(owner)
    phone = "+254712345678"
    invitee = await make_user(phone=phone, email_verified=False)
    invited = await _invite(client, owner.headers, "+254 712 345 678")
    assert invited.status_code == 201, invited.text
    assert (invited.json()["address"], invited.json()["address_kind"]) == (phone, "phone")
    [sms] = await _delivered(runtime, "sms", phone)
    assert "sign in to Soko with this phone number" in sms["body"]
    assert [item["id"] for item in await _mine(client, invitee)] == [invited.json()["id"]]
    assert (await _accept(client, invitee, invited.json()["id"])).status_code == 201


async def test_inviting_tells_nothing_about_who_has_an_account(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, stores: Stores
) -> None:
    owner, existing = await make_user(), await make_user()
    await stores.apply(owner)
    answers = [
        await _invite(client, owner.headers, address)
        for address in (existing.email, "nobody-here@example.com")
    ]
    assert [answer.status_code for answer in answers] == [201, 201]
    shapes = [
        {key: value for key, value in answer.json().items() if key not in {"id", "address"}}
        for answer in answers
    ]
    assert shapes[0] == shapes[1]
    # The address without an account gets its message too: it may sign up, verify it and
    # accept.
    assert len(await _delivered(runtime, "email", "nobody-here@example.com")) == 1
    newcomer = await make_user(email="nobody-here@example.com")
    assert [item["id"] for item in await _mine(client, newcomer)] == [answers[1].json()["id"]]
    assert (await _accept(client, newcomer, answers[1].json()["id"])).status_code == 201


async def test_only_an_account_that_verified_the_address_may_see_or_answer_it(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, stores: Stores
) -> None:
    owner, outsider = await make_user(), await make_user()
    await stores.apply(owner)
    unverified = await make_user(email_verified=False)
    invitation = (await _invite(client, owner.headers, unverified.email)).json()
    for user in (unverified, outsider, owner):
        assert await _mine(client, user) == []
        for response in (
            await _accept(client, user, invitation["id"]),
            await _decline(client, user, invitation["id"]),
        ):
            assert response.status_code == 404, response.text
    # An id that does not exist answers exactly the same.
    missing = await _accept(client, outsider, uuid.uuid4())
    assert (missing.status_code, problem_type(missing)) == (404, "not-found")
    still = (await _store_invitations(client, owner.headers))[invitation["id"]]
    assert still["status"] == "pending"


async def test_an_invitation_is_answered_once_and_not_after_it_expires(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, stores: Stores
) -> None:
    owner, first, second, third, late = [await make_user() for _ in range(5)]
    await stores.apply(owner)
    accepted = (await _invite(client, owner.headers, first.email)).json()["id"]
    declined = (await _invite(client, owner.headers, second.email)).json()["id"]
    revoked = (await _invite(client, owner.headers, third.email)).json()["id"]
    expired = (await _invite(client, owner.headers, late.email)).json()["id"]

    assert (await _accept(client, first, accepted)).status_code == 201
    assert (await _decline(client, second, declined)).status_code == 204
    removed = await client.delete(f"{INVITATIONS}/{revoked}", headers=owner.headers)
    assert removed.status_code == 204
    await _age(runtime, dt.timedelta(days=7, seconds=1))
    assert await _mine(client, late) == []

    for user, invitation_id, status in (
        (first, accepted, "accepted"),
        (second, declined, "declined"),
        (third, revoked, "revoked"),
        (late, expired, "expired"),
    ):
        for response in (
            await _accept(client, user, invitation_id),
            await _decline(client, user, invitation_id),
            await client.delete(f"{INVITATIONS}/{invitation_id}", headers=owner.headers),
        ):
            assert response.status_code == 409, response.text
            assert problem_type(response) == "seller-invitation-state-conflict"
            assert response.json()["current_status"] == status
    statuses = {
        key: item["status"]
        for key, item in (await _store_invitations(client, owner.headers)).items()
    }
    assert statuses == {
        accepted: "accepted",
        declined: "declined",
        revoked: "revoked",
        expired: "expired",
    }
    members = (await client.get(MEMBERS, headers=owner.headers)).json()["items"]
    assert {item["user_id"] for item in members} == {str(owner.user_id), str(first.user_id)}


async def test_inviting_again_replaces_the_open_invitation(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner, invitee = await make_user(), await make_user()
    await stores.apply(owner)
    old = (await _invite(client, owner.headers, invitee.email, "staff")).json()["id"]
    new = (await _invite(client, owner.headers, invitee.email, "manager")).json()["id"]
    listed = await _store_invitations(client, owner.headers)
    assert (listed[old]["status"], listed[new]["status"]) == ("revoked", "pending")
    assert [item["id"] for item in await _mine(client, invitee)] == [new]
    assert problem_type(await _accept(client, invitee, old)) == "seller-invitation-state-conflict"
    assert (await _accept(client, invitee, new)).json()["role"] == "manager"


async def test_a_member_accepting_again_is_refused_and_the_invitation_stays_open(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner, member = await make_user(), await make_user()
    store = await stores.apply(owner)
    await join_store(client, owner.headers, member)
    again = (await _invite(client, owner.headers, member.email, "owner")).json()["id"]
    refused = await _accept(client, member, again)
    assert (refused.status_code, problem_type(refused)) == (409, "seller-member-exists")
    assert (await _store_invitations(client, owner.headers))[again]["status"] == "pending"
    mine = (await client.get("/api/v1/me/sellers", headers=member.headers)).json()["items"]
    assert [(item["id"], item["role"]) for item in mine] == [(store["id"], "staff")]
    # The owner's own address: the same.
    own = (await _invite(client, owner.headers, owner.email)).json()["id"]
    assert problem_type(await _accept(client, owner, own)) == "seller-member-exists"


async def test_an_address_that_is_neither_email_nor_phone_is_refused(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner = await make_user()
    await stores.apply(owner)
    for address in ("not an address", "0712345678", "juma@", "<svg>@x.co"):
        response = await _invite(client, owner.headers, address)
        assert response.status_code == 422, (address, response.text)
        assert response.json()["errors"][0]["field"] == "address"
    unknown = await client.post(
        INVITATIONS, json={"address": "a@example.com", "role": "boss"}, headers=owner.headers
    )
    assert unknown.status_code == 422
    assert await _store_invitations(client, owner.headers) == {}


async def test_only_owners_invite_list_and_revoke_and_only_their_stores(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner, manager, other_owner = await make_user(), await make_user(), await make_user()
    await stores.apply(owner)
    theirs = await stores.apply(other_owner)
    await join_store(client, owner.headers, manager, "manager")
    theirs_invitation = (await _invite(client, other_owner.headers, "x@example.com")).json()["id"]
    for response in (
        await _invite(client, manager.headers, "y@example.com"),
        await client.get(INVITATIONS, headers=manager.headers),
        await client.delete(f"{INVITATIONS}/{uuid.uuid4()}", headers=manager.headers),
    ):
        assert response.status_code == 403, response.text
        assert problem_type(response) == "seller-role-required"
    # Another store's invitation, through my store: no such invitation.
    gone = await client.delete(f"{INVITATIONS}/{theirs_invitation}", headers=owner.headers)
    assert gone.status_code == 404
    named = await _invite(client, as_store(owner, theirs["id"]), "z@example.com")
    assert problem_type(named) == "not-a-seller"
    assert (await _store_invitations(client, other_owner.headers))[theirs_invitation][
        "status"
    ] == "pending"


async def test_a_suspended_store_neither_invites_nor_is_joined(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner, invitee = await make_user(), await make_user()
    store = await stores.active(owner)
    invitation = (await _invite(client, owner.headers, invitee.email)).json()["id"]
    assert (await stores.decide(store["id"], "suspend", "Counterfeits")).status_code == 200
    refused = await _invite(client, owner.headers, "new@example.com")
    assert (refused.status_code, problem_type(refused)) == (403, "seller-not-active")
    assert await _mine(client, invitee) == []
    late = await _accept(client, invitee, invitation)
    assert (late.status_code, problem_type(late)) == (403, "seller-not-active")
    assert late.json()["seller_status"] == "suspended"


async def test_the_daily_limits_per_inviter_and_per_address(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, stores: Stores
) -> None:
    owners = [await make_user() for _ in range(INVITATIONS_PER_ADDRESS_PER_DAY + 1)]
    for owner in owners:
        await stores.active(owner)
    target = "popular@example.com"
    for owner in owners[:-1]:
        assert (await _invite(client, owner.headers, target)).status_code == 201
    limited = await _invite(client, owners[-1].headers, target)
    assert (limited.status_code, problem_type(limited)) == (429, "seller-invitation-limit")
    assert 0 < int(limited.headers["Retry-After"]) <= 24 * 3600
    assert limited.json()["limit"] == INVITATIONS_PER_ADDRESS_PER_DAY

    busy = owners[-1]
    for n in range(INVITATIONS_PER_INVITER_PER_DAY):
        assert (await _invite(client, busy.headers, f"person-{n}@example.com")).status_code == 201
    over = await _invite(client, busy.headers, "one-more@example.com")
    assert (over.status_code, problem_type(over)) == (429, "seller-invitation-limit")
    assert over.json()["limit"] == INVITATIONS_PER_INVITER_PER_DAY

    await _age(runtime, dt.timedelta(hours=24, seconds=1))
    assert (await _invite(client, busy.headers, "one-more@example.com")).status_code == 201
    assert (await _invite(client, busy.headers, target)).status_code == 201


async def test_a_store_waiting_for_review_sends_a_few_invitations_until_approved(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner = await make_user()
    store = await stores.apply(owner)
    for n in range(5):
        assert (await _invite(client, owner.headers, f"team-{n}@example.com")).status_code == 201
    over = await _invite(client, owner.headers, "+254733000303")
    assert (over.status_code, problem_type(over)) == (429, "seller-invitation-limit")
    assert over.json()["limit"] == 5 and "retry-after" not in over.headers
    # Revoked ones count too: inviting again is no way around it.
    again = await _invite(client, owner.headers, "team-0@example.com")
    assert again.status_code == 429
    assert (await stores.decide(store["id"], "approve")).status_code == 200
    assert (await _invite(client, owner.headers, "+254733000303")).status_code == 201


async def test_invitations_sent_together_keep_the_limits_and_one_open_invitation(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner = await make_user()
    await stores.apply(owner)
    answers = await asyncio.gather(
        *(_invite(client, owner.headers, "rushed@example.com") for _ in range(10))
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [201] * INVITATIONS_PER_ADDRESS_PER_DAY + [429] * (
        10 - INVITATIONS_PER_ADDRESS_PER_DAY
    ), [answer.text for answer in answers if answer.status_code not in (201, 429)]
    listed = (await _store_invitations(client, owner.headers)).values()
    assert sorted(item["status"] for item in listed) == ["pending"] + ["revoked"] * (
        INVITATIONS_PER_ADDRESS_PER_DAY - 1
    )


async def test_the_address_is_stored_encrypted_and_audited_without_it(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, stores: Stores
) -> None:
    owner, invitee = await make_user(), await make_user()
    store = await stores.apply(owner)
    invitation = (await _invite(client, owner.headers, invitee.email, "manager")).json()["id"]
    assert (await _accept(client, invitee, invitation)).status_code == 201
    async with runtime.db.transaction(read_only=True) as session:
        raw = await session.scalar(text("SELECT address_ciphertext FROM seller_invitations"))
        events = (
            await session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action.in_(["seller.member_invited", "seller.member_joined"]))
                .order_by(AuditEvent.seq)
            )
        ).all()
    assert raw is not None and raw.startswith("v1.")
    assert invitee.email not in raw and invitee.email.split("@")[0] not in raw
    assert [(event.action, event.actor_id, event.target_id) for event in events] == [
        ("seller.member_invited", owner.user_id, store["id"]),
        ("seller.member_joined", invitee.user_id, store["id"]),
    ]
    assert invitee.email not in str([event.data for event in events])
    assert events[0].data["role"] == "manager"
