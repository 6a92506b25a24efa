"""netstack/wire."""
