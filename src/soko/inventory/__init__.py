"""Inventory: stock per variant and location, its history, and reservations that never oversell."""
