"""Carts: anonymous or signed-in, versioned lines, and the merge that follows a sign-in."""
