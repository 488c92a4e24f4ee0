"""Catalog: the category tree, sellers' products and their variants, and the public listing."""
