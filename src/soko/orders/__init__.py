"""Orders: checkout into one order per seller, the order state machine, and disputes."""
