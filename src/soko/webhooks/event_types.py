"""Which events endpoints may subscribe to, and whose data each one is.

:data:`EVENT_OWNERS` is the declared table: for each event type, how to read the
store(s) the event concerns from its payload. A store's endpoints receive an event only
when the store is among them; the marketplace's own endpoints receive every event they
subscribe to. An event whose rule names no store (a refund of money held in suspense, a
payment flagged for review) reaches only the marketplace's endpoints.

Payments events are listed only when :mod:`soko.payments.events` exists in this build.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from soko.orders import events as orders_events

OwnerReader = Callable[[Mapping[str, Any]], frozenset[uuid.UUID]]


def _one(field: str) -> OwnerReader:
    def read(payload: Mapping[str, Any]) -> frozenset[uuid.UUID]:
        value = payload.get(field)
        return frozenset({uuid.UUID(str(value))}) if value else frozenset()

    return read


def _many(field: str) -> OwnerReader:
    def read(payload: Mapping[str, Any]) -> frozenset[uuid.UUID]:
        values = payload.get(field) or []
        return frozenset(uuid.UUID(str(value)) for value in values)

    return read


def _nobody(payload: Mapping[str, Any]) -> frozenset[uuid.UUID]:
    del payload
    return frozenset()


@dataclass(frozen=True, slots=True)
class EventRule:
    """How one event type is shared: ``owners`` reads the stores it concerns, and
    ``field`` names the payload field the rule reads (``None``: marketplace only)."""

    owners: OwnerReader
    field: str | None
    # A list field naming several stores is narrowed, for one store's endpoint, to that
    # store: a store never learns which other stores shared a payment.
    narrow_list: bool = False

    def data_for(self, payload: Mapping[str, Any], seller_id: uuid.UUID | None) -> dict[str, Any]:
        """The payload as an endpoint of ``seller_id`` (``None``: the marketplace) sees it."""
        data = dict(payload)
        if seller_id is not None and self.narrow_list and self.field is not None:
            data[self.field] = [str(seller_id)]
        return data


def _by(field: str) -> EventRule:
    return EventRule(_one(field), field)


def _by_list(field: str) -> EventRule:
    return EventRule(_many(field), field, narrow_list=True)


MARKETPLACE_ONLY = EventRule(_nobody, None)

_ORDER_EVENTS: dict[str, EventRule] = {
    orders_events.ORDER_PLACED: _by("seller_id"),
    orders_events.ORDER_PAID: _by("seller_id"),
    orders_events.ORDER_PROCESSING: _by("seller_id"),
    orders_events.ORDER_SHIPPED: _by("seller_id"),
    orders_events.ORDER_DELIVERED: _by("seller_id"),
    orders_events.ORDER_COMPLETED: _by("seller_id"),
    orders_events.ORDER_CANCELLED: _by("seller_id"),
    orders_events.ORDER_EXPIRED: _by("seller_id"),
    orders_events.ORDER_DISPUTED: _by("seller_id"),
    orders_events.ORDER_REFUNDED: _by("seller_id"),
    orders_events.DISPUTE_OPENED: _by("seller_id"),
    orders_events.DISPUTE_ANSWERED: _by("seller_id"),
    orders_events.DISPUTE_RESOLVED: _by("seller_id"),
}


def _payment_events() -> dict[str, EventRule]:
    try:
        from soko.payments import events as payments_events
    except ImportError:  # the payments domain is not part of this build yet
        return {}
    return {
        payments_events.PAYMENT_SUCCEEDED: _by_list("seller_ids"),
        payments_events.PAYMENT_FAILED: _by_list("seller_ids"),
        # A flag asks the marketplace's staff to look; it is not the stores' business.
        payments_events.PAYMENT_FLAGGED: MARKETPLACE_ONLY,
        # A refund concerns the one store whose order it refunds (none for suspense).
        payments_events.REFUND_SUCCEEDED: _by("seller_id"),
        payments_events.REFUND_FAILED: _by("seller_id"),
    }


EVENT_OWNERS: Mapping[str, EventRule] = {**_ORDER_EVENTS, **_payment_events()}

#: Every event type an endpoint may subscribe to, sorted.
EVENT_TYPES: tuple[str, ...] = tuple(sorted(EVENT_OWNERS))
