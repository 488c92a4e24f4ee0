"""The stock history lists changes in the order they were made, also when many arrive at
once: each row is timed once the level is locked, not when its request started."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import random

import httpx2
import pytest

from soko.platform.clock import ManualClock
from tests.inventory.conftest import Team
from tests.inventory.test_routes import add_location, stock_url

HISTORY = "/api/v1/seller/stock/adjustments"


class TickingClock(ManualClock):
    """A clock a millisecond later at every reading, as a real one is between requests."""

    def now(self) -> dt.datetime:
        return self.advance(dt.timedelta(milliseconds=1))


@pytest.fixture
def clock() -> ManualClock:
    return TickingClock()


async def test_concurrent_changes_are_listed_in_the_order_they_were_made(
    client: httpx2.AsyncClient, team: Team
) -> None:
    location_id = await add_location(client, team)
    headers = team.headers(team.manager)
    url = stock_url(team, location_id)
    put = await client.put(url, json={"on_hand": 500, "reason": "count"}, headers=headers)
    assert put.status_code == 200, put.text
    deltas = [random.choice((-3, -1, 1, 2, 5)) for _ in range(20)]
    answers = await asyncio.gather(
        *(
            client.post(
                f"{url}/adjustments", json={"delta": delta, "reason": "busy day"}, headers=headers
            )
            for delta in deltas
        )
    )
    assert [answer.status_code for answer in answers] == [201] * 20
    history = await client.get(
        HISTORY,
        params={"variant_id": str(team.variant_id), "location_id": location_id, "limit": 50},
        headers=headers,
    )
    rows = history.json()["items"]
    assert len(rows) == 21
    # Newest first: each row's level, less its change, is the level the next row left.
    for newer, older in itertools.pairwise(rows):
        assert newer["on_hand_after"] - newer["delta"] == older["on_hand_after"], rows
    assert rows[0]["on_hand_after"] == 500 + sum(deltas)
