"""The catalog's pure rules, without a database: typed attributes, the text filter's
pattern, and how the category tree is nested."""

from __future__ import annotations

import sqlite3
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from soko.catalog.categories import _nest, depth_of, path_ids
from soko.catalog.schemas import AttributeIn
from soko.catalog.storefront import _like_pattern


@pytest.mark.parametrize(
    ("kind", "value"),
    [("text", "cotton"), ("number", 3), ("number", 2.5), ("boolean", False)],
)
def test_an_attribute_value_of_its_type_is_accepted(kind: str, value: Any) -> None:
    attribute = AttributeIn.model_validate({"key": "k", "type": kind, "value": value})
    assert attribute.value == value and type(attribute.value) is type(value)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("text", 3),
        ("text", ""),
        ("text", "x" * 501),
        ("number", "3"),
        ("number", True),
        ("number", float("inf")),
        ("boolean", "true"),
        ("boolean", 1),
    ],
)
def test_an_attribute_value_of_another_type_is_refused(kind: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        AttributeIn.model_validate({"key": "k", "type": kind, "value": value})


def _like(haystack: str, pattern: str) -> bool:
    with sqlite3.connect(":memory:") as connection:
        row = connection.execute("SELECT ? LIKE ? ESCAPE '\\'", (haystack, pattern)).fetchone()
    return bool(row[0])


_text = st.text(alphabet=st.sampled_from("ab%_\\ "), max_size=8)


@given(before=_text, needle=_text.filter(bool), after=_text)
def test_the_text_pattern_finds_the_words_literally(before: str, needle: str, after: str) -> None:
    assert _like(f"{before}{needle}{after}".lower(), _like_pattern(needle))


@given(haystack=_text, needle=_text.filter(bool))
def test_the_text_pattern_treats_wildcards_as_characters(haystack: str, needle: str) -> None:
    assert _like(haystack, _like_pattern(needle)) == (needle.lower() in haystack)


@st.composite
def _forests(draw: st.DrawFn) -> list[SimpleNamespace]:
    """Categories in position order, each parent listed before or after its children."""
    count = draw(st.integers(min_value=0, max_value=12))
    ids = [uuid.uuid4() for _ in range(count)]
    rows = []
    for index, category_id in enumerate(ids):
        parent = draw(st.one_of(st.none(), st.sampled_from(ids[:index]))) if index else None
        rows.append(
            SimpleNamespace(id=category_id, parent_id=parent, slug=f"c{index}", name="", position=0)
        )
    return draw(st.permutations(rows))


@given(rows=_forests())
def test_nesting_keeps_every_category_once_under_its_parent(rows: list[SimpleNamespace]) -> None:
    roots = _nest(rows)
    seen: dict[str, str | None] = {}

    def walk(nodes: list[dict[str, Any]], parent: str | None) -> None:
        for node in nodes:
            assert node["id"] not in seen
            seen[node["id"]] = parent
            walk(node["children"], node["id"])

    walk(roots, None)
    assert seen == {str(row.id): str(row.parent_id) if row.parent_id else None for row in rows}
    # Siblings keep the order of the rows (position, then name).
    order = [str(row.id) for row in rows]
    for siblings in [roots, *(n["children"] for n in _all(roots))]:
        ranks = [order.index(node["id"]) for node in siblings]
        assert ranks == sorted(ranks)


def _all(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for node in nodes:
        found.append(node)
        found += _all(node["children"])
    return found


def test_a_path_names_its_ids_root_first() -> None:
    root, child = uuid.uuid4(), uuid.uuid4()
    path = f"/{root}/{child}/"
    assert path_ids(path) == [root, child]
    assert depth_of(path) == 2


def test_no_two_listing_requests_share_a_cache_key() -> None:
    from soko.catalog.storefront import ProductFilters, ProductSort, listing_cache_key
    from soko.platform.pagination import FieldSelection, PageRequest

    store = uuid.uuid4()
    page, everything = PageRequest(limit=20), FieldSelection(None)
    requests = [
        ProductFilters(category="x", seller=store),
        ProductFilters(category=f"x|{store}"),
        ProductFilters(category="x", q="y"),
        ProductFilters(category="x", currency="KES"),
        ProductFilters(q="x"),
        ProductFilters(category="x"),
        ProductFilters(),
        ProductFilters(in_stock=True),
    ]
    keys = {listing_cache_key(f, ProductSort.newest, page, everything) for f in requests}
    assert len(keys) == len(requests)
    sorts = {listing_cache_key(ProductFilters(), s, page, everything) for s in ProductSort}
    assert len(sorts) == len(ProductSort)
    trimmed = listing_cache_key(
        ProductFilters(), ProductSort.newest, page, FieldSelection(frozenset({"id", "title"}))
    )
    assert trimmed not in keys
