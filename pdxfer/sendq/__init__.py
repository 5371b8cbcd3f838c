"""sendq."""
