"""Fixtures for the tests that walk the whole API: a market with one store, something
to sell, a buyer and an order (over HTTP, through the orders tests' fixtures)."""

from __future__ import annotations

from tests.cart.catalog_support import market  # noqa: F401
from tests.identity.conftest import make_user  # noqa: F401
from tests.orders.conftest import make_buyer  # noqa: F401
