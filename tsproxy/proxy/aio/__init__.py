"""asyncio side of the front ends: dialer, relay, listeners, forwards."""
