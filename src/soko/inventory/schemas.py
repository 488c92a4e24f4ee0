"""Request and response shapes of the inventory domain."""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic.json_schema import SkipJsonSchema

from soko.inventory.models import AdjustmentKind, LocationKind

# Large enough for any shop, small enough that a typo of three extra digits is refused
# rather than promising a million units.
MAX_UNITS = 1_000_000

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)]
Address = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)]
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


class LocationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    kind: LocationKind = LocationKind.warehouse
    address: Address = ""


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class LocationChange(BaseModel):
    """Only the fields sent change; ``active: false`` stops the location serving new
    reservations (its stock and history stay)."""

    model_config = ConfigDict(extra="forbid")

    # Left out, they keep their value; null is refused, and the schema does not offer it.
    name: Name | SkipJsonSchema[None] = Field(None, json_schema_extra=_no_default)
    kind: LocationKind | SkipJsonSchema[None] = Field(None, json_schema_extra=_no_default)
    address: Address | None = None
    active: bool | SkipJsonSchema[None] = Field(None, json_schema_extra=_no_default)

    @field_validator("name", "kind", "active", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("may be left out but not null")
        return value

    @field_validator("address", mode="after")
    @classmethod
    def _null_clears(cls, value: str | None) -> str:
        # Stored as text, never NULL: null clears the address as "" does.
        return "" if value is None else value


class LocationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    kind: LocationKind
    address: str
    active: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int


class StockOut(BaseModel):
    """One variant at one location. ``reserved`` counts live holds (holds past their
    time are already free); ``available`` = on_hand - reserved - allocated."""

    model_config = ConfigDict(from_attributes=True)

    variant_id: uuid.UUID
    location_id: uuid.UUID
    sku: str
    location_name: str
    location_active: bool
    on_hand: int
    reserved: int
    allocated: int
    available: int
    version: int
    updated_at: dt.datetime


class StockSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    on_hand: int = Field(strict=True, ge=0, le=MAX_UNITS)
    reason: Reason = "count"


class AdjustmentKindIn(StrEnum):
    """The kinds a seller records by hand; ``set`` and ``sale`` are written by Soko."""

    adjust = AdjustmentKind.adjust.value
    return_ = AdjustmentKind.return_.value
    correction = AdjustmentKind.correction.value


class StockAdjust(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delta: int = Field(strict=True, ge=-MAX_UNITS, le=MAX_UNITS)
    reason: Reason
    kind: AdjustmentKindIn = AdjustmentKindIn.adjust

    @field_validator("delta")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must not be 0")
        return value


class AdjustmentOut(BaseModel):
    """One change of on hand: who (``actor_id``, null for Soko itself: a shipped order),
    why (``kind``, ``reason``), by how much, and the level it left."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    variant_id: uuid.UUID
    location_id: uuid.UUID
    delta: int
    kind: AdjustmentKind
    reason: str
    actor_id: uuid.UUID | None
    actor_name: str | None = None
    on_hand_after: int
    at: dt.datetime


class AdjustmentResult(BaseModel):
    adjustment: AdjustmentOut
    stock: StockOut
