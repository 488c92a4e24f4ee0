"""Served at the site root: the public keys that verify Soko's access tokens (RFC 7517)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from soko.platform.auth import public
from soko.platform.runtime import RuntimeDep

router = APIRouter()

# Long enough that verifiers do not fetch the set on every token, short enough that a key
# added ahead of a rotation reaches them well before it starts signing.
JWKS_MAX_AGE_SECONDS = 300


@router.get(
    "/.well-known/jwks.json",
    summary="The public keys that verify access tokens",
    tags=["sign-in"],
    dependencies=[public()],
)
async def jwks(runtime: RuntimeDep) -> Any:
    return JSONResponse(
        runtime.signing_keys.jwks(runtime.clock),
        headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE_SECONDS}"},
    )
