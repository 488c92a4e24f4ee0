"""Which locations serve which line: the pure arithmetic of availability and allocation.

Nothing here touches the database. The reservation service reads stock rows, asks
:func:`plan_reservation` for a plan, and lets a conditional UPDATE decide whether the
plan still holds; the property tests check the arithmetic against a model.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReservationRequest:
    """One line to reserve: ``quantity`` units of a variant, from any location."""

    variant_id: uuid.UUID
    quantity: int


@dataclass(frozen=True, slots=True)
class Shortage:
    """A line that cannot be served: what was asked and what is available now."""

    variant_id: uuid.UUID
    requested: int
    available: int


@dataclass(frozen=True, slots=True)
class StockRow:
    """A stock level as the planner sees it. ``expired_held`` counts units still in
    ``reserved`` whose holds ran out and are not released yet: they are free."""

    variant_id: uuid.UUID
    location_id: uuid.UUID
    on_hand: int
    reserved: int
    allocated: int
    expired_held: int = 0
    active: bool = True  # an inactive location keeps its stock but serves no one

    @property
    def available(self) -> int:
        return row_available(self.on_hand, self.reserved, self.allocated, self.expired_held)


def row_available(on_hand: int, reserved: int, allocated: int, expired_held: int = 0) -> int:
    """Units of one stock level a buyer may still take.

    ``reserved`` includes holds that expired but were not released yet; they are added
    back, so an expired hold never blocks a buyer even before the job runs."""
    return max(0, on_hand - (reserved - expired_held) - allocated)


StockKey = tuple[uuid.UUID, uuid.UUID]  # (variant_id, location_id)


@dataclass(frozen=True, slots=True)
class ReservationPlan:
    """Units to take from each stock level, or the lines that cannot be served."""

    takes: Mapping[StockKey, int]
    shortages: tuple[Shortage, ...]

    @property
    def feasible(self) -> bool:
        return not self.shortages


def merge_lines(lines: Iterable[ReservationRequest]) -> dict[uuid.UUID, int]:
    """Quantities per variant, in first-seen order; two lines of one variant add up."""
    wanted: dict[uuid.UUID, int] = {}
    for line in lines:
        if line.quantity <= 0:
            raise ValueError(f"quantity must be positive, got {line.quantity}")
        wanted[line.variant_id] = wanted.get(line.variant_id, 0) + line.quantity
    return wanted


def available_by_variant(rows: Iterable[StockRow]) -> dict[uuid.UUID, int]:
    """Available units per variant, summed over its active locations."""
    totals: dict[uuid.UUID, int] = {}
    for row in rows:
        if not row.active:
            continue
        totals[row.variant_id] = totals.get(row.variant_id, 0) + row.available
    return totals


def plan_reservation(wanted: Mapping[uuid.UUID, int], rows: Sequence[StockRow]) -> ReservationPlan:
    """Choose the locations that serve each variant's quantity.

    A variant is served whole from one location when one can: the location that can
    serve whole the most of the other lines, so a buyer's parcel leaves from as few places
    as possible; then the one with the most available units, which spreads contention
    when several locations hold a hot variant. Only when no location can serve it whole
    is a line split, largest locations first. Ties break on the location id, so the plan
    is deterministic. A variant whose locations together fall short is a shortage; the
    plan then takes nothing.
    """
    by_variant: dict[uuid.UUID, list[StockRow]] = {}
    for row in rows:
        if row.variant_id in wanted and row.active and row.available > 0:
            by_variant.setdefault(row.variant_id, []).append(row)

    shortages = []
    for variant_id, quantity in wanted.items():
        total = sum(row.available for row in by_variant.get(variant_id, ()))
        if total < quantity:
            shortages.append(Shortage(variant_id=variant_id, requested=quantity, available=total))
    if shortages:
        return ReservationPlan(takes={}, shortages=tuple(shortages))

    # How many lines each location could serve whole: the consolidation score.
    whole_lines: dict[uuid.UUID, int] = {}
    for variant_id, quantity in wanted.items():
        for row in by_variant[variant_id]:
            if row.available >= quantity:
                whole_lines[row.location_id] = whole_lines.get(row.location_id, 0) + 1

    takes: dict[StockKey, int] = {}
    for variant_id, quantity in wanted.items():
        candidates = by_variant[variant_id]
        whole = [row for row in candidates if row.available >= quantity]
        if whole:
            best = max(
                whole,
                key=lambda row: (whole_lines[row.location_id], row.available, row.location_id),
            )
            takes[(variant_id, best.location_id)] = quantity
            continue
        remaining = quantity
        for row in sorted(candidates, key=lambda row: (-row.available, row.location_id)):
            take = min(remaining, row.available)
            takes[(variant_id, row.location_id)] = take
            remaining -= take
            if remaining == 0:
                break
    return ReservationPlan(takes=takes, shortages=())


def shortages_of(wanted: Mapping[uuid.UUID, int], rows: Iterable[StockRow]) -> list[Shortage]:
    """The variants whose available units fall short of what is wanted."""
    available = available_by_variant(rows)
    return [
        Shortage(variant_id=variant_id, requested=quantity, available=available.get(variant_id, 0))
        for variant_id, quantity in wanted.items()
        if available.get(variant_id, 0) < quantity
    ]
