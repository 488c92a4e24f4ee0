"""Outbound webhooks: endpoints that sellers and the marketplace connect, signed deliveries."""
