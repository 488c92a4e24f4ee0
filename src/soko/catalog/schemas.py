"""Request and response shapes of the catalog routes.

The public listing builds its answers as plain dicts (see ``storefront``): the models of
the public shapes below describe them for OpenAPI and ``fields=``, they are not run on
every item.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Annotated, Any

from pydantic import (
    AnyUrl,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    UrlConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from soko.catalog.models import AttributeType, ProductStatus, VariantStatus
from soko.platform.money import Money

SLUG_PATTERN = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"
MAX_VARIANTS_PER_REQUEST = 100
# Every variant of a product travels with it (its page, the listing, the cache), so the
# number is bounded; archived variants count, as they are never deleted.
MAX_VARIANTS_PER_PRODUCT = 100

Slug = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=2, max_length=80, pattern=SLUG_PATTERN)
]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)]
Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Description = Annotated[str, StringConstraints(max_length=20_000)]
Sku = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=SKU_PATTERN)
]
OptionName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40)]
OptionValue = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80)]
AttributeKey = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_]*$"
    ),
]
# http is refused in production by the service (it needs the settings to know).
ImageUrl = Annotated[AnyUrl, UrlConstraints(max_length=2000, allowed_schemes=["https", "http"])]
Position = Annotated[int, Field(strict=True, ge=0, le=100_000)]
Weight = Annotated[int, Field(ge=0, le=10_000_000, description="Weight in grams")]


# -- categories -------------------------------------------------------------------------------


class CategoryCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    slug: Slug
    parent_id: uuid.UUID | None = Field(None, description="The parent; none for a root")
    position: Position = Field(0, description="Order among siblings, lowest first")


class CategoryUpdate(BaseModel):
    """What to change; fields not sent keep their value. ``parent_id: null`` moves the
    category (and everything under it) to the root."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    slug: Slug | None = None
    parent_id: uuid.UUID | None = None
    position: Position | None = None


class CategoryOut(BaseModel):
    id: uuid.UUID
    parent_id: uuid.UUID | None
    slug: str
    name: str
    position: int
    ancestors: list[uuid.UUID] = Field(description="Ids from the root down to the parent")


class CategoryNode(BaseModel):
    """A category and its subcategories, in order."""

    id: uuid.UUID
    slug: str
    name: str
    position: int
    children: list[CategoryNode]


class CategoryTreeOut(BaseModel):
    items: list[CategoryNode]


# -- products and variants: what sellers send ------------------------------------------------


def _attribute_scalar(value: Any) -> str | bool | int | float:
    # One error for a value of no attribute type: as a plain union, pydantic would report
    # one error per member ("value.str", "value.bool", ...) for a single mistake.
    if isinstance(value, str | bool | int | float):
        return value
    raise PydanticCustomError("attribute_value", "Input should be a string, a number or a boolean")


AttributeValue = Annotated[
    str | bool | int | float,
    PlainValidator(_attribute_scalar, json_schema_input_type=str | bool | int | float),
]


class AttributeIn(BaseModel):
    """A typed fact about a product (``{"key": "material", "type": "text",
    "value": "cotton"}``); the value must be of the declared type."""

    model_config = ConfigDict(extra="forbid")

    key: AttributeKey
    type: AttributeType
    value: AttributeValue

    @field_validator("value")
    @classmethod
    def value_matches_type(
        cls, value: str | bool | int | float, info: ValidationInfo
    ) -> str | bool | int | float:
        # Checked at the value, so the error names it; a type that failed on its own
        # already has its error.
        kind = info.data.get("type")
        if kind is AttributeType.text:
            if not isinstance(value, str) or not 1 <= len(value) <= 500:
                raise ValueError("a text attribute needs a string of 1 to 500 characters")
        elif kind is AttributeType.number:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("a number attribute needs a number")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("a number attribute needs a finite number")
        elif kind is AttributeType.boolean and not isinstance(value, bool):
            raise ValueError("a boolean attribute needs true or false")
        return value


Attributes = Annotated[list[AttributeIn], Field(max_length=50)]
Images = Annotated[list[ImageUrl], Field(max_length=20)]
Options = Annotated[dict[OptionName, OptionValue], Field(max_length=10)]


class VariantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: Sku
    options: Options = Field(default_factory=dict, description='{"size": "M", "colour": "red"}')
    price: Money = Field(description="In the product's currency")
    compare_at_price: Money | None = Field(
        None, description="The former or list price shown struck through; above `price`"
    )
    weight_grams: Weight | None = None
    position: Position = 0


class VariantUpdate(BaseModel):
    """What to change; fields not sent keep their value, ``null`` clears
    ``compare_at_price`` and ``weight_grams``."""

    model_config = ConfigDict(extra="forbid")

    sku: Sku | None = None
    options: Options | None = None
    price: Money | None = None
    compare_at_price: Money | None = None
    weight_grams: Weight | None = None
    position: Position | None = None


class ProductCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Title
    description: Description = ""
    category_id: uuid.UUID | None = None
    attributes: Attributes = Field(default_factory=list)
    images: Images = Field(default_factory=list)
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] | None = Field(
        None, description="ISO 4217 code of every variant's price; the marketplace's default"
    )
    variants: list[VariantIn] = Field(default_factory=list, max_length=MAX_VARIANTS_PER_REQUEST)


class ProductUpdate(BaseModel):
    """What to change; fields not sent keep their value (``category_id: null`` takes the
    product out of its category). The currency changes only while there are no variants."""

    model_config = ConfigDict(extra="forbid")

    title: Title | None = None
    description: Description | None = None
    category_id: uuid.UUID | None = None
    attributes: Attributes | None = None
    images: Images | None = None
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] | None = None


# -- what sellers see ---------------------------------------------------------------------------


class AttributeOut(BaseModel):
    key: str
    type: AttributeType
    value: str | bool | int | float


class SellerVariantOut(BaseModel):
    id: uuid.UUID
    product_id: uuid.UUID
    sku: str
    options: dict[str, str]
    price: Money
    compare_at_price: Money | None
    weight_grams: int | None
    status: VariantStatus
    position: int
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int


class SellerProductOut(BaseModel):
    id: uuid.UUID
    seller_id: uuid.UUID
    title: str
    description: str
    category_id: uuid.UUID | None
    attributes: list[AttributeOut]
    images: list[str]
    status: ProductStatus
    currency: str
    min_price: Money | None = Field(description="The lowest active variant's price")
    published_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int = Field(description="Bumped on every change to the product or a variant")
    variants: list[SellerVariantOut]


# -- what everyone sees --------------------------------------------------------------------------


class SellerCardOut(BaseModel):
    id: uuid.UUID
    slug: str
    store_name: str


class CategoryCardOut(BaseModel):
    id: uuid.UUID
    slug: str
    name: str


class VariantForSaleOut(BaseModel):
    id: uuid.UUID
    sku: str
    options: dict[str, str]
    price: Money
    compare_at_price: Money | None
    weight_grams: int | None
    available: int = Field(description="Units that can be bought now")
    in_stock: bool


class ProductCardOut(BaseModel):
    """A product in the public listing."""

    id: uuid.UUID
    title: str
    description: str
    category_id: uuid.UUID | None
    seller_id: uuid.UUID
    attributes: list[AttributeOut]
    images: list[str]
    currency: str
    min_price: Money = Field(description="The lowest price among the variants")
    in_stock: bool = Field(description="Whether any variant can be bought now")
    published_at: dt.datetime
    variants: list[VariantForSaleOut]


class ProductDetailOut(ProductCardOut):
    """A published product with its variants and their availability."""

    seller: SellerCardOut
    category: CategoryCardOut | None


def attribute_values(attributes: list[AttributeIn]) -> list[dict[str, Any]]:
    """Attributes as stored: plain JSON objects."""
    return [attribute.model_dump(mode="json") for attribute in attributes]
