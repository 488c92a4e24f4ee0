"""The seller routes over HTTP: locations, stock, adjustments and their history, who may
do what, and another store's things answering 404."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import httpx2
import pytest

from soko.inventory import public
from soko.platform.clock import ManualClock
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser
from tests.inventory.conftest import Team, make_team
from tests.sellers.conftest import Stores, problem_type

LOCATIONS = "/api/v1/seller/locations"
STOCK = "/api/v1/seller/stock"
HISTORY = "/api/v1/seller/stock/adjustments"


async def add_location(client: httpx2.AsyncClient, team: Team, name: str = "Main") -> str:
    response = await client.post(
        LOCATIONS,
        json={"name": name, "kind": "shop", "address": "Moi Avenue, Nairobi"},
        headers=team.headers(team.manager),
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def stock_url(team: Team, location_id: str, variant_id: Any = None) -> str:
    return f"{STOCK}/{variant_id or team.variant_id}/{location_id}"


async def test_locations_are_created_listed_and_changed(
    client: httpx2.AsyncClient, team: Team
) -> None:
    headers = team.headers(team.manager)
    location_id = await add_location(client, team)
    await add_location(client, team, "Back store")
    taken = await client.post(LOCATIONS, json={"name": "Main"}, headers=headers)
    assert taken.status_code == 409 and problem_type(taken) == "location-name-taken"

    listed = await client.get(LOCATIONS, params={"limit": 1}, headers=team.headers(team.staff))
    assert listed.status_code == 200
    first = listed.json()
    assert [item["name"] for item in first["items"]] == ["Main"]
    rest = await client.get(
        LOCATIONS, params={"limit": 1, "cursor": first["next_cursor"]}, headers=headers
    )
    assert [item["name"] for item in rest.json()["items"]] == ["Back store"]

    one = await client.get(f"{LOCATIONS}/{location_id}", headers=headers)
    etag = one.headers["etag"]
    assert one.json()["kind"] == "shop" and one.json()["active"] is True
    again = await client.get(
        f"{LOCATIONS}/{location_id}", headers={**headers, "If-None-Match": etag}
    )
    assert again.status_code == 304

    changed = await client.patch(
        f"{LOCATIONS}/{location_id}",
        json={"name": "Flagship", "active": False},
        headers={**headers, "If-Match": etag},
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["name"] == "Flagship" and changed.json()["active"] is False
    assert changed.json()["version"] == 2
    stale = await client.patch(
        f"{LOCATIONS}/{location_id}", json={"address": "x"}, headers={**headers, "If-Match": etag}
    )
    assert stale.status_code == 412
    clash = await client.patch(
        f"{LOCATIONS}/{location_id}", json={"name": "Back store"}, headers=headers
    )
    assert clash.status_code == 409 and problem_type(clash) == "location-name-taken"
    for field in ("name", "kind", "active"):
        null = await client.patch(f"{LOCATIONS}/{location_id}", json={field: None}, headers=headers)
        assert null.status_code == 422, field
    # The description says so: those fields may be left out, never null.
    document = (await client.get("/api/v1/openapi.json")).json()
    fields = document["components"]["schemas"]["LocationChange"]["properties"]
    for field in ("name", "kind", "active"):
        assert "null" not in str(fields[field]), fields[field]
        assert "default" not in fields[field]
    assert {"type": "null"} in fields["address"]["anyOf"]  # null clears the address
    cleared = await client.patch(
        f"{LOCATIONS}/{location_id}", json={"address": None}, headers=headers
    )
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["address"] == ""


async def test_stock_is_set_adjusted_and_its_history_says_who_why_and_how_much(
    client: httpx2.AsyncClient, team: Team
) -> None:
    location_id = await add_location(client, team)
    manager = team.headers(team.manager)
    owner = team.headers(team.owner)

    # Taking units from a level that does not exist yet says so.
    never = await client.post(
        f"{stock_url(team, location_id)}/adjustments",
        json={"delta": -2, "reason": "count"},
        headers=manager,
    )
    assert never.status_code == 409 and problem_type(never) == "stock-below-committed"
    assert "no stock at this location yet" in never.json()["detail"]
    assert (never.json()["on_hand"], never.json()["committed"]) == (0, 0)

    set_ = await client.put(
        stock_url(team, location_id),
        json={"on_hand": 12, "reason": "opening count"},
        headers=manager,
    )
    assert set_.status_code == 200, set_.text
    level = set_.json()
    assert (level["on_hand"], level["reserved"], level["allocated"], level["available"]) == (
        12,
        0,
        0,
        12,
    )
    assert level["sku"] == "TEE-M" and level["location_name"] == "Main"

    added = await client.post(
        f"{stock_url(team, location_id)}/adjustments",
        json={"delta": 5, "reason": "delivery from supplier"},
        headers=owner,
    )
    assert added.status_code == 201, added.text
    assert added.json()["stock"]["on_hand"] == 17
    adjustment = added.json()["adjustment"]
    assert (adjustment["delta"], adjustment["kind"], adjustment["on_hand_after"]) == (
        5,
        "adjust",
        17,
    )
    assert adjustment["actor_id"] == str(team.owner.user_id)
    assert adjustment["actor_name"] == "Test user"

    damaged = await client.post(
        f"{stock_url(team, location_id)}/adjustments",
        json={"delta": -2, "reason": "two shirts torn", "kind": "correction"},
        headers=manager,
    )
    assert damaged.status_code == 201
    assert damaged.json()["stock"]["available"] == 15

    history = await client.get(
        HISTORY, params={"variant_id": str(team.variant_id)}, headers=team.headers(team.staff)
    )
    assert history.status_code == 200
    rows = [
        (item["delta"], item["kind"], item["reason"], item["actor_id"], item["on_hand_after"])
        for item in history.json()["items"]
    ]
    assert rows == [
        (-2, "correction", "two shirts torn", str(team.manager.user_id), 15),
        (5, "adjust", "delivery from supplier", str(team.owner.user_id), 17),
        (12, "set", "opening count", str(team.manager.user_id), 12),
    ]
    page = await client.get(HISTORY, params={"limit": 2, "fields": "delta"}, headers=manager)
    assert [item for item in page.json()["items"]] == [
        {"id": history.json()["items"][0]["id"], "delta": -2},
        {"id": history.json()["items"][1]["id"], "delta": 5},
    ]
    last = await client.get(
        HISTORY, params={"limit": 2, "cursor": page.json()["next_cursor"]}, headers=manager
    )
    assert [item["delta"] for item in last.json()["items"]] == [12]
    assert last.json()["next_cursor"] is None

    levels = await client.get(STOCK, params={"location_id": location_id}, headers=manager)
    assert [(item["variant_id"], item["on_hand"]) for item in levels.json()["items"]] == [
        (str(team.variant_id), 15)
    ]
    other_variant = await client.get(STOCK, params={"variant_id": str(uuid7())}, headers=manager)
    assert other_variant.json()["items"] == []

    # A second location: the list pages through both levels, one at a time.
    second = await add_location(client, team, "Back store")
    await client.put(stock_url(team, second), json={"on_hand": 4}, headers=manager)
    seen = []
    cursor = None
    while True:
        params = {"limit": 1, "fields": "on_hand", **({"cursor": cursor} if cursor else {})}
        page = await client.get(STOCK, params=params, headers=manager)
        assert page.status_code == 200, page.text
        seen += [
            (item["location_id"], item["on_hand"], sorted(item)) for item in page.json()["items"]
        ]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    fields = ["location_id", "on_hand", "variant_id"]
    assert sorted(seen) == sorted([(location_id, 15, fields), (second, 4, fields)])


async def test_stock_cannot_go_below_what_buyers_hold(
    client: httpx2.AsyncClient, team: Team, runtime: Runtime, clock: ManualClock
) -> None:
    location_id = await add_location(client, team)
    headers = team.headers(team.manager)
    await client.put(stock_url(team, location_id), json={"on_hand": 5}, headers=headers)
    async with runtime.db.transaction() as session:
        await public.reserve(
            session,
            runtime,
            holder_ref=uuid7(),
            lines=[public.ReservationRequest(team.variant_id, 4)],
            expires_at=clock.now() + dt.timedelta(minutes=15),
        )
    levels = await client.get(STOCK, headers=headers)
    (level,) = levels.json()["items"]
    assert (level["on_hand"], level["reserved"], level["available"]) == (5, 4, 1)

    too_low = await client.put(
        stock_url(team, location_id), json={"on_hand": 3, "reason": "recount"}, headers=headers
    )
    assert too_low.status_code == 409 and problem_type(too_low) == "stock-below-committed"
    assert (too_low.json()["on_hand"], too_low.json()["committed"]) == (5, 4)
    minus = await client.post(
        f"{stock_url(team, location_id)}/adjustments",
        json={"delta": -2, "reason": "lost"},
        headers=headers,
    )
    assert minus.status_code == 409 and problem_type(minus) == "stock-below-committed"
    fine = await client.post(
        f"{stock_url(team, location_id)}/adjustments",
        json={"delta": -1, "reason": "lost"},
        headers=headers,
    )
    assert fine.status_code == 201 and fine.json()["stock"]["available"] == 0
    nothing = await client.post(
        f"{stock_url(team, location_id, uuid7())}/adjustments",
        json={"delta": -1, "reason": "x"},
        headers=headers,
    )
    assert nothing.status_code == 404  # not a registered variant of this store

    # Once the hold's time is over it no longer stands in the way.
    clock.advance(dt.timedelta(minutes=15))
    (level,) = (await client.get(STOCK, headers=headers)).json()["items"]
    assert (level["on_hand"], level["reserved"], level["available"]) == (4, 0, 4)
    emptied = await client.put(
        stock_url(team, location_id), json={"on_hand": 0, "reason": "closing"}, headers=headers
    )
    assert emptied.status_code == 200, emptied.text
    assert (emptied.json()["on_hand"], emptied.json()["reserved"]) == (0, 0)


async def test_a_new_level_starts_from_an_adjustment_but_never_below_zero(
    client: httpx2.AsyncClient, team: Team
) -> None:
    location_id = await add_location(client, team)
    headers = team.headers(team.manager)
    refused = await client.post(
        f"{stock_url(team, location_id)}/adjustments",
        json={"delta": -1, "reason": "?"},
        headers=headers,
    )
    assert refused.status_code == 409 and problem_type(refused) == "stock-below-committed"
    created = await client.post(
        f"{stock_url(team, location_id)}/adjustments",
        json={"delta": 3, "reason": "returned by a buyer", "kind": "return"},
        headers=headers,
    )
    assert created.status_code == 201
    assert created.json()["stock"]["on_hand"] == 3
    for body in (
        {"delta": 0, "reason": "x"},
        {"delta": 1, "reason": ""},
        {"delta": 1, "reason": "x", "kind": "sale"},
    ):
        invalid = await client.post(
            f"{stock_url(team, location_id)}/adjustments", json=body, headers=headers
        )
        assert invalid.status_code == 422, body
    negative = await client.put(stock_url(team, location_id), json={"on_hand": -1}, headers=headers)
    assert negative.status_code == 422


async def test_adjustments_never_take_a_level_above_what_one_holds(
    client: httpx2.AsyncClient, team: Team
) -> None:
    """Counts are capped at 1,000,000; adjustments of up to 1,000,000 each used to add
    past it, until PostgreSQL's integer overflowed into a 500."""
    location_id = await add_location(client, team)
    headers = team.headers(team.manager)
    url = stock_url(team, location_id)
    assert (
        await client.put(url, json={"on_hand": 999_999, "reason": "count"}, headers=headers)
    ).status_code == 200
    over = await client.post(
        f"{url}/adjustments", json={"delta": 2, "reason": "found two"}, headers=headers
    )
    assert over.status_code == 422, over.text
    assert over.json()["errors"][0]["field"] == "delta"
    fits = await client.post(
        f"{url}/adjustments", json={"delta": 1, "reason": "found one"}, headers=headers
    )
    assert fits.status_code == 201
    # The refused adjustment changed nothing: 999,999 + 1.
    assert fits.json()["stock"]["on_hand"] == 1_000_000


async def test_another_stores_variants_and_locations_answer_404(
    client: httpx2.AsyncClient, team: Team, stores: Stores, make_user: MakeUser, runtime: Runtime
) -> None:
    other = await make_team(client, stores, make_user, runtime)
    mine = await add_location(client, team)
    theirs = await add_location(client, other)
    headers = team.headers(team.manager)
    await client.put(
        stock_url(other, theirs), json={"on_hand": 5}, headers=other.headers(other.manager)
    )

    attempts = [
        client.put(stock_url(team, theirs), json={"on_hand": 1}, headers=headers),
        client.put(stock_url(other, mine), json={"on_hand": 1}, headers=headers),
        client.put(stock_url(other, theirs), json={"on_hand": 1}, headers=headers),
        client.post(
            f"{stock_url(other, theirs)}/adjustments",
            json={"delta": -1, "reason": "x"},
            headers=headers,
        ),
        client.get(f"{LOCATIONS}/{theirs}", headers=headers),
        client.patch(f"{LOCATIONS}/{theirs}", json={"name": "Mine now"}, headers=headers),
        client.patch(f"{LOCATIONS}/{uuid.uuid4()}", json={"name": "Nowhere"}, headers=headers),
    ]
    for attempt in attempts:
        response = await attempt
        assert response.status_code == 404, response.text
        assert problem_type(response) == "not-found"
    # Their stock and history do not show up in mine.
    assert (await client.get(STOCK, headers=headers)).json()["items"] == []
    assert (await client.get(HISTORY, headers=headers)).json()["items"] == []
    (level,) = (await client.get(STOCK, headers=other.headers(other.staff))).json()["items"]
    assert level["on_hand"] == 5


@pytest.mark.parametrize("role", ["staff", "manager", "owner"])
async def test_any_member_reads_and_managers_and_owners_write(
    client: httpx2.AsyncClient, team: Team, role: str
) -> None:
    location_id = await add_location(client, team)
    member = getattr(team, role)
    headers = team.headers(member)
    for path in (LOCATIONS, f"{LOCATIONS}/{location_id}", STOCK, HISTORY):
        response = await client.get(path, headers=headers)
        assert response.status_code == 200, (path, response.text)
    writes = [
        client.post(LOCATIONS, json={"name": f"New {role}"}, headers=headers),
        client.patch(
            f"{LOCATIONS}/{location_id}", json={"address": "Tom Mboya St"}, headers=headers
        ),
        client.put(stock_url(team, location_id), json={"on_hand": 2}, headers=headers),
        client.post(
            f"{stock_url(team, location_id)}/adjustments",
            json={"delta": 1, "reason": "x"},
            headers=headers,
        ),
    ]
    for write in writes:
        response = await write
        if role == "staff":
            assert response.status_code == 403 and problem_type(response) == "seller-role-required"
        else:
            assert response.status_code in (200, 201), response.text


async def test_strangers_and_anonymous_callers_are_refused(
    client: httpx2.AsyncClient, team: Team, make_user: MakeUser
) -> None:
    stranger = await make_user()
    for path in (LOCATIONS, STOCK, HISTORY):
        assert (await client.get(path)).status_code == 401
        mine = await client.get(path, headers=stranger.headers)
        assert mine.status_code == 403 and problem_type(mine) == "not-a-seller"
        named = await client.get(
            path, headers={**stranger.headers, "X-Seller-Id": str(team.seller_id)}
        )
        assert named.status_code == 403 and problem_type(named) == "not-a-seller"
