"""Per-peer path choice: direct UDP when a pong proves it, DERP otherwise (PROTOCOL.md 6.3-6.5).

A `PeerPaths` holds one peer's candidate UDP endpoints, the best proven address with its
latency, how long that address is trusted, outstanding disco pings and the heartbeat.  It is
sans-IO: callers ask `send_plan(now)` where a WireGuard datagram should go, feed pongs, pings
and call-me-maybes, and collect `take_pings()` / `take_call_me_maybe()` to transmit.

Addresses are `(ip_str, port)` tuples; the DERP path is the peer's home region id.
"""

from __future__ import annotations

import ipaddress
import os

HEARTBEAT_INTERVAL = 3.0
SESSION_ACTIVE_TIMEOUT = 45.0
TRUST_UDP_ADDR_DURATION = 6.5
PING_TIMEOUT = 5.0
DISCO_PING_INTERVAL = 5.0
UPGRADE_INTERVAL = 60.0
GOOD_ENOUGH_LATENCY = 0.005
MAX_CANDIDATES = 64
MAX_OUTSTANDING_PINGS = 128

Addr = tuple[str, int]

# Go's netip.Addr.IsPrivate: RFC 1918 and ULA only (Python's is_private also counts TEST-NETs).
_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]


def _addr_bonus(addr: Addr) -> int:
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:
        return 0
    bonus = 0
    if ip.is_loopback:
        bonus += 50
    elif ip.is_link_local:
        bonus += 30
    elif any(ip in n for n in _PRIVATE if n.version == ip.version):
        bonus += 20
    if ip.version == 6:
        bonus += 10
    return bonus


def better_addr(a: Addr, a_latency: float, b: Addr | None, b_latency: float | None) -> bool:
    """Is the measured path `a` better than the current best `b`?  (Go `betterAddr`.)

    Latency improvement in percent of the slower path plus address-kind bonuses; a new path
    must win by more than one point so two similar paths do not flap."""
    if b is None or b_latency is None:
        return True
    if a == b:
        return False
    slower = max(a_latency, b_latency, 1e-9)
    a_score = (b_latency - a_latency) / slower * 100 if a_latency < b_latency else 0.0
    b_score = (a_latency - b_latency) / slower * 100 if b_latency < a_latency else 0.0
    a_score += _addr_bonus(a)
    b_score += _addr_bonus(b)
    if b_score == 0:
        return a_score > 1
    return a_score > b_score


class PeerPaths:
    """Path state for one peer.  `home_derp` 0 means the peer has no DERP home."""

    def __init__(self, *, home_derp: int = 0, endpoints=(), rng=os.urandom):
        self.rng = rng
        self.home_derp = home_derp
        self.last_derp_region = 0          # where we last heard from it over DERP
        self.candidates: dict[Addr, float] = {}      # addr -> last ping sent (0 = never)
        self.best: Addr | None = None
        self.best_latency: float | None = None
        self.trust_until = 0.0
        self.last_full_discovery = -1e9
        self.last_send = -1e9
        self.next_heartbeat: float | None = None
        self.pings: dict[bytes, tuple[Addr, float]] = {}   # txid -> (addr, sent)
        self._ping_out: list[tuple[Addr, bytes]] = []
        self._cmm_due = False
        self.counters = {"pings_sent": 0, "pongs_matched": 0, "pongs_unknown": 0, "ping_timeouts": 0}
        self._netmap_eps: set[Addr] = set()
        self.set_endpoints(endpoints)

    # -- inputs ----------------------------------------------------------------------------
    def set_endpoints(self, endpoints) -> None:
        """Endpoints from the netmap replace the netmap-derived candidates (keep ping times)."""
        new = {tuple(ep) for ep in endpoints}
        for ep in self._netmap_eps - new:
            if ep != self.best:
                self.candidates.pop(ep, None)
        self._netmap_eps = set()
        for ep in new:
            if ep in self.candidates or len(self.candidates) < MAX_CANDIDATES:
                self.candidates.setdefault(ep, 0.0)
                self._netmap_eps.add(ep)

    def on_call_me_maybe(self, endpoints, now: float) -> None:
        """The peer asks us to ping these now (its NAT is opening toward us)."""
        for ep in endpoints:
            ep = tuple(ep)
            try:
                if ipaddress.ip_address(ep[0]).is_link_local:
                    continue
            except ValueError:
                continue
            if ep in self.candidates or len(self.candidates) < MAX_CANDIDATES:
                self.candidates[ep] = 0.0          # reset its ping timer: ping at once
        self._discover(now, send_cmm=False)

    def on_ping_from(self, addr: Addr, now: float) -> None:
        """A disco ping reached us over UDP from addr: a candidate for the way back."""
        if addr not in self.candidates and len(self.candidates) < MAX_CANDIDATES:
            self.candidates[addr] = 0.0

    def on_pong(self, txid: bytes, src: Addr, now: float) -> bool:
        """A pong for one of our pings; True if it matched."""
        sent = self.pings.pop(txid, None)
        if sent is None:
            self.counters["pongs_unknown"] += 1
            return False
        addr, sent_at = sent
        if addr != src:
            # the pong came back from elsewhere than we pinged: the path is not symmetric
            self.counters["pongs_unknown"] += 1
            return False
        self.counters["pongs_matched"] += 1
        latency = max(now - sent_at, 0.0)
        if self.best == addr:
            self.best_latency = latency
        elif better_addr(addr, latency, self.best, self.best_latency):
            self.best, self.best_latency = addr, latency
        if self.best == addr:
            self.trust_until = now + TRUST_UDP_ADDR_DURATION
        return True

    def note_connectivity_change(self) -> None:
        """Our key or network changed (Go noteConnectivityChange): the direct path must be
        proven again before it is trusted alone, and the DERP reply route (tied to a
        connection that is being replaced) is forgotten."""
        self.trust_until = 0.0
        self.last_derp_region = 0

    def on_derp_receive(self, region: int) -> None:
        self.last_derp_region = region

    # -- outputs ---------------------------------------------------------------------------
    def send_plan(self, now: float) -> tuple[Addr | None, int]:
        """Where to send a data packet now: (udp addr or None, derp region or 0)."""
        self.last_send = now
        if self.next_heartbeat is None:
            self.next_heartbeat = now + HEARTBEAT_INTERVAL
        if self.best is not None and now <= self.trust_until:
            return self.best, 0
        self._discover(now, send_cmm=True)
        region = self.home_derp or self.last_derp_region
        return self.best, region

    @property
    def has_disco_out(self) -> bool:
        """Pings or a call-me-maybe are waiting to be sent."""
        return bool(self._ping_out) or self._cmm_due

    def take_pings(self) -> list[tuple[Addr, bytes]]:
        out, self._ping_out = self._ping_out, []
        return out

    def take_call_me_maybe(self) -> bool:
        due, self._cmm_due = self._cmm_due, False
        return due

    def next_deadline(self) -> float | None:
        deadlines = [sent + PING_TIMEOUT for _, sent in self.pings.values()]
        if self.next_heartbeat is not None:
            deadlines.append(self.next_heartbeat)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        for txid, (addr, sent) in list(self.pings.items()):
            if now >= sent + PING_TIMEOUT:
                del self.pings[txid]
                self.counters["ping_timeouts"] += 1
                if addr == self.best and now > self.trust_until:
                    # the proven path stopped answering: forget it, DERP carries traffic again
                    self.best = self.best_latency = None
        if self.next_heartbeat is not None and now >= self.next_heartbeat:
            if now - self.last_send > SESSION_ACTIVE_TIMEOUT:
                self.next_heartbeat = None           # idle: stop heartbeats until the next send
            else:
                self.next_heartbeat = now + HEARTBEAT_INTERVAL
                self._heartbeat(now)

    # -- internals -------------------------------------------------------------------------
    def _heartbeat(self, now: float) -> None:
        if self.best is not None:
            self._ping(self.best, now)
        needs_upgrade = (now - self.last_full_discovery >= UPGRADE_INTERVAL
                         and (self.best_latency or 0) > GOOD_ENOUGH_LATENCY)
        if self.best is None or now > self.trust_until or needs_upgrade:
            self._discover(now, send_cmm=True)

    def _discover(self, now: float, send_cmm: bool) -> None:
        sent_any = False
        for addr, last in self.candidates.items():
            if now - last >= DISCO_PING_INTERVAL or last == 0.0:
                if self._ping(addr, now):
                    sent_any = True
        if sent_any:
            self.last_full_discovery = now
            if send_cmm and self.home_derp:
                self._cmm_due = True

    def _ping(self, addr: Addr, now: float) -> bool:
        if len(self.pings) >= MAX_OUTSTANDING_PINGS:
            return False
        txid = self.rng(12)
        self.pings[txid] = (addr, now)
        self.candidates[addr] = now
        self._ping_out.append((addr, txid))
        self.counters["pings_sent"] += 1
        return True
