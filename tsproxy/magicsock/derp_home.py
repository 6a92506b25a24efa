"""Sans-IO DERP decisions (PROTOCOL.md 5.6; Go net/netcheck and wgengine/magicsock/derp.go):
which region is home, and which region carries a packet to a peer.

    sel = HomeSelector(seed=node_public_raw)
    sel.add_sample(region, latency_s, now)                 # STUN or HTTPS latency answers
    home = sel.choose(regions, now=now, current=home, current_active=..., scores=...)
    region = derp_route(peer_home, peer_last_heard, open_regions)

Choice: each region's best sample of the last 5 minutes, times HomeParams.RegionScore[region]
when that is > 0; regions marked NoMeasureNoHome never win.  Hysteresis: the current home stays
while it is still reachable (measured in this round, or it carried DERP traffic lately) unless
the new best is at least 10 ms better and better than 2/3 of the current one.  With nothing
measured, the current home is kept, else a region picked deterministically from the seed
(Go's pickDERPFallback).
"""

from __future__ import annotations

import hashlib
from collections import deque

HISTORY = 300.0                    # netcheck keeps 5 minutes of reports
ABSOLUTE_DIFF = 0.010              # preferredDERPAbsoluteDiff
MAX_SAMPLES_PER_REGION = 64


class HomeSelector:
    def __init__(self, seed: bytes = b""):
        self._seed = seed
        self._samples: dict[int, deque] = {}
        self._round: dict[int, float] = {}           # latencies of the current round

    def start_round(self) -> None:
        self._round = {}

    def add_sample(self, region: int, latency: float, now: float) -> None:
        if latency < 0:
            return
        q = self._samples.setdefault(region, deque(maxlen=MAX_SAMPLES_PER_REGION))
        q.append((now, latency))
        prev = self._round.get(region)
        self._round[region] = latency if prev is None else min(prev, latency)

    @property
    def round_latency(self) -> dict[int, float]:
        return dict(self._round)

    def best_recent(self, now: float) -> dict[int, float]:
        out = {}
        for region, q in self._samples.items():
            while q and now - q[0][0] > HISTORY:
                q.popleft()
            if q:
                out[region] = min(lat for _, lat in q)
        return out

    def choose(self, regions: dict, *, now: float, current: int = 0,
               current_active: bool = False, scores: dict | None = None) -> int:
        """regions: id -> object with `no_measure_no_home`; returns a region id (0: none)."""
        eligible = {r for r, reg in regions.items() if not getattr(reg, "no_measure_no_home", False)}
        if not eligible:
            return 0
        scores = scores or {}

        def scaled(region: int, lat: float) -> float:
            s = scores.get(region)
            return lat * s if isinstance(s, (int, float)) and s > 0 else lat

        best = {r: scaled(r, lat) for r, lat in self.best_recent(now).items() if r in eligible}
        if not best:                             # nothing answered (UDP and HTTPS blocked)
            return current if current in eligible else self.fallback(eligible)
        new = min(best, key=lambda r: (best[r], r))
        if current and current != new and current in eligible:
            reachable = current in self._round or current_active
            old = best.get(current)
            if reachable and old is not None and (
                    old - best[new] < ABSOLUTE_DIFF or best[new] > old * 2 / 3):
                return current
            if reachable and old is None:
                return current                   # active but unmeasured: no reason to move
        return new

    def fallback(self, eligible) -> int:
        """Go's pickDERPFallback: a stable pseudo-random region per node."""
        ids = sorted(eligible)
        if not ids:
            return 0
        h = int.from_bytes(hashlib.sha256(self._seed).digest()[:8], "big")
        return ids[h % len(ids)]


def derp_route(peer_home: int, last_heard: int, open_regions) -> int:
    """The region to send a peer's packet through (Go derpWriteChanForRegion): its home region
    when we hold that connection; else the region we last heard it on, if still open; else its
    home (to be dialed); a peer without a home is answered where it was heard."""
    if peer_home and peer_home in open_regions:
        return peer_home
    if last_heard and last_heard in open_regions:
        return last_heard
    return peer_home or last_heard
