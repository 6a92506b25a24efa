"""derp."""
