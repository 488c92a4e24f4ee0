"""Being written."""

from fastapi import APIRouter

router = APIRouter()
