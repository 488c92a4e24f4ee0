"""Identity routes: oidc."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
