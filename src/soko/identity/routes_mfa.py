"""Identity routes: mfa."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
# Completing a sign-in that needs a second factor: mounted under /api/v1/auth/mfa.
challenge_router = APIRouter()
