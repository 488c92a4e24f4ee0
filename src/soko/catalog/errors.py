"""The catalog's problem types."""

from __future__ import annotations

from soko.platform.errors import ProblemError


class SkuFixed(ProblemError):
    slug = "sku-fixed"
    title = "This variant's SKU can no longer change"
    status = 409
    description = (
        "A variant of a product that has been published keeps its SKU for good: orders "
        "and stock counts name it. Add a variant with the new SKU and archive this one."
    )


class SkuTaken(ProblemError):
    slug = "sku-taken"
    title = "This SKU is already used in the store"
    status = 409
    description = (
        "Another variant of the same store, archived ones included, already has this SKU; "
        "choose another one."
    )


class CategorySlugTaken(ProblemError):
    slug = "category-slug-taken"
    title = "This category slug is taken"
    status = 409
    description = "Another category already uses this slug; choose another one."


class CategoryInUse(ProblemError):
    slug = "category-in-use"
    title = "The category is in use"
    status = 409
    description = (
        "A category with subcategories or products cannot be deleted; move or delete them "
        "first. `children` and `products` say how many there are."
    )


class CategoryCycle(ProblemError):
    slug = "category-cycle"
    title = "A category cannot move under itself"
    status = 409
    description = (
        "The new parent is the category itself or one of its descendants, which would "
        "make the tree a loop."
    )


class CategoryTooDeep(ProblemError):
    slug = "category-too-deep"
    title = "The category tree would be too deep"
    status = 409
    description = "Categories nest at most `max_depth` levels; choose a parent higher up."


class ProductStateConflict(ProblemError):
    slug = "product-state-conflict"
    title = "The product is not in a state that allows this"
    status = 409
    description = (
        "Publish needs a draft or archived product, archive a draft or published one; "
        "`current_status` says where the product is now."
    )


class ProductNeedsVariant(ProblemError):
    slug = "product-needs-variant"
    title = "A published product needs an active variant"
    status = 409
    description = (
        "A product is published with at least one active variant and keeps one while "
        "published: add a variant before publishing, or archive the product instead of "
        "its last variant."
    )


class TooManyVariants(ProblemError):
    slug = "too-many-variants"
    title = "The product has as many variants as it may"
    status = 409
    description = (
        "A product holds at most `max_variants` variants, archived ones included: split "
        "the range into several products."
    )
