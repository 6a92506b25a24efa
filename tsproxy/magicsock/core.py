"""Magicsock's decisions, sans-IO (PROTOCOL.md 5.6, 6.2-6.5): what an arriving datagram or DERP
frame is, which peer it belongs to, where each WireGuard datagram goes (direct UDP, DERP, or
both while discovery runs), disco ping/pong/call-me-maybe, STUN answers, and when it next needs
the clock.  No sockets, no event loop, no clock: `now` comes in, output queues go out.

    core = MagicCore(node_public, disco_private)
    core.set_peers(nodes); ep = core.endpoint_for(node)        # the device's endpoint for a peer
    wg = core.receive_datagrams([(data, (ip, port))], now)     # -> [(wg datagram, endpoint)]
    wg = core.receive_derp(region, src_node_key, data, now)    # -> (wg datagram, endpoint) | None
    core.send(device.datagrams_to_send(), now)                 # choose each datagram's path
    core.datagrams_to_send() -> [(data, (ip, port))]           # UDP: WireGuard, disco, STUN
    core.derp_frames_to_send() -> [(region, dst_node_key, data)]
    core.next_deadline(); core.handle_timer(now)               # heartbeats, ping timeouts

An endpoint in `receive_datagrams`' output is a `MagicPeer` when the source address is known,
else the raw `(ip, port)`; the device authenticates it and `adopt_roamed` then re-attaches the
peer's endpoint object (the device made the raw address its endpoint).
"""

from __future__ import annotations

import ipaddress
import os

from tsproxy.disco import stun
from tsproxy.disco import wire as disco
from tsproxy.keys import NodePublic
from tsproxy.magicsock.derp_home import HomeSelector, derp_route
from tsproxy.magicsock.paths import PeerPaths

MAX_LEARNED_ADDRS = 4096
MAX_STUN_PENDING = 256
DERP_MAGIC_IP = "127.3.3.40"      # Go's pseudo address for "via DERP region N" in pongs

Addr = tuple[str, int]

COUNTERS = ("rx_udp", "tx_udp", "tx_udp_errors", "tx_udp_blocked", "rx_derp", "tx_derp",
            "tx_derp_no_region", "rx_derp_unknown_peer", "rx_wg_unknown_source", "rx_stun",
            "rx_geneve_dropped", "disco_ping_rx", "disco_pong_rx", "disco_cmm_rx",
            "disco_cmm_udp_ignored", "disco_ping_tx", "disco_cmm_tx", "disco_from_unknown_peer",
            "derp_peer_gone", "derp_route_dropped", "home_changes", "https_latency_probes")


class MagicPeer:
    """A peer's WireGuard endpoint: the device sends to it, the core picks the path."""
    __slots__ = ("key", "raw", "disco", "paths", "rx_udp", "rx_derp", "tx_udp", "tx_derp")

    def __init__(self, key: NodePublic, rng=os.urandom):
        self.key = key
        self.raw = key.raw
        self.disco: bytes | None = None
        self.paths = PeerPaths(rng=rng)
        self.rx_udp = self.rx_derp = self.tx_udp = self.tx_derp = 0

    def __repr__(self) -> str:
        return f"peer:{self.key.short()}"

    def path_text(self) -> str:
        p = self.paths
        if p.best is not None:
            return "direct " + fmt_addr(p.best)
        region = p.home_derp or p.last_derp_region
        return f"derp {region}" if region else "-"


def fmt_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unmap(addr) -> Addr:
    """A STUN-mapped address as (ip, port), IPv4-mapped IPv6 folded back to IPv4."""
    host = str(addr[0])
    try:
        ip = ipaddress.ip_address(host)
        mapped = getattr(ip, "ipv4_mapped", None)
        host = str(mapped or ip)
    except ValueError:
        pass
    return host, int(addr[1])


class MagicCore:
    def __init__(self, node_public: NodePublic, disco_private, *, rng=os.urandom):
        self.node_public = node_public
        self.rng = rng
        self.codec = disco.DiscoCodec(disco_private)
        self.peers: dict[NodePublic, MagicPeer] = {}
        self._by_raw: dict[bytes, MagicPeer] = {}
        self._by_disco: dict[bytes, MagicPeer] = {}
        self._by_addr: dict[Addr, MagicPeer] = {}
        self.only_tcp_443 = False
        self.local_endpoints: list = []           # [(ip, port, kind)] we tell peers about
        self.derp_open: object = ()               # regions with a DERP connection (`in`)
        self.home_selector = HomeSelector(node_public.raw)
        self.region_latency: dict[int, float] = {}
        self.reflexive: Addr | None = None
        self.reflexive_changed = False            # the edge re-publishes our endpoints
        self.stun_answered = False                # the edge wakes a waiting netcheck
        self.wg_unknown_source = False            # the edge calls adopt_roamed after the device
        self.on_pong = None                       # (txid, now) -> None: `tailscale ping` waiters
        self._stun_pending: dict[bytes, tuple[int, float]] = {}
        self._udp_out: list = []
        self._derp_out: list = []
        self._deadline: float | None = None
        self.counters = {k: 0 for k in COUNTERS}

    # -- configuration -------------------------------------------------------------------------
    def endpoint_for(self, node) -> MagicPeer:
        key = node.key if hasattr(node, "key") else node
        ep = self.peers.get(key)
        if ep is None:
            ep = self.peers[key] = MagicPeer(key, self.rng)
            self._by_raw[key.raw] = ep
        return ep

    def set_peers(self, nodes) -> None:
        keep = set()
        for node in nodes:
            ep = self.endpoint_for(node)
            keep.add(node.key)
            ep.disco = node.disco_key.raw if node.disco_key is not None else None
            ep.paths.home_derp = node.home_derp
            ep.paths.set_endpoints([tuple(e) for e in node.endpoints])
        for key in [k for k in self.peers if k not in keep]:
            ep = self.peers.pop(key)
            self._by_raw.pop(ep.raw, None)
            for a in [a for a, p in self._by_addr.items() if p is ep]:
                del self._by_addr[a]
        self._by_disco = {ep.disco: ep for ep in self.peers.values() if ep.disco}
        self.codec.set_peers(self._by_disco)

    def set_node_key(self, node_public: NodePublic) -> None:
        """Our node key rotated: disco pings carry the new key, and every direct path is
        proven again (Go resetEndpointStates)."""
        self.node_public = node_public
        for ep in self.peers.values():
            ep.paths.note_connectivity_change()

    # -- receive -------------------------------------------------------------------------------
    def receive_datagram(self, data, addr: Addr, now: float) -> list:
        return self.receive_datagrams([(data, addr)], now)

    def receive_datagrams(self, batch, now: float) -> list:
        """UDP datagrams [(data, (ip, port))] -> the WireGuard ones [(data, endpoint)]; disco
        and STUN are handled here (replies queued), Geneve and junk counted."""
        out = []
        by_addr = self._by_addr
        for data, addr in batch:
            n = len(data)
            b0 = data[0] if n else 0
            if 1 <= b0 <= 4 and n >= 32:                   # WireGuard: the hot path
                ep = by_addr.get(addr)
                if ep is not None:
                    ep.rx_udp += n
                    out.append((data, ep))
                    continue
            data = bytes(data)
            kind = disco.looks_like(data)
            if kind == "disco":
                self._on_disco(data, addr, 0, None, now)
            elif kind == "stun":
                self._on_stun(data, now)
            elif kind == "geneve":
                self.counters["rx_geneve_dropped"] += 1
            else:
                self.counters["rx_wg_unknown_source"] += 1
                self.wg_unknown_source = True
                out.append((data, addr))
        self.counters["rx_udp"] += len(batch)
        return out

    def receive_derp(self, region: int, src: bytes, data, now: float):
        """A frame from `src` (node key bytes) on DERP region `region`."""
        self.counters["rx_derp"] += 1
        if data[:6] == disco.MAGIC:
            self._on_disco(bytes(data), None, region, src, now)
            return None
        ep = self._by_raw.get(bytes(src))
        if ep is None:
            self.counters["rx_derp_unknown_peer"] += 1
            return None
        ep.rx_derp += len(data)
        ep.paths.on_derp_receive(region)
        return data, ep

    def derp_peer_gone(self, region: int, src: bytes) -> None:
        """The peer left that server: stop answering it there (Go removeDerpPeerRoute)."""
        self.counters["derp_peer_gone"] += 1
        ep = self._by_raw.get(bytes(src))
        if ep is not None and ep.paths.last_derp_region == region:
            ep.paths.last_derp_region = 0
            self.counters["derp_route_dropped"] += 1

    def adopt_roamed(self, device_endpoints, now: float) -> list:
        """After the device authenticated WireGuard from unknown addresses: for each
        (peer key, device endpoint) whose endpoint became a raw address, remember that address
        for the peer and return (key, MagicPeer) pairs to put back as the device's endpoint."""
        self.wg_unknown_source = False
        out = []
        for key, raw in device_endpoints:
            if isinstance(raw, tuple):
                ep = self.peers.get(key)
                if ep is not None:
                    self._learn(raw, ep)
                    ep.paths.on_ping_from(raw, now)
                    out.append((key, ep))
        return out

    def _learn(self, addr: Addr, ep: MagicPeer) -> None:
        if addr not in self._by_addr and len(self._by_addr) >= MAX_LEARNED_ADDRS:
            self._by_addr.pop(next(iter(self._by_addr)))
        self._by_addr[addr] = ep

    # -- disco ---------------------------------------------------------------------------------
    def _on_disco(self, data: bytes, addr: Addr | None, region: int, derp_src, now: float):
        opened = self.codec.open(data)
        if opened is None:
            return                                          # counted by the codec
        sender, m = opened
        kind = m[0]
        if kind == "pong" and self.on_pong is not None:
            self.on_pong(bytes(m[1]), now)
        ep = self._by_disco.get(sender)
        if ep is None:
            self.counters["disco_from_unknown_peer"] += 1
            return
        if kind == "ping":
            self.counters["disco_ping_rx"] += 1
            txid = m[1]
            if addr is not None:
                ep.paths.on_ping_from(addr, now)
                self._learn(addr, ep)
                self._udp(self.codec.seal(sender, disco.build_pong(txid, addr)), addr)
            else:
                pong = self.codec.seal(sender, disco.build_pong(txid, (DERP_MAGIC_IP, region)))
                self._derp_out.append((region, bytes(derp_src), pong))
        elif kind == "pong":
            self.counters["disco_pong_rx"] += 1
            if addr is not None and ep.paths.on_pong(m[1], addr, now):
                self._learn(addr, ep)
        elif kind == "call_me_maybe":
            if addr is not None:
                self.counters["disco_cmm_udp_ignored"] += 1  # only trusted via DERP
                return
            if derp_src is not None and bytes(derp_src) != ep.raw:
                return
            self.counters["disco_cmm_rx"] += 1
            ep.paths.on_call_me_maybe(m[1], now)
            self._send_disco_for(ep)

    def _send_disco_for(self, ep: MagicPeer) -> None:
        paths = ep.paths
        if ep.disco is None:
            paths.take_pings()
            paths.take_call_me_maybe()
            return
        for addr, txid in paths.take_pings():
            self.counters["disco_ping_tx"] += 1
            self._udp(self.codec.seal(ep.disco, disco.build_ping(txid, self.node_public.raw)), addr)
        if paths.take_call_me_maybe():
            region = paths.home_derp or paths.last_derp_region
            eps = [(h, p) for h, p, _ in self.local_endpoints]
            if region and eps:
                self.counters["disco_cmm_tx"] += 1
                self._derp_out.append((region, ep.raw,
                                       self.codec.seal(ep.disco, disco.build_call_me_maybe(eps))))
        self._note_deadline(paths)

    def ping(self, key: NodePublic, now: float):
        """A disco ping (`tailscale ping`) over the peer's direct path when it has one, else
        through its DERP region (discovery starts, as for data).  -> (txid, addr, region) with
        the packet queued, or None when it cannot be sent; the pong reaches `on_pong`."""
        ep = self.peers.get(key)
        if ep is None or ep.disco is None:
            return None
        txid = self.rng(12)
        pkt = self.codec.seal(ep.disco, disco.build_ping(txid, self.node_public.raw))
        addr, region = ep.paths.send_plan(now)
        self._send_disco_for(ep)
        if addr is not None:
            if self.only_tcp_443:
                self.counters["tx_udp_blocked"] += 1
                return None
            ep.paths.pings[txid] = (addr, now)          # its pong refreshes the path's latency
            self._udp_out.append((pkt, addr))
            self._note_deadline(ep.paths)
        elif region:
            self._derp_out.append((region, ep.raw, pkt))
        else:
            return None
        return txid, addr, region          # the edge counts disco_ping_tx once it is sent

    def cancel_ping(self, key: NodePublic, txid: bytes) -> None:
        ep = self.peers.get(key)
        if ep is not None:
            ep.paths.pings.pop(txid, None)

    # -- STUN ----------------------------------------------------------------------------------
    def send_stun_probes(self, targets, now: float) -> None:
        """targets: [(region, [addr, ...])]; each region's addresses are raced (first answer
        counts for its latency)."""
        if len(self._stun_pending) > MAX_STUN_PENDING:
            self._stun_pending.clear()
        for region, addrs in targets:
            for addr in addrs:
                txid = self.rng(12)
                self._stun_pending[txid] = (region, now)
                self._udp(stun.build_request(txid), addr)

    def _on_stun(self, data: bytes, now: float) -> None:
        self.counters["rx_stun"] += 1
        r = stun.parse_response(data)
        if r is None:
            return
        txid, mapped = r
        pending = self._stun_pending.pop(txid, None)
        if pending is None:
            return
        region, sent = pending
        self.region_latency[region] = now - sent
        self.home_selector.add_sample(region, now - sent, now)
        self.stun_answered = True
        if mapped is not None:
            mapped = _unmap(mapped)
            if mapped != self.reflexive:
                self.reflexive = mapped
                self.reflexive_changed = True

    # -- send ----------------------------------------------------------------------------------
    def send(self, datagrams, now: float) -> None:
        """The device's output [(data, endpoint)]: each datagram to its peer's path(s)."""
        udp, derp = self._udp_out, self._derp_out
        only_tcp = self.only_tcp_443
        open_regions = self.derp_open
        direct_ep = direct_addr = None     # the last peer whose plan was "this UDP path only"
        direct_bytes = 0
        for data, ep in datagrams:
            if ep is direct_ep:
                # the same peer again in this batch at the same `now`: its plan (a trusted
                # direct path, nothing to discover) cannot have changed since the last datagram
                udp.append((data, direct_addr))
                direct_bytes += len(data)
                continue
            if direct_ep is not None:
                direct_ep.tx_udp += direct_bytes
                direct_ep = None
            if type(ep) is MagicPeer:
                paths = ep.paths
                idle = paths.next_heartbeat is None
                addr, region = paths.send_plan(now)
                if only_tcp and addr is not None:
                    addr = None
                    region = region or paths.home_derp or paths.last_derp_region
                if addr is not None:
                    udp.append((data, addr))
                    ep.tx_udp += len(data)
                if region:
                    region = derp_route(paths.home_derp, paths.last_derp_region, open_regions)
                    ep.tx_derp += len(data)
                    derp.append((region, ep.raw, data))
                elif addr is None:
                    self.counters["tx_derp_no_region"] += 1
                if paths.has_disco_out:
                    self._send_disco_for(ep)
                elif idle:
                    self._note_deadline(paths)        # the heartbeat just started
                elif addr is not None and not region:
                    direct_ep, direct_addr, direct_bytes = ep, addr, 0
            elif only_tcp:
                self.counters["tx_udp_blocked"] += 1
            else:
                udp.append((data, ep))
        if direct_ep is not None:
            direct_ep.tx_udp += direct_bytes

    def _udp(self, data: bytes, addr: Addr) -> None:
        if self.only_tcp_443:
            self.counters["tx_udp_blocked"] += 1
        else:
            self._udp_out.append((data, addr))

    def datagrams_to_send(self) -> list:
        out, self._udp_out = self._udp_out, []
        return out

    def derp_frames_to_send(self) -> list:
        out, self._derp_out = self._derp_out, []
        return out

    # -- timers --------------------------------------------------------------------------------
    def _note_deadline(self, paths: PeerPaths) -> None:
        d = paths.next_deadline()
        if d is not None and (self._deadline is None or d < self._deadline):
            self._deadline = d

    def next_deadline(self) -> float | None:
        """The earliest path timer (heartbeat, ping timeout); may be early, never late."""
        return self._deadline

    def postpone_timers(self, until: float) -> None:
        """After a failed handle_timer: try again at `until` rather than at once."""
        self._deadline = until

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        earliest = None
        for ep in self.peers.values():
            paths = ep.paths
            d = paths.next_deadline()
            if d is not None and d <= now:
                paths.handle_timer(now)
                if paths.has_disco_out:
                    self._send_disco_for(ep)
                d = paths.next_deadline()
            if d is not None and (earliest is None or d < earliest):
                earliest = d
        self._deadline = earliest

    # -- status --------------------------------------------------------------------------------
    def peer_status(self, device_status: dict) -> list[dict]:
        """device_status: WgDevice.peer_status() by base64 public key."""
        out = []
        for key, ep in self.peers.items():
            d = device_status.get(key.b64(), {})
            lat = ep.paths.best_latency
            out.append({"node_key": key.text(), "path": ep.path_text(),
                        "latency_ms": round(lat * 1000, 2) if lat is not None else None,
                        "last_handshake": d.get("last_handshake"),
                        "handshakes": d.get("handshakes", 0),
                        "rx_bytes": d.get("rx_bytes", 0), "tx_bytes": d.get("tx_bytes", 0),
                        "rx_packets": d.get("rx_packets", 0), "tx_packets": d.get("tx_packets", 0),
                        "rx_udp_bytes": ep.rx_udp, "rx_derp_bytes": ep.rx_derp,
                        "tx_udp_bytes": ep.tx_udp, "tx_derp_bytes": ep.tx_derp,
                        "endpoints": [f"{h}:{p}" for h, p in ep.paths.candidates]})
        return out


# -- STUN targets from the DERP map (pure) ---------------------------------------------------------
def _literal(text: str) -> str | None:
    if text in ("", "none"):
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def stun_targets(node, resolved: dict, v6_ok: bool) -> list[Addr]:
    """STUN addresses of a DERP node: its IPv4 and IPv6 (raced: both probed), or the
    addresses its HostName resolved to when it names neither (Headscale's embedded region)."""
    if node.stun_port is not None and node.stun_port < 0:
        return []
    port = node.stun_port or 3478
    ips = [ip for ip in (_literal(node.ipv4), _literal(node.ipv6) if v6_ok else None) if ip]
    if not ips:
        host = _literal(node.host_name)
        ips = [host] if host else list(resolved.get(node.host_name, ()))
    return [(ip, port) for ip in ips if v6_ok or ":" not in ip]


def needs_dns(node) -> bool:
    return (not (node.stun_port is not None and node.stun_port < 0)
            and _literal(node.ipv4) is None and _literal(node.ipv6) is None
            and _literal(node.host_name) is None and bool(node.host_name))


def region_stun_targets(derp_map, resolved: dict, v6_ok: bool) -> list:
    """[(region, [addr, ...])]: the first node of each measured region that has STUN."""
    out = []
    for rid, region in derp_map.regions.items():
        if region.no_measure_no_home:
            continue
        for node in region.nodes:
            targets = stun_targets(node, resolved, v6_ok)
            if targets:
                out.append((rid, targets))
                break
    return out
