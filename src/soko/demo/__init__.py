"""Demo data: a small marketplace (an administrator, a few stores with products and
stock, a buyer) seeded through the HTTP API, so a newcomer has something to browse."""
