"""The category tree: created, renamed, moved and deleted by the marketplace's operators.

Each category stores its materialized path, the ids from the root down to itself
(``/<root id>/<child id>/``). "A category and everything under it" is
then one prefix match, and moving a category re-paths its whole subtree with one
``UPDATE``. Structural changes (create, move, delete) take one tree-wide lock on
PostgreSQL (a transaction advisory lock; SQLite's writers are already serialized), so two
concurrent moves cannot build a loop nor leave a subtree with a stale path.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.catalog.errors import CategoryCycle, CategoryInUse, CategorySlugTaken, CategoryTooDeep
from soko.catalog.models import Category, Product
from soko.catalog.public import CATALOG_TAG
from soko.catalog.schemas import CategoryCreate, CategoryOut, CategoryUpdate
from soko.platform.clock import Clock
from soko.platform.errors import NotFound, ValidationFailed
from soko.platform.ids import uuid7
from soko.platform.runtime import invalidate_after_commit

CATEGORIES_TAG = "catalog:categories"
MAX_DEPTH = 8
# An arbitrary constant naming the category tree's advisory lock.
_TREE_LOCK_KEY = 0x50_4B_4F_43_41_54


def depth_of(path: str) -> int:
    """How many levels a path names (1 for a root)."""
    return path.count("/") - 1


def path_ids(path: str) -> list[uuid.UUID]:
    """The ids a path names, root first."""
    return [uuid.UUID(part) for part in path.strip("/").split("/") if part]


def category_out(category: Category) -> CategoryOut:
    return CategoryOut(
        id=category.id,
        parent_id=category.parent_id,
        slug=category.slug,
        name=category.name,
        position=category.position,
        ancestors=path_ids(category.path)[:-1],
    )


async def _lock_tree(session: AsyncSession) -> None:
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(_TREE_LOCK_KEY)))


async def _slug_free(session: AsyncSession, slug: str, *, other_than: uuid.UUID | None) -> None:
    found = await session.scalar(select(Category.id).where(Category.slug == slug))
    if found is not None and found != other_than:
        raise CategorySlugTaken(f"The category slug {slug!r} is taken.")


async def _flush(session: AsyncSession, slug: str) -> None:
    try:
        await session.flush()
    except IntegrityError as exc:
        # Only the slug is unique; the tree lock makes this a last line of defence.
        raise CategorySlugTaken(f"The category slug {slug!r} is taken.") from exc


def _changed(session: AsyncSession) -> None:
    # Product lists filter by category subtree, so they go stale with the tree.
    invalidate_after_commit(session, CATEGORIES_TAG, CATALOG_TAG)


async def create_category(session: AsyncSession, clock: Clock, body: CategoryCreate) -> CategoryOut:
    await _lock_tree(session)
    parent_path = "/"
    if body.parent_id is not None:
        parent = await session.get(Category, body.parent_id)
        if parent is None:
            raise ValidationFailed.of_field("parent_id", "is not a category")
        parent_path = parent.path
    if depth_of(parent_path) + 1 > MAX_DEPTH:
        raise CategoryTooDeep(f"Categories nest at most {MAX_DEPTH} levels.", max_depth=MAX_DEPTH)
    await _slug_free(session, body.slug, other_than=None)
    now = clock.now()
    category_id = uuid7()
    category = Category(
        id=category_id,
        parent_id=body.parent_id,
        slug=body.slug,
        name=body.name,
        path=f"{parent_path}{category_id}/",
        position=body.position,
        created_at=now,
        updated_at=now,
        version=1,
    )
    session.add(category)
    await _flush(session, body.slug)
    _changed(session)
    return category_out(category)


async def _category(session: AsyncSession, category_id: uuid.UUID) -> Category:
    category = await session.get(Category, category_id, populate_existing=True)
    if category is None:
        raise NotFound("No category with this id.")
    return category


async def update_category(
    session: AsyncSession, clock: Clock, category_id: uuid.UUID, body: CategoryUpdate
) -> CategoryOut:
    await _lock_tree(session)
    category = await _category(session, category_id)
    sent = body.model_fields_set
    if body.slug is not None and body.slug != category.slug:
        await _slug_free(session, body.slug, other_than=category.id)
        category.slug = body.slug
    if body.name is not None:
        category.name = body.name
    if body.position is not None:
        category.position = body.position
    if "parent_id" in sent and body.parent_id != category.parent_id:
        await _move(session, category, body.parent_id)
    category.updated_at = clock.now()
    category.version += 1
    await _flush(session, category.slug)
    _changed(session)
    return category_out(category)


async def _move(session: AsyncSession, category: Category, parent_id: uuid.UUID | None) -> None:
    old_path = category.path
    parent_path = "/"
    if parent_id is not None:
        parent = await session.get(Category, parent_id, populate_existing=True)
        if parent is None:
            raise ValidationFailed.of_field("parent_id", "is not a category")
        if parent.path.startswith(old_path):
            raise CategoryCycle("A category cannot move under itself or one of its descendants.")
        parent_path = parent.path
    new_path = f"{parent_path}{category.id}/"
    # The subtree's deepest path, in slashes: its depth below the category moves along.
    slashes = func.length(Category.path) - func.length(func.replace(Category.path, "/", ""))
    deepest = await session.scalar(
        select(func.max(slashes)).where(Category.path.startswith(old_path))
    )
    levels_below = int(deepest or old_path.count("/")) - old_path.count("/")
    if depth_of(new_path) + levels_below > MAX_DEPTH:
        raise CategoryTooDeep(f"Categories nest at most {MAX_DEPTH} levels.", max_depth=MAX_DEPTH)
    # The category and its whole subtree take the new prefix in one statement.
    await session.execute(
        update(Category)
        .where(Category.path.startswith(old_path))
        .values(path=literal(new_path) + func.substr(Category.path, len(old_path) + 1))
        .execution_options(synchronize_session=False)
    )
    await session.refresh(category)
    category.parent_id = parent_id


async def delete_category(session: AsyncSession, category_id: uuid.UUID) -> None:
    await _lock_tree(session)
    category = await _category(session, category_id)
    children = await session.scalar(
        select(func.count()).select_from(Category).where(Category.parent_id == category.id)
    )
    products = await session.scalar(
        select(func.count()).select_from(Product).where(Product.category_id == category.id)
    )
    if children or products:
        raise CategoryInUse(
            "Move or delete its subcategories and products first.",
            children=int(children or 0),
            products=int(products or 0),
        )
    await session.delete(category)
    try:
        await session.flush()
    except IntegrityError as exc:
        # A product assigned meanwhile: the foreign key is the guard.
        raise CategoryInUse("The category gained a product meanwhile.") from exc
    _changed(session)


async def category_tree(session: AsyncSession) -> list[dict[str, Any]]:
    """Every category as nested plain data (roots first, siblings by position, name)."""
    rows = (
        await session.execute(
            select(
                Category.id, Category.parent_id, Category.slug, Category.name, Category.position
            ).order_by(Category.position, Category.name, Category.id)
        )
    ).all()
    return _nest(rows)


def _nest(rows: Sequence[Any]) -> list[dict[str, Any]]:
    nodes: dict[uuid.UUID, dict[str, Any]] = {
        row.id: {
            "id": str(row.id),
            "slug": row.slug,
            "name": row.name,
            "position": row.position,
            "children": [],
        }
        for row in rows
    }
    roots: list[dict[str, Any]] = []
    for row in rows:
        parent = nodes.get(row.parent_id) if row.parent_id is not None else None
        (parent["children"] if parent is not None else roots).append(nodes[row.id])
    return roots
