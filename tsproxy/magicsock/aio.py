"""MagicConn: the tailnet's bind, WireGuard over direct UDP and DERP relays (the asyncio edge).

Every decision (what a datagram is, which peer sent it, which path a packet takes, disco
ping/pong/call-me-maybe, STUN answers, path timers) is made by the sans-IO `MagicCore`
(magicsock/core.py).  This edge owns the I/O around it: one UDP socket carrying WireGuard, disco
and STUN (read in batches, with GRO/GSO where the kernel has them), the DERP connections (the
home region, plus peers' home regions on demand, closed when idle), DNS for STUN names, and the
netcheck task that picks the home region.  As a Bind (wg/bind.py) it runs under the shared
DeviceLoop (wg/aio.py); its deadlines (path timers, the next netcheck, idle DERP connections)
join the device's on the loop's one timer.

    magic = await MagicConn.create(device, node_private=..., disco_private=...,
                                   on_packets=netstack.deliver, on_endpoints=..., on_home_derp=...)
    magic.set_derp_map(nm.derp_map); magic.set_peers(nodes)
    apply_peer_diff(device, diff, endpoint_for=magic.endpoint_for)
    netstack -> magic.send_packets(packets)
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import random
import socket
import struct
import time
from typing import Callable

from tsproxy.aio import UdpBatchSocket, bind_udp
from tsproxy.derp.aio import DerpConnection, https_latency
from tsproxy.magicsock.core import MagicCore, MagicPeer, fmt_addr, needs_dns, region_stun_targets
from tsproxy.wg.aio import MAX_PER_WAKEUP, RECV_CHUNK, DeviceLoop

log = logging.getLogger(__name__)

RESTUN_MIN, RESTUN_MAX = 20.0, 26.0
DERP_IDLE_CLOSE = 60.0
STUN_WAIT = 1.0                   # how long the home-region probe waits for answers
HTTPS_PROBE_TIMEOUT = 3.0         # HTTPS latency fallback per region (UDP blocked)
HOME_ACTIVE_WINDOW = 8.0          # a home that sent us a frame this recently is reachable
DNS_TIMEOUT = 2.0

Addr = tuple[str, int]


class _Derp:
    __slots__ = ("conn", "task", "last_used")

    def __init__(self, conn, task, now):
        self.conn, self.task, self.last_used = conn, task, now


def _node_dict(node) -> dict:
    """messages.DERPNode -> the DERPNode JSON shape DerpConnection understands."""
    return {"Name": node.name, "HostName": node.host_name, "IPv4": node.ipv4, "IPv6": node.ipv6,
            "CertName": node.cert_name, "DERPPort": node.derp_port,
            "InsecureForTests": node.insecure_for_tests}


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
                 trust=None, gro: bool = True, gso: bool = True):
        self.device = device
        self.trust = trust                  # tlsconfig.aio.Trust for DERP (None: system roots)
        self.sock = sock
        self.io = UdpBatchSocket(sock, gro=gro, gso=gso)
        self.loop = asyncio.get_running_loop()
        self.node_private = node_private
        self.node_public = node_private.public()
        self.core = MagicCore(self.node_public, disco_private)
        self.core.on_pong = self._on_pong
        self.codec = self.core.codec
        self.counters = self.core.counters
        self.on_endpoints = on_endpoints or (lambda eps: None)
        self.on_home_derp = on_home_derp or (lambda region: None)
        self.derp_map = None
        self.home = 0
        self.derps: dict[int, _Derp] = {}
        self.core.derp_open = self.derps
        self._stun_dns: dict[str, list[str]] = {}
        self._stun_event = asyncio.Event()
        self._netcheck_task: asyncio.Task | None = None
        self._netcheck_again = False
        self._endpoints: list = []
        self._tasks: set[asyncio.Task] = set()
        self._ping_waiters: dict[bytes, asyncio.Future] = {}
        self._next_stun: float | None = None      # set once a DERP map arrives
        self._next_derp_clean: float | None = None
        self.closed = False
        self._sink = None
        self._refresh_endpoints()
        self.device_loop = DeviceLoop(device, self, on_packets)
        self.send_packets = self.device_loop.send_packets

    @classmethod
    async def create(cls, device, *, node_private, disco_private, port: int = 0,
                     host: str | None = None, on_packets, on_endpoints=None,
                     on_home_derp=None, trust=None, gro: bool = True,
                     gso: bool = True) -> "MagicConn":
        return cls(device, bind_udp(host, port), node_private=node_private,
                   disco_private=disco_private, on_packets=on_packets,
                   on_endpoints=on_endpoints, on_home_derp=on_home_derp, trust=trust,
                   gro=gro, gso=gso)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def peers(self) -> dict:
        return self.core.peers

    @property
    def region_latency(self) -> dict:
        return self.core.region_latency

    @property
    def home_selector(self):
        return self.core.home_selector

    @property
    def only_tcp_443(self) -> bool:
        return self.core.only_tcp_443

    @property
    def reflexive(self):
        return self.core.reflexive

    # -- Bind (wg/bind.py) ---------------------------------------------------------------------
    def open(self, sink) -> None:
        self._sink = sink
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        # read and decrypt in chunks (the data is still in cache), hand packets up once
        recv, sink, core = self.io.recv_batch, self._sink, self.core
        now = self.loop.time()
        total = 0
        while True:
            batch = recv(RECV_CHUNK)
            total += len(batch)
            if len(batch) < RECV_CHUNK or total >= MAX_PER_WAKEUP:
                break
            sink.feed(core.receive_datagrams(batch, now), now)
        if not total:
            return
        wg = core.receive_datagrams(batch, now)
        if core.stun_answered:
            core.stun_answered = False
            self._stun_event.set()
        if core.reflexive_changed:
            core.reflexive_changed = False
            self._refresh_endpoints()
        self._sink.receive(wg, now)

    def after_receive(self, device, now: float) -> None:
        core = self.core
        if core.wg_unknown_source:
            for key, ep in core.adopt_roamed(
                    [(k, p.endpoint) for k, p in device.peers.items()], now):
                device.update_peer(key, endpoint=ep)
        self._drain()

    def send(self, datagrams: list, now: float) -> None:
        self.core.send(datagrams, now)
        self._drain()

    def _drain(self) -> None:
        """Send what the core queued: UDP in one batch, DERP frames to their regions."""
        if self.closed:
            return
        core = self.core
        udp = core.datagrams_to_send()
        if udp:
            sent = self.io.send_batch(udp)
            self.counters["tx_udp"] += sent
            self.counters["tx_udp_errors"] += len(udp) - sent
        frames = core.derp_frames_to_send()
        for region, dst, data in frames:
            self._derp_send(region, dst, data)

    def next_deadline(self) -> float | None:
        d = self.core.next_deadline()
        for t in (self._next_stun, self._next_derp_clean):
            if t is not None and (d is None or t < d):
                d = t
        return d

    def handle_timer(self, now: float) -> None:
        if self.closed:
            return
        try:
            self.core.handle_timer(now)
            if self._next_stun is not None and now >= self._next_stun:
                self._next_stun = now + random.uniform(RESTUN_MIN, RESTUN_MAX)
                if self.derp_map is not None and self.derp_map.regions:
                    self._start_netcheck()
                self._refresh_endpoints()
            if self._next_derp_clean is not None and now >= self._next_derp_clean:
                self._close_idle_derps(now)
        except Exception:                      # a bug here must not stop (or spin) the timer
            log.exception("magicsock timer failed")
            self.core.postpone_timers(now + 1.0)
        self._drain()

    # -- configuration ---------------------------------------------------------------------------
    def endpoint_for(self, node) -> MagicPeer:
        return self.core.endpoint_for(node)

    def set_peers(self, nodes) -> None:
        self.core.set_peers(nodes)

    def set_private_key(self, node_private) -> None:
        """Node key rotated: every DERP connection re-dials under the new key (peers address
        DERP packets to it, and servers that admit only current keys refuse the old one);
        disco pings carry our node key; every peer's direct path is re-proven (as Go's
        SetPrivateKey does)."""
        if node_private.raw == self.node_private.raw:
            return
        self.node_private = node_private
        self.node_public = node_private.public()
        for entry in self.derps.values():
            entry.conn.set_private_key(node_private)
        self.core.set_node_key(self.node_public)
        log.info("node key rotated: reconnecting %d DERP connection(s)", len(self.derps))

    def set_derp_map(self, derp_map) -> None:
        changed = derp_map != self.derp_map       # called on every netmap; act on changes
        self.derp_map = derp_map
        for region in [r for r in self.derps if r not in derp_map.regions]:
            self._close_derp(region)
        if self.home not in derp_map.regions:
            self.home = 0
        if self._next_stun is None:               # periodic re-STUN from now on
            self._next_stun = self.loop.time() + random.uniform(RESTUN_MIN, RESTUN_MAX)
            self._rearm()
        if derp_map.regions and (changed or not self.home):
            self._start_netcheck()             # re-run the home choice on the new map now

    def set_only_tcp_443(self, on: bool) -> None:
        """Node attribute only-tcp-443 (Go SetOnlyTCP443): no UDP at all, so no STUN, no
        disco over UDP and no direct paths; every packet goes over DERP (TCP/TLS)."""
        self.core.only_tcp_443 = on

    def _rearm(self) -> None:
        if self._sink is not None:
            self._sink.rearm()

    # -- netcheck --------------------------------------------------------------------------------
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
            sel = self.core.home_selector
            sel.start_round()
            self._send_stun_probes()
            regions = self.derp_map.regions
            deadline = self.loop.time() + STUN_WAIT
            while len(sel.round_latency) < len(regions):
                left = deadline - self.loop.time()
                if left <= 0:
                    break
                self._stun_event.clear()
                try:
                    await asyncio.wait_for(self._stun_event.wait(), left)   # woken per answer
                except TimeoutError:
                    break
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

    def _send_stun_probes(self) -> None:
        if self.derp_map is None:
            return
        v6_ok = self.io.addrs.family == socket.AF_INET6
        self.core.send_stun_probes(region_stun_targets(self.derp_map, self._stun_dns, v6_ok),
                                   self.loop.time())
        self._drain()

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
        return self.core.home_selector.choose(regions, now=now, current=self.home,
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
            self._note_idle_candidate(self.derps[old].last_used)
        conn = self._derp(home)
        if conn is not None:
            conn.set_preferred(True)
        lat = self.core.home_selector.round_latency.get(home)
        log.info("DERP home region %d%s", home, f" ({lat * 1000:.1f} ms)" if lat else "")
        self.on_home_derp(home)

    async def _resolve_stun_names(self) -> None:
        names = {n.host_name for r in self.derp_map.regions.values() for n in r.nodes
                 if needs_dns(n)}
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
                self.core.home_selector.add_sample(rid, lat, self.loop.time())
                self.core.region_latency[rid] = lat
        await asyncio.gather(*(probe(r, reg) for r, reg in regions.items()
                               if not reg.no_measure_no_home))

    # -- DERP ------------------------------------------------------------------------------------
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
        if region != self.home:
            self._note_idle_candidate(now)
        return conn

    def _note_idle_candidate(self, last_used: float) -> None:
        """A non-home connection may idle out at last_used + DERP_IDLE_CLOSE (checked then)."""
        at = last_used + DERP_IDLE_CLOSE
        if self._next_derp_clean is None or at < self._next_derp_clean:
            self._next_derp_clean = at
            self._rearm()

    def _close_idle_derps(self, now: float) -> None:
        nxt = None
        for region, entry in list(self.derps.items()):
            if region == self.home:
                continue
            if now - entry.last_used >= DERP_IDLE_CLOSE:
                self._close_derp(region)
            else:
                at = entry.last_used + DERP_IDLE_CLOSE
                nxt = at if nxt is None else min(nxt, at)
        self._next_derp_clean = nxt

    def _region_nodes(self, region: int) -> list[dict]:
        """The region's nodes in the DERP map as it is now (read on every connect)."""
        reg = self.derp_map.regions.get(region) if self.derp_map is not None else None
        return [_node_dict(n) for n in reg.nodes if not n.stun_only] if reg else []

    def _on_derp_event(self, region: int, ev) -> None:
        if ev[0] == "peer_gone":
            self.core.derp_peer_gone(region, ev[1])

    def _close_derp(self, region: int) -> None:
        entry = self.derps.pop(region, None)
        if entry is not None:
            self._spawn(entry.conn.close())
            entry.task.cancel()
            self._tasks.add(entry.task)           # aclose() waits for it to finish
            entry.task.add_done_callback(self._tasks.discard)

    def _derp_send(self, region: int, dst: bytes, data) -> bool:
        conn = self._derp(region)
        if conn is None:
            self.counters["tx_derp_no_region"] += 1
            return False
        self.counters["tx_derp"] += 1
        return conn.send(dst, data)

    def _on_derp(self, region: int, src: bytes, data: bytes) -> None:
        if self.closed or self._sink is None:
            return
        now = self.loop.time()
        got = self.core.receive_derp(region, src, data, now)
        if got is not None:
            entry = self.derps.get(region)
            if entry is not None:
                entry.last_used = now
        self._sink.receive([got] if got is not None else [], now)

    # -- endpoints -------------------------------------------------------------------------------
    def _refresh_endpoints(self) -> None:
        port = self.port
        eps = []
        try:
            addrs = local_addresses()
        except OSError:
            addrs = []
        v6_ok = self.io.addrs.family == socket.AF_INET6
        for ip in addrs:
            if ":" in ip and not v6_ok:
                continue
            eps.append((ip, port, 1))
        refl = self.core.reflexive
        if refl is not None and (refl[0], refl[1]) not in {(h, p) for h, p, _ in eps}:
            eps.append((refl[0], refl[1], 2))
        if eps != self._endpoints:
            self._endpoints = eps
            self.core.local_endpoints = eps
            self.on_endpoints(list(eps))

    def local_endpoints(self) -> list:
        return list(self._endpoints)

    def _spawn(self, coro) -> None:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- status ----------------------------------------------------------------------------------
    def peer_status(self) -> list[dict]:
        return self.core.peer_status({p["public_key"]: p for p in self.device.peer_status()})

    def status(self) -> dict:
        return {"home_derp": self.home or None, "port": self.port,
                "derp": {str(r): e.conn.connected.is_set() for r, e in self.derps.items()},
                "derp_errors": {str(r): e.conn.last_error for r, e in self.derps.items()
                                if e.conn.last_error},     # e.g. certificate verify failed
                "endpoints": [f"{h}:{p}" for h, p, _ in self._endpoints],
                "region_latency_ms": {str(r): round(v * 1000, 2)
                                      for r, v in self.core.region_latency.items()},
                "counters": dict(self.counters), "disco": dict(self.codec.counters),
                "udp": {"gro": self.io.gro, "gso": self.io.gso, **self.io.counters}}

    # -- close -----------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.device_loop.stop()
        if self._sink is not None:
            self.loop.remove_reader(self.sock.fileno())
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

    # -- tailscale ping --------------------------------------------------------------------------
    def _on_pong(self, txid: bytes, now: float) -> None:
        fut = self._ping_waiters.pop(txid, None)
        if fut is not None and not fut.done():
            fut.set_result(now)

    async def ping(self, node_key, timeout: float = 5.0):
        """One disco ping (`tailscale ping`): over the peer's direct path when it has one, else
        through its DERP region (and discovery of a direct path starts, as for data).
        -> (seconds, "IP:PORT" or "DERP(N)"), or None on no pong."""
        if self.closed:
            return None
        now = self.loop.time()
        planned = self.core.ping(node_key, now)
        if planned is None:
            self._drain()
            return None
        txid, addr, region = planned
        fut = self.loop.create_future()
        self._ping_waiters[txid] = fut
        try:
            if addr is None and self._derp(region) is None:
                self._drain()                        # counts the frame it cannot send
                return None
            self._drain()
            self._rearm()
            self.counters["disco_ping_tx"] += 1
            via = fmt_addr(addr) if addr is not None else f"DERP({region})"
            async with asyncio.timeout(timeout):
                return await fut - now, via
        except TimeoutError:
            return None
        finally:
            self._ping_waiters.pop(txid, None)
            self.core.cancel_ping(node_key, txid)
