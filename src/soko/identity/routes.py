"""The identity domain's HTTP routes, assembled from one module per capability."""

from __future__ import annotations

from fastapi import APIRouter

from soko.identity import (
    routes_admin,
    routes_apikeys,
    routes_audit,
    routes_auth,
    routes_me,
    routes_mfa,
    routes_oidc,
    routes_otp,
    routes_pages,
    routes_wellknown,
)

router = APIRouter()
router.include_router(routes_auth.router, prefix="/auth", tags=["sign-in"])
router.include_router(routes_otp.router, prefix="/auth/otp", tags=["sign-in"])
router.include_router(routes_oidc.router, prefix="/auth/oidc", tags=["sign-in"])
router.include_router(routes_me.router, prefix="/me", tags=["account"])
router.include_router(routes_mfa.router, prefix="/me/mfa", tags=["account"])
router.include_router(routes_mfa.challenge_router, prefix="/auth/mfa", tags=["sign-in"])
router.include_router(routes_apikeys.router, prefix="/me/api-keys", tags=["account"])
router.include_router(routes_admin.router, prefix="/admin", tags=["administration"])
router.include_router(routes_audit.router, prefix="/admin", tags=["administration"])

# Served at the site root, outside /api/v1: the public signing keys, and the pages the
# links in emails open when the marketplace has none of its own.
root_router = APIRouter()
root_router.include_router(routes_wellknown.router, tags=["sign-in"])
root_router.include_router(routes_pages.router)
