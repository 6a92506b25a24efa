"""MagicConn: WireGuard over direct UDP and DERP relays, with disco choosing the path.

One UDP socket carries WireGuard, disco and STUN; every readable event drains it.  DERP
connections (the home region, plus peers' home regions on demand) deliver packets tagged with
the sender's node key.  Each peer is one stable WireGuard endpoint object (`_Peer`); when the
device sends to it, `PeerPaths.send_plan` picks a proven direct address, or DERP plus the best
unproven address while discovery runs (PROTOCOL.md 5.6, 6.2-6.5).

    magic = await MagicConn.create(device, node_private=..., disco_private=...,
                                   on_packets=netstack.deliver, on_endpoints=..., on_home_derp=...)
    magic.set_derp_map(nm.derp_map); magic.set_peers(nodes)
    apply_peer_diff(device, diff, endpoint_for=magic.endpoint_for)
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from typing import Callable

from tsproxy.aio import DeadlineTimer, UdpAddrs, bind_udp
from tsproxy.derp.aio import DerpConnection, https_latency
from tsproxy.disco import stun
from tsproxy.disco import wire as disco
from tsproxy.keys import NodePublic
from tsproxy.magicsock.derp_home import HomeSelector, derp_route
from tsproxy.magicsock.paths import PeerPaths

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65536
MAX_PER_WAKEUP = 4096
TICK = 0.25                       # path timers (heartbeat 3 s, ping timeout 5 s) granularity
RESTUN_MIN, RESTUN_MAX = 20.0, 26.0
DERP_IDLE_CLOSE = 60.0
DERP_CLEAN_INTERVAL = 15.0
STUN_WAIT = 1.0                   # how long the home-region probe waits for answers
HTTPS_PROBE_TIMEOUT = 3.0         # HTTPS latency fallback per region (UDP blocked)
HOME_ACTIVE_WINDOW = 8.0          # a home that sent us a frame this recently is reachable
DNS_TIMEOUT = 2.0
MAX_LEARNED_ADDRS = 4096
DERP_MAGIC_IP = "127.3.3.40"      # Go's pseudo address for "via DERP region N" in pongs

Addr = tuple[str, int]


class _Peer:
    """A peer's WireGuard endpoint: the device sends to it, MagicConn picks the path."""
    __slots__ = ("key", "raw", "disco", "paths", "rx_udp", "rx_derp", "tx_udp", "tx_derp")

    def __init__(self, key: NodePublic):
        self.key = key
        self.raw = key.raw
        self.disco: bytes | None = None
        self.paths = PeerPaths()
        self.rx_udp = self.rx_derp = self.tx_udp = self.tx_derp = 0

    def __repr__(self) -> str:
        return f"peer:{self.key.short()}"

    def path_text(self) -> str:
        p = self.paths
        if p.best is not None:
            host, port = p.best
            return f"direct [{host}]:{port}" if ":" in host else f"direct {host}:{port}"
        region = p.home_derp or p.last_derp_region
        return f"derp {region}" if region else "-"


class _Derp:
    __slots__ = ("conn", "task", "last_used")

    def __init__(self, conn, task, now):
        self.conn, self.task, self.last_used = conn, task, now


def _node_dict(node) -> dict:
    """messages.DERPNode -> the DERPNode JSON shape DerpConnection understands."""
    return {"Name": node.name, "HostName": node.host_name, "IPv4": node.ipv4, "IPv6": node.ipv6,
            "CertName": node.cert_name, "DERPPort": node.derp_port,
            "InsecureForTests": node.insecure_for_tests}


def _literal(text: str) -> str | None:
    if text in ("", "none"):
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _stun_targets(node, resolved: dict, v6_ok: bool) -> list[Addr]:
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


def _needs_dns(node) -> bool:
    return (not (node.stun_port is not None and node.stun_port < 0)
            and _literal(node.ipv4) is None and _literal(node.ipv6) is None
            and _literal(node.host_name) is None and bool(node.host_name))


def local_addresses() -> list[str]:
    """Non-loopback, non-link-local interface addresses (IPv4 by ioctl, IPv6 from /proc)."""
    out = []
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            ip = ipaddress.ip_address(res[20:24])
            if not ip.is_loopback and not ip.is_link_local:
                out.append(str(ip))
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                ip = ipaddress.ip_address(bytes.fromhex(line.split()[0]))
                if not ip.is_loopback and not ip.is_link_local:
                    out.append(str(ip))
    except OSError:
        pass
    return out



class MagicConn:
    def __init__(self, device, sock: socket.socket, *, node_private, disco_private,
                 on_packets: Callable[[list], None], on_endpoints=None, on_home_derp=None,
                 trust=None):
        self.device = device
        self.trust = trust                  # tlsconfig.aio.Trust for DERP (None: system roots)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.node_private = node_private
        self.node_public = node_private.public()
        self.codec = disco.DiscoCodec(disco_private)
        self.on_packets = on_packets
        self.on_endpoints = on_endpoints or (lambda eps: None)
        self.only_tcp_443 = False
        self.on_home_derp = on_home_derp or (lambda region: None)
        self.addrs = UdpAddrs(sock.family)
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)
        self.peers: dict[NodePublic, _Peer] = {}
        self._by_raw: dict[bytes, _Peer] = {}
        self._by_disco: dict[bytes, _Peer] = {}
        self._by_addr: dict[Addr, _Peer] = {}
        self.derp_map = None
        self.home = 0
        self.derps: dict[int, _Derp] = {}
        self._stun_pending: dict[bytes, tuple[int, float]] = {}
        self.region_latency: dict[int, float] = {}
        self.home_selector = HomeSelector(self.node_public.raw)
        self._stun_dns: dict[str, list[str]] = {}
        self._netcheck_task: asyncio.Task | None = None
        self._netcheck_again = False
        self.reflexive: Addr | None = None
        self._endpoints: list = []
        self._timer = DeadlineTimer(self.loop, self._on_timer)
        self._tasks: set[asyncio.Task] = set()
        self._next_stun = 0.0
        self._next_derp_clean = 0.0
        self.closed = False
        self.counters = {k: 0 for k in (
            "rx_udp", "tx_udp", "tx_udp_errors", "tx_udp_blocked", "rx_derp", "tx_derp", "tx_derp_no_region",
            "rx_derp_unknown_peer", "rx_wg_unknown_source", "rx_stun", "rx_geneve_dropped",
            "disco_ping_rx", "disco_pong_rx", "disco_cmm_rx", "disco_cmm_udp_ignored",
            "disco_ping_tx", "disco_cmm_tx", "disco_from_unknown_peer", "derp_peer_gone",
            "derp_route_dropped", "home_changes", "https_latency_probes")}
        device.wall_offset = time.time() - self.loop.time()
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self._tick_handle = self.loop.call_later(TICK, self._tick)
        self._refresh_endpoints()

    @classmethod
    async def create(cls, device, *, node_private, disco_private, port: int = 0,
                     host: str | None = None, on_packets, on_endpoints=None,
                     on_home_derp=None, trust=None) -> "MagicConn":
        return cls(device, bind_udp(host, port), node_private=node_private,
                   disco_private=disco_private, on_packets=on_packets,
                   on_endpoints=on_endpoints, on_home_derp=on_home_derp, trust=trust)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    # -- configuration ---------------------------------------------------------------------------
    def endpoint_for(self, node) -> _Peer:
        key = node.key if hasattr(node, "key") else node
        ep = self.peers.get(key)
        if ep is None:
            ep = self.peers[key] = _Peer(key)
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

    def set_private_key(self, node_private) -> None:
        """Node key rotated: every DERP connection re-dials under the new key (peers address
        DERP packets to it, and servers that admit only current keys refuse the old one);
        disco pings carry our node key, so they follow self.node_public; every peer's direct
        path is re-proven (as Go's SetPrivateKey does)."""
        if node_private.raw == self.node_private.raw:
            return
        self.node_private = node_private
        self.node_public = node_private.public()
        for entry in self.derps.values():
            entry.conn.set_private_key(node_private)
        for ep in self.peers.values():           # Go resetEndpointStates
            ep.paths.note_connectivity_change()
        log.info("node key rotated: reconnecting %d DERP connection(s)", len(self.derps))

    def set_derp_map(self, derp_map) -> None:
        changed = derp_map != self.derp_map       # called on every netmap; act on changes
        self.derp_map = derp_map
        for region in [r for r in self.derps if r not in derp_map.regions]:
            self._close_derp(region)
        if self.home not in derp_map.regions:
            self.home = 0
        if derp_map.regions and (changed or not self.home):
            self._start_netcheck()             # re-run the home choice on the new map now

    # -- DERP ------------------------------------------------------------------------------------
    def _start_netcheck(self) -> None:
        if self._netcheck_task is not None and not self._netcheck_task.done():
            self._netcheck_again = True        # the map changed mid-round: run once more
            return
        self._netcheck_task = self.loop.create_task(self._netcheck(), name="netcheck")
        self._tasks.add(self._netcheck_task)
        self._netcheck_task.add_done_callback(self._tasks.discard)

    async def _netcheck(self) -> None:
        """One netcheck round (every 20-26 s): STUN every region (HTTPS latency when no STUN
        answer comes back, e.g. UDP blocked), then re-choose home with hysteresis."""
        try:
            await self._resolve_stun_names()
            sel = self.home_selector
            sel.start_round()
            self._send_stun_probes()
            regions = self.derp_map.regions
            deadline = self.loop.time() + STUN_WAIT
            while self.loop.time() < deadline and len(sel.round_latency) < len(regions):
                await asyncio.sleep(0.05)
            if not sel.round_latency:
                await self._https_latency(regions)
            if self.closed or self.derp_map is None:
                return
            self._apply_home(self._pick_home())
        except Exception:
            log.exception("netcheck failed")
        finally:
            if self._netcheck_again and not self.closed:
                self._netcheck_again = False
                self.loop.call_soon(self._start_netcheck)   # after this task has finished

    def _pick_home(self) -> int:
        regions = self.derp_map.regions
        now = self.loop.time()
        entry = self.derps.get(self.home)
        # last_rx is on the DERP connection's clock (time.monotonic), not the loop's
        active = entry is not None and \
            time.monotonic() - entry.conn.last_rx < HOME_ACTIVE_WINDOW
        hp = self.derp_map.home_params or {}
        raw = hp.get("RegionScore") if isinstance(hp, dict) else None
        scores = {}
        for k, v in (raw.items() if isinstance(raw, dict) else ()):
            try:
                scores[int(k)] = float(v)
            except (TypeError, ValueError):
                continue
        return self.home_selector.choose(regions, now=now, current=self.home,
                                         current_active=active, scores=scores)

    def _apply_home(self, home: int) -> None:
        if not home or home == self.home:
            if home:
                self._derp(home)
            return
        old, self.home = self.home, home
        self.counters["home_changes"] += 1
        if old and old in self.derps:
            self.derps[old].conn.set_preferred(False)   # stays open while used, then idles out
        conn = self._derp(home)
        if conn is not None:
            conn.set_preferred(True)
        lat = self.home_selector.round_latency.get(home)
        log.info("DERP home region %d%s", home, f" ({lat * 1000:.1f} ms)" if lat else "")
        self.on_home_derp(home)

    async def _resolve_stun_names(self) -> None:
        names = {n.host_name for r in self.derp_map.regions.values() for n in r.nodes
                 if _needs_dns(n)}
        for name in names:
            try:
                infos = await asyncio.wait_for(
                    self.loop.getaddrinfo(name, None, type=socket.SOCK_DGRAM), DNS_TIMEOUT)
            except (OSError, TimeoutError) as e:
                log.debug("cannot resolve DERP node %s for STUN: %s", name, e)
                continue
            self._stun_dns[name] = list(dict.fromkeys(i[4][0] for i in infos))

    async def _https_latency(self, regions) -> None:
        async def probe(rid, region):
            nodes = [n for n in region.nodes if not n.stun_only]
            if not nodes:
                return
            self.counters["https_latency_probes"] += 1
            lat = await https_latency(_node_dict(nodes[0]), timeout=HTTPS_PROBE_TIMEOUT)
            if lat is not None:
                self.home_selector.add_sample(rid, lat, self.loop.time())
                self.region_latency[rid] = lat
        await asyncio.gather(*(probe(r, reg) for r, reg in regions.items()
                               if not reg.no_measure_no_home))

    def _derp(self, region: int) -> DerpConnection | None:
        entry = self.derps.get(region)
        now = self.loop.time()
        if entry is not None:
            entry.last_used = now
            return entry.conn
        if self.closed or self.derp_map is None or region not in self.derp_map.regions:
            return None                           # closed: aclose() would never stop a new one
        if not any(not n.stun_only for n in self.derp_map.regions[region].nodes):
            return None
        conn = DerpConnection(lambda r=region: self._region_nodes(r), self.node_private,
                              on_packet=lambda src, data, r=region: self._on_derp(r, src, data),
                              on_event=lambda ev, r=region: self._on_derp_event(r, ev),
                              preferred=(region == self.home), trust=self.trust)
        task = self.loop.create_task(conn.run(), name=f"derp-{region}")
        self.derps[region] = _Derp(conn, task, now)
        return conn

    def _region_nodes(self, region: int) -> list[dict]:
        """The region's nodes in the DERP map as it is now (read on every connect)."""
        reg = self.derp_map.regions.get(region) if self.derp_map is not None else None
        return [_node_dict(n) for n in reg.nodes if not n.stun_only] if reg else []

    def _on_derp_event(self, region: int, ev) -> None:
        if ev[0] == "peer_gone":
            # the peer left that server: stop answering it there (Go removeDerpPeerRoute)
            self.counters["derp_peer_gone"] += 1
            ep = self._by_raw.get(bytes(ev[1]))
            if ep is not None and ep.paths.last_derp_region == region:
                ep.paths.last_derp_region = 0
                self.counters["derp_route_dropped"] += 1

    def _close_derp(self, region: int) -> None:
        entry = self.derps.pop(region, None)
        if entry is not None:
            self._spawn(entry.conn.close())
            entry.task.cancel()
            self._tasks.add(entry.task)           # aclose() waits for it to finish
            entry.task.add_done_callback(self._tasks.discard)

    def _derp_send(self, region: int, dst: bytes, data: bytes) -> bool:
        conn = self._derp(region)
        if conn is None:
            self.counters["tx_derp_no_region"] += 1
            return False
        self.counters["tx_derp"] += 1
        return conn.send(dst, data)

    def _on_derp(self, region: int, src: bytes, data: bytes) -> None:
        self.counters["rx_derp"] += 1
        if data[:6] == disco.MAGIC:
            self._on_disco(data, None, region, src)
            self._flush()
            return
        ep = self._by_raw.get(bytes(src))
        if ep is None:
            self.counters["rx_derp_unknown_peer"] += 1
            return
        ep.rx_derp += len(data)
        ep.paths.on_derp_receive(region)
        entry = self.derps.get(region)
        if entry is not None:
            entry.last_used = self.loop.time()
        self.device.receive_datagram(data, ep, self.loop.time())
        self._after_input()

    # -- UDP receive -----------------------------------------------------------------------------
    def _on_readable(self) -> None:
        recvfrom_into = self.sock.recvfrom_into
        view = self._view
        receive = self.device.receive_datagram
        by_addr = self._by_addr
        now = self.loop.time()
        n_read = 0
        wg_unknown = False
        while n_read < MAX_PER_WAKEUP:
            try:
                n, raw_addr = recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("udp receive error: %s", e)
                break
            n_read += 1
            addr = self.addrs.norm(raw_addr)
            b0 = view[0] if n else 0
            if 1 <= b0 <= 4 and n >= 32:                   # WireGuard: the hot path
                ep = by_addr.get(addr)
                if ep is not None:
                    ep.rx_udp += n
                    receive(bytes(view[:n]), ep, now)
                    continue
            data = bytes(view[:n])
            kind = disco.looks_like(data)
            if kind == "disco":
                self._on_disco(data, addr, 0, None)
            elif kind == "stun":
                self._on_stun(data, addr, now)
            elif kind == "geneve":
                self.counters["rx_geneve_dropped"] += 1
            else:
                self.counters["rx_wg_unknown_source"] += 1
                receive(data, addr, now)
                wg_unknown = True
        self.counters["rx_udp"] += n_read
        if wg_unknown:
            self._adopt_roamed()
        self._after_input()

    def _adopt_roamed(self) -> None:
        """A WireGuard packet from an address we did not know authenticated: the device made
        that raw address the peer's endpoint.  Put our endpoint object back and remember the
        address as a way to reach that peer."""
        for key, wg_peer in self.device.peers.items():
            ep_obj = wg_peer.endpoint
            if isinstance(ep_obj, tuple):
                ep = self.peers.get(key)
                if ep is not None:
                    self._learn(ep_obj, ep)
                    ep.paths.on_ping_from(ep_obj, self.loop.time())
                    self.device.update_peer(key, endpoint=ep)

    def _learn(self, addr: Addr, ep: _Peer) -> None:
        if addr not in self._by_addr and len(self._by_addr) >= MAX_LEARNED_ADDRS:
            self._by_addr.pop(next(iter(self._by_addr)))
        self._by_addr[addr] = ep

    def _after_input(self) -> None:
        pkts = self.device.take_packets()
        if pkts:
            self.on_packets(pkts)
        self._flush()

    # -- disco -----------------------------------------------------------------------------------
    def _on_disco(self, data: bytes, addr: Addr | None, region: int, derp_src: bytes | None):
        opened = self.codec.open(data)
        if opened is None:
            return                                          # counted by the codec
        sender, m = opened
        ep = self._by_disco.get(sender)
        if ep is None:
            self.counters["disco_from_unknown_peer"] += 1
            return
        now = self.loop.time()
        kind = m[0]
        if kind == "ping":
            self.counters["disco_ping_rx"] += 1
            txid = m[1]
            if addr is not None:
                ep.paths.on_ping_from(addr, now)
                self._learn(addr, ep)
                self._send_udp(self.codec.seal(sender, disco.build_pong(txid, addr)), addr)
            else:
                pong = self.codec.seal(sender, disco.build_pong(txid, (DERP_MAGIC_IP, region)))
                self._derp_send(region, derp_src, pong)
        elif kind == "pong":
            self.counters["disco_pong_rx"] += 1
            if addr is not None and ep.paths.on_pong(m[1], addr, now):
                self._learn(addr, ep)
        elif kind == "call_me_maybe":
            if addr is not None:
                self.counters["disco_cmm_udp_ignored"] += 1  # only trusted via DERP
                return
            if derp_src is not None and derp_src != ep.raw:
                return
            self.counters["disco_cmm_rx"] += 1
            ep.paths.on_call_me_maybe(m[1], now)
            self._send_disco_for(ep)

    def _send_disco_for(self, ep: _Peer) -> None:
        if ep.disco is None:
            ep.paths.take_pings()
            ep.paths.take_call_me_maybe()
            return
        for addr, txid in ep.paths.take_pings():
            self.counters["disco_ping_tx"] += 1
            self._send_udp(self.codec.seal(ep.disco, disco.build_ping(txid, self.node_public.raw)),
                           addr)
        if ep.paths.take_call_me_maybe():
            region = ep.paths.home_derp or ep.paths.last_derp_region
            eps = [(h, p) for h, p, _ in self._endpoints]
            if region and eps:
                self.counters["disco_cmm_tx"] += 1
                self._derp_send(region, ep.raw,
                                self.codec.seal(ep.disco, disco.build_call_me_maybe(eps)))

    # -- STUN and endpoints ----------------------------------------------------------------------
    def _send_stun_probes(self) -> None:
        if self.derp_map is None:
            return
        now = self.loop.time()
        v6_ok = self.addrs.family == socket.AF_INET6
        if len(self._stun_pending) > 256:
            self._stun_pending.clear()
        for rid, region in self.derp_map.regions.items():
            if region.no_measure_no_home:
                continue
            for node in region.nodes:
                targets = _stun_targets(node, self._stun_dns, v6_ok)
                if not targets:
                    continue
                for target in targets:           # IPv4 and IPv6 raced: first answer counts
                    txid = os.urandom(12)
                    self._stun_pending[txid] = (rid, now)
                    self._send_udp(stun.build_request(txid), target)
                break

    def _on_stun(self, data: bytes, addr: Addr, now: float) -> None:
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
        if mapped is not None:
            mapped = self.addrs.norm(tuple(mapped))
            if mapped != self.reflexive:
                self.reflexive = mapped
                self._refresh_endpoints()

    def _refresh_endpoints(self) -> None:
        port = self.port
        eps = []
        try:
            addrs = local_addresses()
        except OSError:
            addrs = []
        v6_ok = self.addrs.family == socket.AF_INET6
        for ip in addrs:
            if ":" in ip and not v6_ok:
                continue
            eps.append((ip, port, 1))
        if self.reflexive is not None and (self.reflexive[0], self.reflexive[1]) not in \
                {(h, p) for h, p, _ in eps}:
            eps.append((self.reflexive[0], self.reflexive[1], 2))
        if eps != self._endpoints:
            self._endpoints = eps
            self.on_endpoints(list(eps))

    def local_endpoints(self) -> list:
        return list(self._endpoints)

    # -- send ------------------------------------------------------------------------------------
    def send_packets(self, packets: list) -> None:
        now = self.loop.time()
        send = self.device.send_packet
        for p in packets:
            send(p, now)
        self._flush()

    def set_only_tcp_443(self, on: bool) -> None:
        """Node attribute only-tcp-443 (Go SetOnlyTCP443): no UDP at all, so no STUN, no
        disco over UDP and no direct paths; every packet goes over DERP (TCP/TLS)."""
        self.only_tcp_443 = on

    def _send_udp(self, data: bytes, addr: Addr) -> bool:
        if self.only_tcp_443:
            self.counters["tx_udp_blocked"] += 1
            return False
        try:
            self.sock.sendto(data, self.addrs.sockaddr(addr))
            self.counters["tx_udp"] += 1
            return True
        except (BlockingIOError, InterruptedError, OSError) as e:
            self.counters["tx_udp_errors"] += 1
            log.debug("udp send to %s failed: %s", addr, e)
            return False

    def _flush(self) -> None:
        if self.closed:
            return
        out = self.device.datagrams_to_send()
        if out:
            now = self.loop.time()
            sendto = self.sock.sendto
            sockaddr = self.addrs.sockaddr
            sent = errors = 0
            for data, ep in out:
                if type(ep) is _Peer:
                    addr, region = ep.paths.send_plan(now)
                    if self.only_tcp_443 and addr is not None:
                        addr = None
                        region = region or ep.paths.home_derp or ep.paths.last_derp_region
                    if addr is not None:
                        try:
                            sendto(data, sockaddr(addr))
                            sent += 1
                            ep.tx_udp += len(data)
                        except OSError:
                            errors += 1
                    if region:
                        region = derp_route(ep.paths.home_derp, ep.paths.last_derp_region,
                                            self.derps)
                        ep.tx_derp += len(data)
                        self._derp_send(region, ep.raw, data)
                    elif addr is None:
                        self.counters["tx_derp_no_region"] += 1
                    if ep.paths.has_disco_out:
                        self._send_disco_for(ep)
                elif self.only_tcp_443:
                    self.counters["tx_udp_blocked"] += 1
                else:
                    try:
                        sendto(data, sockaddr(ep))
                        sent += 1
                    except OSError:
                        errors += 1
            self.counters["tx_udp"] += sent
            self.counters["tx_udp_errors"] += errors
        self._arm()

    # -- timers ----------------------------------------------------------------------------------
    def _arm(self) -> None:
        self._timer.arm(self.device.next_deadline())

    def _on_timer(self) -> None:
        if self.closed:
            return
        self.device.handle_timer(self.loop.time())
        self._after_input()

    def _tick(self) -> None:
        if self.closed:
            return
        now = self.loop.time()
        try:
            for ep in self.peers.values():
                d = ep.paths.next_deadline()
                if d is not None and d <= now:
                    ep.paths.handle_timer(now)
                    if ep.paths.has_disco_out:
                        self._send_disco_for(ep)
            if now >= self._next_stun and self.derp_map is not None:
                self._next_stun = now + random.uniform(RESTUN_MIN, RESTUN_MAX)
                if self.derp_map.regions:
                    self._start_netcheck()
                self._refresh_endpoints()
            if now >= self._next_derp_clean:
                self._next_derp_clean = now + DERP_CLEAN_INTERVAL
                for region, entry in list(self.derps.items()):
                    if region != self.home and now - entry.last_used > DERP_IDLE_CLOSE:
                        self._close_derp(region)
        except Exception:                      # a bug here must not stop the timer
            log.exception("magicsock tick failed")
        self._tick_handle = self.loop.call_later(TICK, self._tick)

    def _spawn(self, coro) -> None:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- status ----------------------------------------------------------------------------------
    def peer_status(self) -> list[dict]:
        dev = {p["public_key"]: p for p in self.device.peer_status()}
        out = []
        for key, ep in self.peers.items():
            d = dev.get(key.b64(), {})
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

    def status(self) -> dict:
        return {"home_derp": self.home or None, "port": self.port,
                "derp": {str(r): e.conn.connected.is_set() for r, e in self.derps.items()},
                "derp_errors": {str(r): e.conn.last_error for r, e in self.derps.items()
                                if e.conn.last_error},     # e.g. certificate verify failed
                "endpoints": [f"{h}:{p}" for h, p, _ in self._endpoints],
                "region_latency_ms": {str(r): round(v * 1000, 2)
                                      for r, v in self.region_latency.items()},
                "counters": dict(self.counters), "disco": dict(self.codec.counters)}

    # -- close -----------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self._timer.cancel()
        self._tick_handle.cancel()
        stopped = []
        for region in list(self.derps):
            entry = self.derps.pop(region)
            await entry.conn.close()
            entry.task.cancel()
            stopped.append(entry.task)
        for t in list(self._tasks):
            t.cancel()
            stopped.append(t)
        # wait for them: a caller that closed us must not find our tasks still pending
        await asyncio.gather(*stopped, return_exceptions=True)
        self.sock.close()

    async def ping(self, node_key, timeout: float = 5.0):
        """One disco ping (`tailscale ping`): over the peer's direct path when it has one, else
        through its DERP region (and discovery of a direct path starts, as for data).  -> (seconds, "IP:PORT" or "DERP(N)"), or None on no pong."""
        ep = self.peers.get(node_key)
        if self.closed or ep is None or ep.disco is None:
            return None
        if "_ping_waiters" not in self.__dict__:       # tap pongs once; txids pick the waiter
            self._ping_waiters, real_open = {}, self.codec.open

            def open_and_tap(pkt):
                r = real_open(pkt)
                if r is not None and r[1][0] == "pong":
                    fut = self._ping_waiters.pop(bytes(r[1][1]), None)
                    if fut is not None and not fut.done():
                        fut.set_result(self.loop.time())
                return r
            self.codec.open = open_and_tap
        txid, now, fut = os.urandom(12), self.loop.time(), self.loop.create_future()
        self._ping_waiters[txid] = fut
        pkt = self.codec.seal(ep.disco, disco.build_ping(txid, self.node_public.raw))
        addr, region = ep.paths.send_plan(now)        # like data, a ping starts path discovery
        self._send_disco_for(ep)
        try:
            if addr is not None:
                ep.paths.pings[txid] = (addr, now)      # its pong refreshes the path's latency
                sent, via = self._send_udp(pkt, addr), (f"[{addr[0]}]:{addr[1]}" if ":" in addr[0]
                                                        else f"{addr[0]}:{addr[1]}")
            else:
                sent, via = bool(region) and self._derp_send(region, ep.raw, pkt), f"DERP({region})"
            if not sent:
                return None
            self.counters["disco_ping_tx"] += 1
            async with asyncio.timeout(timeout):
                return await fut - now, via
        except TimeoutError:
            return None
        finally:
            self._ping_waiters.pop(txid, None)
            ep.paths.pings.pop(txid, None)
