"""The declared table of which store(s) each event concerns."""

from __future__ import annotations

import importlib.util
import uuid

import pytest

from soko.orders import events as orders_events
from soko.webhooks.event_types import EVENT_OWNERS, EVENT_TYPES, MARKETPLACE_ONLY

SELLER = uuid.uuid4()
OTHER = uuid.uuid4()
ORDER_EVENTS = [
    getattr(orders_events, name)
    for name in dir(orders_events)
    if name.isupper() and isinstance(getattr(orders_events, name), str)
]
PAYMENTS = importlib.util.find_spec("soko.payments.events") is not None


def test_every_orders_event_is_subscribable_and_belongs_to_its_seller() -> None:
    assert len(ORDER_EVENTS) == 13
    for name in ORDER_EVENTS:
        rule = EVENT_OWNERS[name]
        assert rule.owners({"seller_id": str(SELLER), "order_id": "x"}) == {SELLER}, name
        assert rule.owners({}) == frozenset(), name
        assert rule.data_for({"seller_id": str(SELLER)}, SELLER) == {"seller_id": str(SELLER)}
    assert list(EVENT_TYPES) == sorted(EVENT_OWNERS)


@pytest.mark.skipif(not PAYMENTS, reason="no payments events in this build")
def test_payments_events_belong_to_the_stores_they_name() -> None:
    from soko.payments import events as payments_events

    both = {"seller_ids": [str(SELLER), str(OTHER)], "amount_minor": 100}
    for name in (payments_events.PAYMENT_SUCCEEDED, payments_events.PAYMENT_FAILED):
        rule = EVENT_OWNERS[name]
        assert rule.owners(both) == {SELLER, OTHER}
        # One store's endpoint never learns which other stores shared the payment.
        assert rule.data_for(both, SELLER)["seller_ids"] == [str(SELLER)]
        assert rule.data_for(both, None)["seller_ids"] == [str(SELLER), str(OTHER)]
    refund = {"seller_id": str(SELLER), "seller_ids": [str(SELLER), str(OTHER)]}
    for name in (payments_events.REFUND_SUCCEEDED, payments_events.REFUND_FAILED):
        assert EVENT_OWNERS[name].owners(refund) == {SELLER}
        # Money refunded from suspense concerns no store.
        assert EVENT_OWNERS[name].owners({"seller_id": None}) == frozenset()
    assert EVENT_OWNERS[payments_events.PAYMENT_FLAGGED] is MARKETPLACE_ONLY
    assert MARKETPLACE_ONLY.owners(both) == frozenset()
