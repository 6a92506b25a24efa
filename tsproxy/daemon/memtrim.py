"""Give the heap freed after a load peak back to the system.

A thousand connections' buffers are many small and medium allocations; once they are freed,
glibc's malloc keeps the pages in its arenas for reuse, so the process's RSS stays near the
peak (measured: 39 MB before 1,000 x 1 MB downloads, 75-80 MB long after every connection
closed).  malloc_trim(0) returns the free pages (here about 140 MB of 160 MB in a synthetic
run).  The trimmer calls it when the load, as a count the caller samples (e.g. asyncio tasks:
every proxied connection has some), has fallen to half of its peak by at least `min_drop`,
at most once per `min_interval` seconds.  On a libc without malloc_trim it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time

log = logging.getLogger("tsproxy.memtrim")


def _libc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: fn(0)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """Decides when to trim (sans-IO: `observe(load, now)`); `trim()` does it and counts."""

    def __init__(self, *, min_drop: int = 64, min_interval: float = 10.0, trim_fn="libc"):
        self.min_drop = min_drop
        self.min_interval = min_interval
        self._trim_fn = _libc_trim() if trim_fn == "libc" else trim_fn
        self.peak = 0
        self.last_trim: float | None = None
        self.counters = {"heap_trims": 0, "heap_trim_released_bytes": 0}

    def observe(self, load: int, now: float) -> bool:
        """One sample of the load; True when the heap should be trimmed now."""
        if load > self.peak:
            self.peak = load
        if self.peak - load < self.min_drop or load * 2 > self.peak:
            return False
        if self.last_trim is not None and now - self.last_trim < self.min_interval:
            return False
        self.last_trim = now
        self.peak = load                   # the next trim needs a new peak
        return True

    def trim(self) -> int:
        """malloc_trim(0); returns the RSS it gave back (bytes, >= 0)."""
        if self._trim_fn is None:
            return 0
        before = rss_bytes()
        t0 = time.monotonic()
        self._trim_fn()
        released = max(0, before - rss_bytes())
        self.counters["heap_trims"] += 1
        self.counters["heap_trim_released_bytes"] += released
        log.debug("heap trimmed: %.1f MB back in %.1f ms", released / 1e6, (time.monotonic() - t0) * 1e3)
        return released

    async def watch(self, load, interval: float = 2.0) -> None:
        """Sample `load()` every `interval` seconds and trim when due (runs until cancelled)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            if self.observe(load(), loop.time()):
                self.trim()


def task_count() -> int:
    """The running loop's asyncio tasks: each proxied connection has at least one."""
    return len(asyncio.all_tasks())
