"""The category tree: administered by operators, read by everyone, moved with its
subtree, never into a loop, and deleted only when nothing uses it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest

from soko.catalog.categories import MAX_DEPTH, depth_of, path_ids
from soko.catalog.models import Category
from soko.identity.models import Role
from soko.platform.runtime import Runtime
from tests.catalog.support import (
    ADMIN_CATEGORIES,
    CATEGORIES,
    Catalog,
    ok,
    problem_type,
)
from tests.identity.conftest import MakeUser


def _names(nodes: list[dict[str, Any]]) -> list[Any]:
    return [(node["name"], _names(node["children"])) for node in nodes]


async def _paths(runtime: Runtime) -> dict[str, str]:
    from sqlalchemy import select

    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.execute(select(Category.name, Category.path))
        return {row.name: row.path for row in rows}


async def test_the_tree_nests_children_in_position_order(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    fashion = await catalog.category("Fashion", position=1)
    home = await catalog.category("Home", position=0)
    await catalog.category("Shoes", parent=fashion, position=2)
    dresses = await catalog.category("Dresses", parent=fashion, position=1)
    await catalog.category("Kitenge", parent=dresses)
    await catalog.category("Kitchen", parent=home)

    answer = await client.get(CATEGORIES)
    tree = ok(answer)["items"]
    assert _names(tree) == [
        ("Home", [("Kitchen", [])]),
        ("Fashion", [("Dresses", [("Kitenge", [])]), ("Shoes", [])]),
    ]
    assert answer.headers["etag"]
    assert dresses["parent_id"] == fashion["id"]
    assert dresses["ancestors"] == [fashion["id"]]


async def test_anyone_reads_the_tree_and_gets_304_while_it_is_unchanged(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    await catalog.category("Books")
    first = await client.get(CATEGORIES)
    etag = first.headers["etag"]
    again = await client.get(CATEGORIES, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["etag"] == etag
    await catalog.category("Music")
    changed = await client.get(CATEGORIES, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert [node["name"] for node in changed.json()["items"]] == ["Books", "Music"]


async def test_only_catalog_managers_change_the_tree(
    client: httpx2.AsyncClient, catalog: Catalog, make_user: MakeUser
) -> None:
    body = {"name": "Garden", "slug": "garden"}
    for role in (Role.customer, Role.seller, Role.support):
        user = await make_user(role)
        refused = await client.post(ADMIN_CATEGORIES, json=body, headers=user.headers)
        assert (refused.status_code, problem_type(refused)) == (403, "forbidden")
    operator = await make_user(Role.operator)
    made = ok(await client.post(ADMIN_CATEGORIES, json=body, headers=operator.headers), 201)
    assert made["slug"] == "garden" and made["parent_id"] is None
    anonymous = await client.delete(f"{ADMIN_CATEGORIES}/{made['id']}")
    assert anonymous.status_code == 401


async def test_slugs_are_unique_and_well_formed(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    admin = (await catalog.admin()).headers
    ok(await client.post(ADMIN_CATEGORIES, json={"name": "Toys", "slug": "toys"}, headers=admin))
    again = await client.post(
        ADMIN_CATEGORIES, json={"name": "More toys", "slug": "toys"}, headers=admin
    )
    assert (again.status_code, problem_type(again)) == (409, "category-slug-taken")
    bad = await client.post(
        ADMIN_CATEGORIES, json={"name": "Toys", "slug": "Toys & games"}, headers=admin
    )
    assert (bad.status_code, problem_type(bad)) == (422, "validation-error")
    orphan = await client.post(
        ADMIN_CATEGORIES,
        json={"name": "Lost", "slug": "lost", "parent_id": "0190b2c4-e1f2-7a3c-9d5e-6f708192a3b4"},
        headers=admin,
    )
    assert (orphan.status_code, problem_type(orphan)) == (422, "validation-error")
    other = ok(
        await client.post(ADMIN_CATEGORIES, json={"name": "Games", "slug": "games"}, headers=admin)
    )
    renamed = await client.patch(
        f"{ADMIN_CATEGORIES}/{other['id']}", json={"slug": "toys"}, headers=admin
    )
    assert (renamed.status_code, problem_type(renamed)) == (409, "category-slug-taken")


async def test_a_move_takes_the_subtree_along(
    client: httpx2.AsyncClient, catalog: Catalog, runtime: Runtime
) -> None:
    fashion = await catalog.category("Fashion")
    home = await catalog.category("Home")
    dresses = await catalog.category("Dresses", parent=fashion)
    kitenge = await catalog.category("Kitenge", parent=dresses)
    admin = (await catalog.admin()).headers

    moved = ok(
        await client.patch(
            f"{ADMIN_CATEGORIES}/{dresses['id']}",
            json={"parent_id": home["id"], "name": "Linen"},
            headers=admin,
        )
    )
    assert moved["parent_id"] == home["id"] and moved["name"] == "Linen"
    assert moved["ancestors"] == [home["id"]]
    paths = await _paths(runtime)
    assert paths["Linen"] == f"/{home['id']}/{dresses['id']}/"
    assert paths["Kitenge"] == f"/{home['id']}/{dresses['id']}/{kitenge['id']}/"
    assert paths["Fashion"] == f"/{fashion['id']}/"

    # To the root, with null.
    ok(
        await client.patch(
            f"{ADMIN_CATEGORIES}/{dresses['id']}", json={"parent_id": None}, headers=admin
        )
    )
    paths = await _paths(runtime)
    assert paths["Kitenge"] == f"/{dresses['id']}/{kitenge['id']}/"
    tree = ok(await client.get(CATEGORIES))["items"]
    assert sorted(_names(tree)) == [("Fashion", []), ("Home", []), ("Linen", [("Kitenge", [])])]


async def test_a_category_cannot_move_under_itself_or_its_descendants(
    client: httpx2.AsyncClient, catalog: Catalog, runtime: Runtime
) -> None:
    root = await catalog.category("Electronics")
    phones = await catalog.category("Phones", parent=root)
    cases = await catalog.category("Cases", parent=phones)
    admin = (await catalog.admin()).headers
    for new_parent in (root, phones, cases):
        refused = await client.patch(
            f"{ADMIN_CATEGORIES}/{root['id']}", json={"parent_id": new_parent["id"]}, headers=admin
        )
        assert (refused.status_code, problem_type(refused)) == (409, "category-cycle")
    assert (await _paths(runtime))["Cases"] == f"/{root['id']}/{phones['id']}/{cases['id']}/"


async def test_two_opposite_moves_at_once_never_make_a_loop(
    client: httpx2.AsyncClient, catalog: Catalog, runtime: Runtime, backend: str
) -> None:
    """A under B and B under A, sent together: one wins, the other is refused."""
    first = await catalog.category("First")
    second = await catalog.category("Second")
    admin = (await catalog.admin()).headers
    answers = await asyncio.gather(
        client.patch(
            f"{ADMIN_CATEGORIES}/{first['id']}", json={"parent_id": second["id"]}, headers=admin
        ),
        client.patch(
            f"{ADMIN_CATEGORIES}/{second['id']}", json={"parent_id": first["id"]}, headers=admin
        ),
    )
    assert sorted(answer.status_code for answer in answers) == [200, 409]
    paths = await _paths(runtime)
    # Exactly one is the other's parent, and each path ends with its own id.
    assert sorted(depth_of(path) for path in paths.values()) == [1, 2]
    for path in paths.values():
        ids = path_ids(path)
        assert len(set(ids)) == len(ids)


async def test_the_tree_has_a_depth_limit(client: httpx2.AsyncClient, catalog: Catalog) -> None:
    parent = await catalog.category("Level 1")
    for level in range(2, MAX_DEPTH + 1):
        parent = await catalog.category(f"Level {level}", parent=parent)
    refused = await client.post(
        ADMIN_CATEGORIES,
        json={"name": "Too deep", "slug": "too-deep", "parent_id": parent["id"]},
        headers=(await catalog.admin()).headers,
    )
    assert (refused.status_code, problem_type(refused)) == (409, "category-too-deep")
    # A two-level subtree cannot move under a leaf of depth MAX_DEPTH - 1 either.
    top = await catalog.category("Top")
    await catalog.category("Below", parent=top)
    deep_parent = ok(await client.get(CATEGORIES))  # the tree is readable meanwhile
    assert deep_parent["items"]
    second_deepest = parent["ancestors"][-1]
    moved = await client.patch(
        f"{ADMIN_CATEGORIES}/{top['id']}",
        json={"parent_id": second_deepest},
        headers=(await catalog.admin()).headers,
    )
    assert (moved.status_code, problem_type(moved)) == (409, "category-too-deep")


async def test_a_category_in_use_cannot_be_deleted(
    client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    admin = (await catalog.admin()).headers
    parent = await catalog.category("Beauty")
    child = await catalog.category("Hair", parent=parent)
    refused = await client.delete(f"{ADMIN_CATEGORIES}/{parent['id']}", headers=admin)
    assert (refused.status_code, problem_type(refused)) == (409, "category-in-use")
    assert refused.json()["children"] == 1

    store = await catalog.store()
    await store.product(category_id=child["id"], publish=False)
    refused = await client.delete(f"{ADMIN_CATEGORIES}/{child['id']}", headers=admin)
    assert (refused.status_code, problem_type(refused)) == (409, "category-in-use")
    assert refused.json()["products"] == 1

    empty = await catalog.category("Empty")
    assert (
        await client.delete(f"{ADMIN_CATEGORIES}/{empty['id']}", headers=admin)
    ).status_code == 204
    gone = await client.delete(f"{ADMIN_CATEGORIES}/{empty['id']}", headers=admin)
    assert (gone.status_code, problem_type(gone)) == (404, "not-found")


@pytest.mark.parametrize(("path", "depth"), [("/a/", 1), ("/a/b/", 2), ("/a/b/c/d/", 4)])
def test_depth_counts_the_levels_of_a_path(path: str, depth: int) -> None:
    assert depth_of(path) == depth
