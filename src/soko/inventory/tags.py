"""The cache tags of inventory data: a cached read that shows stock carries them."""

from __future__ import annotations

import uuid

INVENTORY_TAG = "inventory"


def stock_tag(variant_id: uuid.UUID) -> str:
    """The tag of one variant's stock: invalidated whenever any of its levels moves."""
    return f"inventory:stock:{variant_id}"
