"""The inventory domain's problem types."""

from __future__ import annotations

from collections.abc import Sequence

from soko.inventory.planning import Shortage
from soko.platform.errors import ProblemError


class OutOfStock(ProblemError):
    slug = "out-of-stock"
    title = "Not enough stock"
    status = 409
    description = (
        "One or more items cannot be reserved in the quantity asked. `shortages` lists "
        "each short item with the quantity requested and what is available now."
    )

    def __init__(self, shortages: Sequence[Shortage], detail: str | None = None) -> None:
        self.shortages = list(shortages)
        names = ", ".join(
            f"{s.variant_id} (requested {s.requested}, available {s.available})"
            for s in self.shortages
        )
        super().__init__(
            detail or f"Not enough stock for {names}.",
            shortages=[
                {
                    "variant_id": str(s.variant_id),
                    "requested": s.requested,
                    "available": s.available,
                }
                for s in self.shortages
            ],
        )


class StockBelowCommitted(ProblemError):
    slug = "stock-below-committed"
    title = "Stock cannot go below what is promised"
    status = 409
    description = (
        "The change would leave fewer units on hand than are reserved by checkouts and "
        "allocated to paid orders (or fewer than zero). `committed` says how many units "
        "are promised; wait for orders to ship or be cancelled, or change by less."
    )


class LocationNameTaken(ProblemError):
    slug = "location-name-taken"
    title = "A location with this name exists"
    status = 409
    description = "Each of a seller's locations has its own name; choose another."
