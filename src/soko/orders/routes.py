"""The orders domain's HTTP routes, assembled from one module per audience."""

from __future__ import annotations

from fastapi import APIRouter

from soko.orders import (
    routes_admin,
    routes_buyer,
    routes_checkout,
    routes_pages,
    routes_seller,
)

router = APIRouter()
router.include_router(routes_checkout.router, prefix="/checkout", tags=["checkout"])
router.include_router(routes_buyer.router, prefix="/orders", tags=["orders"])
router.include_router(routes_seller.router, prefix="/seller/orders", tags=["seller orders"])
router.include_router(routes_admin.router, prefix="/admin", tags=["administration"])

# Served at the site root, outside /api/v1: the page order emails link to when the
# marketplace has none of its own.
root_router = APIRouter()
root_router.include_router(routes_pages.router)
