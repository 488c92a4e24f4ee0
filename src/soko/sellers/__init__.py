"""Sellers: stores that apply, are reviewed by an admin, and act through their members."""
