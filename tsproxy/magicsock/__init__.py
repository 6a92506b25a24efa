"""magicsock."""
