"""netstack."""
