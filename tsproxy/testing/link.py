"""A fault-injecting in-memory packet link and a driver for two sans-IO stacks.

`Link` delays every packet (base delay + jitter), and independently drops, duplicates,
reorders (extra delay) and corrupts (flips one byte) with the given probabilities.  It uses
its own seeded RNG so a failing run can be replayed.
"""

from __future__ import annotations

import heapq
import random


class Link:
    def __init__(self, *, delay=0.005, jitter=0.0, loss=0.0, dup=0.0, reorder=0.0,
                 reorder_extra=0.01, corrupt=0.0, seed=1):
        self.delay, self.jitter = delay, jitter
        self.loss, self.dup, self.reorder, self.corrupt = loss, dup, reorder, corrupt
        self.reorder_extra = reorder_extra
        self.rng = random.Random(seed)
        self._q: list = []
        self._n = 0
        self.stats = {"sent": 0, "dropped": 0, "duplicated": 0, "reordered": 0, "corrupted": 0}

    def send(self, packets, dst, now: float) -> None:
        r = self.rng.random
        for p in packets:
            self.stats["sent"] += 1
            if r() < self.loss:
                self.stats["dropped"] += 1
                continue
            copies = 2 if r() < self.dup else 1
            if copies == 2:
                self.stats["duplicated"] += 1
            for _ in range(copies):
                t = now + self.delay + (r() * self.jitter if self.jitter else 0.0)
                if r() < self.reorder:
                    t += r() * self.reorder_extra
                    self.stats["reordered"] += 1
                data = bytes(p)
                if r() < self.corrupt and data:
                    i = self.rng.randrange(len(data))
                    data = data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1:]
                    self.stats["corrupted"] += 1
                self._n += 1
                heapq.heappush(self._q, (t, self._n, dst, data))

    def next_time(self):
        return self._q[0][0] if self._q else None

    def pop_due(self, now: float):
        out = []
        while self._q and self._q[0][0] <= now:
            _, _, dst, data = heapq.heappop(self._q)
            out.append((dst, data))
        return out


def run_until(stacks, link: Link, done, *, now: float, limit: float = 3600.0, on_step=None) -> float:
    """Drive sans-IO stacks (objects with receive_packet/packets_to_send/next_deadline/
    handle_timer) over `link` until done() or simulated `limit` seconds pass."""
    end = now + limit
    while not done():
        for i, s in enumerate(stacks):
            out = s.packets_to_send()
            if out:
                link.send(out, 1 - i, now)
        if on_step is not None:
            on_step(now)
            for i, s in enumerate(stacks):
                out = s.packets_to_send()
                if out:
                    link.send(out, 1 - i, now)
        cands = [t for t in [link.next_time()] + [s.next_deadline() for s in stacks] if t is not None]
        if not cands:
            if on_step is None:
                raise AssertionError("deadlock: nothing in flight and no timers")
            now += 0.001
        else:
            now = max(now, min(cands))
        if now > end:
            raise AssertionError(f"not done after {limit} simulated seconds")
        for dst, data in link.pop_due(now):
            stacks[dst].receive_packet(data, now)
        for s in stacks:
            d = s.next_deadline()
            if d is not None and d <= now:
                s.handle_timer(now)
    return now
