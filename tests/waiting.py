"""Polling for a condition, the one copy every test uses: `eventually` blocks (tests that drive
daemons from the outside), `until` awaits on the running loop (in-process tests).  Both return
the condition's truthy value and fail with an AssertionError naming what never happened."""

from __future__ import annotations

import asyncio
import inspect
import time


def eventually(fn, timeout: float, what: str, interval: float = 0.2):
    """Poll fn() until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not reached in {timeout}s (last: {last!r})")


async def until(cond, what: str = "condition", timeout: float = 20.0, interval: float = 0.02):
    """Poll cond() on the loop until it is truthy; cond may return an awaitable (awaited)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        v = cond()
        if inspect.isawaitable(v):
            v = await v
        if v:
            return v
        if loop.time() >= deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s (last: {v!r})")
        await asyncio.sleep(interval)
