from __future__ import annotations

from typing import Any

import httpx2
import pytest
from fastapi import APIRouter, Request, Response

from soko.platform.etag import (
    EntityTag,
    etag_for_content,
    etag_for_version,
    if_match_passes,
    if_none_match_passes,
    not_modified,
    parse_etag_list,
    require_match,
    strong_match,
    tag_response,
    weak_match,
)

# -- tags and comparison ------------------------------------------------------------------


def test_version_tags_are_strong_and_distinct() -> None:
    assert etag_for_version(7) == '"v7"'
    assert etag_for_version(7) != etag_for_version(8)
    assert not EntityTag.parse(etag_for_version(7)).weak  # type: ignore[union-attr]
    for bad in ("", 'a"b', "a b"):
        with pytest.raises(ValueError):
            etag_for_version(bad)


def test_content_tags_are_stable_and_canonical() -> None:
    assert etag_for_content({"a": 1, "b": [1, 2]}) == etag_for_content({"b": [1, 2], "a": 1})
    assert etag_for_content({"a": 1}) != etag_for_content({"a": 2})
    assert etag_for_content(b"hello") == etag_for_content("hello")
    tag = EntityTag.parse(etag_for_content(b"x"))
    assert tag is not None and not tag.weak and len(tag.opaque) == 32


def test_parse_list() -> None:
    assert parse_etag_list("*") == "*"
    assert parse_etag_list(' "a" , W/"b",  "c"') == [
        EntityTag("a"),
        EntityTag("b", weak=True),
        EntityTag("c"),
    ]
    # malformed members are skipped, they can match nothing
    assert parse_etag_list('garbage, "ok", W/ "spaced"') == [EntityTag("ok")]
    assert parse_etag_list("") == []
    assert EntityTag.parse('"a",') is None
    assert str(EntityTag("x", weak=True)) == 'W/"x"'


@pytest.mark.parametrize(
    ("a", "b", "strong", "weak"),
    [  # RFC 9110 13.1 examples
        ('W/"1"', 'W/"1"', False, True),
        ('W/"1"', 'W/"2"', False, False),
        ('W/"1"', '"1"', False, True),
        ('"1"', '"1"', True, True),
    ],
)
def test_rfc_9110_comparison_table(a: str, b: str, strong: bool, weak: bool) -> None:
    tag_a, tag_b = EntityTag.parse(a), EntityTag.parse(b)
    assert tag_a is not None and tag_b is not None
    assert strong_match(tag_a, tag_b) is strong
    assert weak_match(tag_a, tag_b) is weak


def test_if_match_uses_strong_comparison() -> None:
    assert if_match_passes(None, '"v1"')
    assert if_match_passes('"v1"', '"v1"')
    assert if_match_passes('"v0", "v1"', '"v1"')
    assert not if_match_passes('"v0"', '"v1"')
    assert not if_match_passes('W/"v1"', '"v1"')
    assert if_match_passes("*", '"v1"')
    assert not if_match_passes("*", None)
    assert not if_match_passes('"v1"', None)
    assert not if_match_passes("nonsense", '"v1"')


def test_if_none_match_uses_weak_comparison() -> None:
    assert if_none_match_passes(None, '"v1"')
    assert not if_none_match_passes('"v1"', '"v1"')
    assert not if_none_match_passes('W/"v1"', '"v1"')
    assert if_none_match_passes('"v0"', '"v1"')
    assert not if_none_match_passes("*", '"v1"')
    assert if_none_match_passes("*", None)
    assert if_none_match_passes('"v1"', None)


# -- over HTTP ------------------------------------------------------------------------------


class Shelf:
    """One product-like record with a version counter, for the test routes."""

    def __init__(self) -> None:
        self.exists = True
        self.version = 1
        self.name = "Maize flour 2kg"


@pytest.fixture
def shelf() -> Shelf:
    return Shelf()


@pytest.fixture
async def shelf_client(app: Any, shelf: Shelf) -> Any:
    router = APIRouter()

    @router.get("/test-etag/item")
    async def read(request: Request, response: Response) -> Any:
        tag = etag_for_version(shelf.version)
        if (unchanged := not_modified(request, tag)) is not None:
            return unchanged
        tag_response(response, tag)
        return {"name": shelf.name, "version": shelf.version}

    @router.put("/test-etag/item")
    async def replace(request: Request, response: Response, body: dict[str, str]) -> Any:
        current = etag_for_version(shelf.version) if shelf.exists else None
        require_match(request, current, required=request.query_params.get("strict") == "1")
        shelf.name = body["name"]
        shelf.version += 1
        shelf.exists = True
        tag_response(response, etag_for_version(shelf.version))
        return {"name": shelf.name, "version": shelf.version}

    app.include_router(router)
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def test_get_answers_304_when_the_tag_matches(shelf_client: httpx2.AsyncClient) -> None:
    first = await shelf_client.get("/test-etag/item")
    assert first.status_code == 200
    tag = first.headers["etag"]
    assert tag == '"v1"'
    assert first.headers["cache-control"] == "private, no-cache"

    again = await shelf_client.get("/test-etag/item", headers={"If-None-Match": tag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == tag
    assert "x-request-id" in again.headers

    weak = await shelf_client.get("/test-etag/item", headers={"If-None-Match": f"W/{tag}"})
    assert weak.status_code == 304

    star = await shelf_client.get("/test-etag/item", headers={"If-None-Match": "*"})
    assert star.status_code == 304

    other = await shelf_client.get("/test-etag/item", headers={"If-None-Match": '"v0", "v9"'})
    assert other.status_code == 200
    assert other.json()["name"] == "Maize flour 2kg"


async def test_if_match_on_write(shelf_client: httpx2.AsyncClient, shelf: Shelf) -> None:
    tag = (await shelf_client.get("/test-etag/item")).headers["etag"]

    ok = await shelf_client.put(
        "/test-etag/item", json={"name": "Maize flour 1kg"}, headers={"If-Match": tag}
    )
    assert ok.status_code == 200
    assert ok.headers["etag"] == '"v2"'

    # the same (now stale) tag again: someone else's write won
    stale = await shelf_client.put(
        "/test-etag/item", json={"name": "Lost update"}, headers={"If-Match": tag}
    )
    assert stale.status_code == 412
    assert stale.headers["content-type"] == "application/problem+json"
    problem = stale.json()
    assert problem["type"] == "/problems/precondition-failed"
    assert problem["current_etag"] == '"v2"'
    assert shelf.name == "Maize flour 1kg"

    # a weak tag never passes If-Match
    weak = await shelf_client.put(
        "/test-etag/item", json={"name": "Weak"}, headers={"If-Match": 'W/"v2"'}
    )
    assert weak.status_code == 412

    star = await shelf_client.put(
        "/test-etag/item", json={"name": "Any"}, headers={"If-Match": "*"}
    )
    assert star.status_code == 200


async def test_if_match_star_fails_when_nothing_exists(
    shelf_client: httpx2.AsyncClient, shelf: Shelf
) -> None:
    shelf.exists = False
    refused = await shelf_client.put(
        "/test-etag/item", json={"name": "Ghost"}, headers={"If-Match": "*"}
    )
    assert refused.status_code == 412
    created = await shelf_client.put(
        "/test-etag/item", json={"name": "New"}, headers={"If-None-Match": "*"}
    )
    assert created.status_code == 200
    # If-None-Match: * on a write means "create only": it now exists
    again = await shelf_client.put(
        "/test-etag/item", json={"name": "Twice"}, headers={"If-None-Match": "*"}
    )
    assert again.status_code == 412
    assert shelf.name == "New"


async def test_precondition_required_when_the_route_demands_it(
    shelf_client: httpx2.AsyncClient, shelf: Shelf
) -> None:
    missing = await shelf_client.put("/test-etag/item?strict=1", json={"name": "Blind"})
    assert missing.status_code == 428
    assert missing.json()["type"] == "/problems/precondition-required"
    assert shelf.version == 1

    relaxed = await shelf_client.put("/test-etag/item", json={"name": "Blind"})
    assert relaxed.status_code == 200

    good = await shelf_client.put(
        "/test-etag/item?strict=1", json={"name": "Seen"}, headers={"If-Match": '"v2"'}
    )
    assert good.status_code == 200
    assert shelf.version == 3
