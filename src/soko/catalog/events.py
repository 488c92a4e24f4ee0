"""The events the catalog publishes (through the outbox), for search and notifications."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict

PRODUCT_PUBLISHED = "product.published"
PRODUCT_ARCHIVED = "product.archived"


class ProductPublished(BaseModel):
    """A product became visible in the public catalog (first publication or again
    after being archived)."""

    model_config = ConfigDict(frozen=True)

    product_id: uuid.UUID
    seller_id: uuid.UUID
    actor_id: uuid.UUID | None = None


class ProductArchived(BaseModel):
    """A product left the public catalog; its variants can no longer be bought."""

    model_config = ConfigDict(frozen=True)

    product_id: uuid.UUID
    seller_id: uuid.UUID
    actor_id: uuid.UUID | None = None
