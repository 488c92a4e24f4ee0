"""Which store a seller route acts for, the store's profile, and what other domains
read through soko.sellers.public."""

from __future__ import annotations

import uuid

import httpx2
import pytest
from fastapi import APIRouter, FastAPI
from sqlalchemy import select

from soko.platform.auth import SIGNED_IN
from soko.platform.runtime import Runtime
from soko.sellers import public
from soko.sellers.errors import SellerNotActive, SellerRoleRequired
from soko.sellers.models import Seller
from soko.sellers.public import ActingSeller, ActingSellerDep, SellerRole
from tests.identity.conftest import MakeUser
from tests.identity.test_route_matrix import walk_routes
from tests.sellers.conftest import (
    INVITATIONS,
    MEMBERS,
    PROFILE,
    Stores,
    as_store,
    join_store,
    problem_type,
)


@pytest.fixture
def probe(app: FastAPI) -> str:
    """A route of another domain's kind that only takes the acting seller."""
    router = APIRouter()

    @router.get("/seller/acting-probe")
    async def acting_probe(acting: ActingSellerDep) -> dict[str, str]:
        return {"seller_id": str(acting.seller_id), "role": acting.role, "status": acting.status}

    app.include_router(router, prefix="/api/v1")
    return "/api/v1/seller/acting-probe"


async def test_the_dependency_declares_signed_in_and_nothing_else(
    app: FastAPI, client: httpx2.AsyncClient, probe: str
) -> None:
    endpoints, problems = walk_routes(app)
    assert problems == []
    declared = {endpoint.path: endpoint.permission for endpoint in endpoints}
    assert declared[probe] == SIGNED_IN
    for path in (PROFILE, MEMBERS, f"{MEMBERS}/{{user_id}}", INVITATIONS):
        assert declared[path] == SIGNED_IN
    anonymous = await client.get(probe)
    assert anonymous.status_code == 401


async def test_the_callers_only_store_is_chosen_without_a_header(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores, probe: str
) -> None:
    nobody = await make_user()
    refused = await client.get(probe, headers=nobody.headers)
    assert refused.status_code == 403
    assert problem_type(refused) == "not-a-seller"

    owner = await make_user()
    store = await stores.apply(owner)
    acting = await client.get(probe, headers=owner.headers)
    assert acting.json() == {"seller_id": store["id"], "role": "owner", "status": "pending"}


async def test_a_member_of_several_stores_names_one(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores, probe: str
) -> None:
    owner = await make_user()
    first = await stores.active(owner)
    second = await stores.apply(owner)
    needed = await client.get(probe, headers=owner.headers)
    assert needed.status_code == 400
    assert problem_type(needed) == "seller-choice-needed"
    assert sorted(needed.json()["seller_ids"]) == sorted([first["id"], second["id"]])

    for store, status in ((first, "active"), (second, "pending")):
        chosen = await client.get(probe, headers=as_store(owner, store["id"]))
        assert chosen.json() == {"seller_id": store["id"], "role": "owner", "status": status}

    # A store they do not belong to, one that does not exist, and a malformed id.
    other = await stores.apply(await make_user())
    for seller_id in (other["id"], str(uuid.uuid4())):
        response = await client.get(probe, headers=as_store(owner, seller_id))
        assert response.status_code == 403
        assert problem_type(response) == "not-a-seller"
    malformed = await client.get(probe, headers=as_store(owner, "store-one"))
    assert malformed.status_code == 422
    assert malformed.json()["errors"][0]["in"] == "header"


async def test_a_rejected_application_does_not_count_among_several(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores, probe: str
) -> None:
    owner = await make_user()
    rejected = await stores.apply(owner)
    assert (await stores.decide(rejected["id"], "reject")).status_code == 200
    alone = await client.get(probe, headers=owner.headers)
    assert alone.json()["seller_id"] == rejected["id"]  # only store: still reachable

    current = await stores.apply(owner)
    implicit = await client.get(probe, headers=owner.headers)
    assert implicit.json()["seller_id"] == current["id"]
    named = await client.get(probe, headers=as_store(owner, rejected["id"]))
    assert named.json() == {"seller_id": rejected["id"], "role": "owner", "status": "rejected"}


async def test_managers_edit_the_profile_and_staff_read_it(
    client: httpx2.AsyncClient, make_user: MakeUser, stores: Stores
) -> None:
    owner, manager, staff = await make_user(), await make_user(), await make_user()
    await stores.apply(owner)
    for user, role in ((manager, "manager"), (staff, "staff")):
        await join_store(client, owner.headers, user, role)
    read = await client.get(PROFILE, headers=staff.headers)
    assert read.status_code == 200
    assert read.headers["etag"] == '"v1"'
    assert (
        await client.get(PROFILE, headers={**staff.headers, "If-None-Match": '"v1"'})
    ).status_code == 304

    refused = await client.patch(PROFILE, json={"store_name": "Staff's"}, headers=staff.headers)
    assert refused.status_code == 403
    assert problem_type(refused) == "seller-role-required"
    assert refused.json()["required_role"] == "manager"

    changed = await client.patch(
        PROFILE,
        json={"store_name": "Duka Jipya", "contact_phone": "+255 754 123 456"},
        headers={**manager.headers, "If-Match": '"v1"'},
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["store_name"] == "Duka Jipya"
    assert changed.json()["contact_phone"] == "+255754123456"
    assert changed.headers["etag"] == '"v2"'

    stale = await client.patch(
        PROFILE, json={"description": "late"}, headers={**owner.headers, "If-Match": '"v1"'}
    )
    assert stale.status_code == 412
    payout = await client.patch(
        PROFILE, json={"payout_details": {"method": "mpesa"}}, headers=manager.headers
    )
    assert payout.status_code == 403
    assert payout.json()["required_role"] == "owner"
    by_owner = await client.patch(
        PROFILE, json={"payout_details": {"method": "mpesa", "till": "42"}}, headers=owner.headers
    )
    assert by_owner.json()["payout_details"] == {"method": "mpesa", "till": "42"}
    cleared = await client.patch(PROFILE, json={"payout_details": None}, headers=owner.headers)
    assert cleared.json()["has_payout_details"] is False
    null_name = await client.patch(PROFILE, json={"store_name": None}, headers=owner.headers)
    assert null_name.status_code == 422
    slug = await client.patch(PROFILE, json={"slug": "new-address"}, headers=owner.headers)
    assert slug.status_code == 422


async def test_what_other_domains_read(
    make_user: MakeUser, stores: Stores, runtime: Runtime
) -> None:
    owner, manager = await make_user(), await make_user()
    active = await stores.active(owner)
    pending = await stores.apply(owner)
    suspended = await stores.active(owner)
    assert (await stores.decide(suspended["id"], "suspend")).status_code == 200
    await join_store(stores.client, as_store(owner, active["id"]), manager, "manager")
    ids = {
        name: uuid.UUID(store["id"])
        for name, store in (("active", active), ("pending", pending), ("suspended", suspended))
    }
    unknown = uuid.uuid4()

    async with runtime.db.transaction(read_only=True) as session:
        cards = await public.seller_cards(session, [*ids.values(), unknown])
        assert {card.status for card in cards.values()} == {"active", "pending", "suspended"}
        assert cards[ids["active"]].slug == active["slug"]
        assert cards[ids["active"]].active and not cards[ids["pending"]].active
        assert await public.seller_cards(session, []) == {}

        inactive = await public.inactive_seller_ids(session, [*ids.values(), unknown])
        assert inactive == {ids["pending"], ids["suspended"], unknown}
        assert await public.inactive_seller_ids(session, []) == set()

        embedded = await session.scalars(
            select(Seller.slug).where(Seller.id.in_(public.active_seller_ids()))
        )
        assert list(embedded) == [active["slug"]]

        assert (
            await public.member_role(session, ids["active"], manager.user_id) is SellerRole.manager
        )
        assert await public.member_role(session, ids["pending"], manager.user_id) is None
        assert await public.member_user_ids(session, ids["active"]) == [
            owner.user_id,
            manager.user_id,
        ]
    assert public.seller_tag(ids["active"]) != public.SELLERS_TAG


def test_roles_rank_and_the_active_check() -> None:
    seller_id, user_id = uuid.uuid4(), uuid.uuid4()
    staff = ActingSeller(seller_id, user_id, SellerRole.staff, "active")
    owner = ActingSeller(seller_id, user_id, SellerRole.owner, "suspended")
    assert staff.at_least(SellerRole.staff) and not staff.at_least(SellerRole.manager)
    assert owner.at_least(SellerRole.manager) and owner.at_least(SellerRole.owner)
    public.require_active(staff)
    with pytest.raises(SellerNotActive) as caught:
        public.require_active(owner)
    assert caught.value.extensions == {"seller_status": "suspended"}
    public.require_role(owner, SellerRole.owner)
    with pytest.raises(SellerRoleRequired) as role:
        public.require_role(staff, SellerRole.manager)
    assert role.value.extensions == {"required_role": "manager", "your_role": "staff"}
