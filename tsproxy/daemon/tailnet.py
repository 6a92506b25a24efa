"""Tailscale mode: control client, WireGuard device, magicsock, netstack and dialer, kept in step
with the netmap.

    ControlClient ──netmaps──► apply ──► WgDevice peers (node keys, AllowedIPs)
         ▲                        ├────► MagicConn (DERP map, peers' disco keys and endpoints)
         └─ endpoints, home DERP ─┤────► Stack addresses, InboundFilter (packet filter)
                                  └────► RouteTable (control/routing.py: names, suffixes,
                                         split DNS, prefixes, exit node) -> Dialer, PAC, status

    Dialer ─► NetstackRuntime ─► InboundFilter.note_outbound ─► DeviceLoop(WgDevice) ─► MagicConn ─► UDP / DERP
    NetstackRuntime ◄─ InboundFilter.filter ◄─ DeviceLoop(WgDevice) ◄─ MagicConn ◄────────────┘
    (built by daemon/dataplane.py, which writes the pipeline order out)

A control outage leaves everything as the last netmap set it: tunnels keep working.  The WireGuard
device and netstack are built from the first netmap (they need our node key and addresses).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from tsproxy.control.aio import AuthKeyRejected, ControlClient
from tsproxy.control.dataplane import apply_peer_diff, apply_routes
from tsproxy.control.routing import RouteTable, assign_routes, find_exit_node
from tsproxy.control.netmap import diff_peers
from tsproxy.daemon.state import StateStore
from tsproxy.errors import TsproxyError

log = logging.getLogger("tsproxy.daemon.tailnet")
TUN_MTU = 1280                 # Tailscale's default tunnel MTU (PROTOCOL.md 13)


class LoginFailed(TsproxyError):
    pass


class SplitDns:
    """DNSConfig.Routes: names under a routed suffix are resolved by that route's resolvers,
    reached over the tailnet (e.g. a corp DNS server behind a subnet router)."""

    def __init__(self, netstack):
        self.netstack = netstack
        self.routes: dict[str, object] = {}       # suffix -> TunnelResolver
        self._spec: dict = {}

    def update(self, routes: dict) -> None:
        from tsproxy.dns.aio import TunnelResolver
        spec = {}
        for suffix, addrs in routes.items():
            ips = []
            for a in addrs:
                host = a.rsplit(":", 1)[0] if a.count(":") == 1 else a.strip("[]")
                try:
                    ips.append(str(ipaddress.ip_address(host)))
                except ValueError:
                    continue                      # DoH/DoT resolvers are not supported here
            if ips:
                spec[suffix.rstrip(".").lower()] = tuple(ips)
        if spec != self._spec:
            self._spec = spec
            self.routes = {s: TunnelResolver(self.netstack, list(ips)) for s, ips in spec.items()}

    async def resolve(self, name: str) -> list:
        from tsproxy.errors import HostUnreachable
        name = name.rstrip(".").lower()
        best = None
        for suffix in self.routes:
            if (name == suffix or name.endswith("." + suffix)) and (best is None or len(suffix) > len(best)):
                best = suffix
        if best is None:
            raise HostUnreachable(f"{name}: no split-DNS route")
        return await self.routes[best].resolve(name)


def _carrier(table: RouteTable, ip) -> tuple | None:
    """(kind, peer) that carries `ip` under `table`, None if the tunnel does not."""
    d = table.decide_ip(ip)
    return (d.kind, d.peer) if d.tunnel else None


class TailnetPlane:
    def __init__(self, *, control_url: str, state_dir: str | None, hostname: str,
                 auth_key: str | None, ephemeral: bool, tags=(), udp_port: int = 0,
                 non_tailnet: str = "direct", accept_routes: bool = False,
                 ca_file: str | None = None, exit_node: str | None = None,
                 exit_node_allow_lan_access: bool = False):
        from tsproxy.tlsconfig.aio import Trust
        self.trust = Trust(ca_file)       # control and DERP: system roots (+ --control-ca-file)
        self.store = StateStore(state_dir, ephemeral=ephemeral)
        self.udp_port = udp_port
        self.non_tailnet = non_tailnet
        # which peers' /0 and subnet routes we take (routing.assign_routes); none by default
        self.exit_node: str | None = exit_node or None
        self.exit_node_allow_lan_access = exit_node_allow_lan_access
        self.accept_routes = accept_routes
        self.table: RouteTable | None = None      # the routing decision the data plane reflects
        self.doh = None                           # the exit node's DNS (dns.aio.DohResolver)
        self._exit_problem: str | None = None     # last logged exit node problem
        self.counters = {"rerouted_reset": 0}
        self.control = ControlClient(control_url, self.store, hostname=hostname,
                                     auth_key=auth_key, tags=tags, ephemeral=ephemeral,
                                     on_netmap=self._on_netmap, on_auth_url=self._on_auth_url,
                                     trust=self.trust,
                                     on_state=lambda s: self.on_state and self.on_state(s))
        self.device = None
        self.magic = None
        self.netstack = None
        self.dialer = None
        self.filter = None
        self.pipeline = None          # daemon/dataplane.Pipeline: filter between netstack and device
        self.split_dns = None
        self.netmap = None            # the netmap the data plane reflects
        self._nm_ready = asyncio.Event()
        self._first_applied = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.on_applied = None        # called with each netmap once the data plane reflects it
        self.on_state = None          # called with each new control state (tsproxy.Node watches it)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, stopping: asyncio.Event) -> bool:
        """Run the control client and wait for the first netmap to be applied.  Returns False
        if `stopping` was set first; raises LoginFailed for a rejected auth key."""
        self._tasks.append(asyncio.create_task(self.control.run(), name="control"))
        self._tasks[0].add_done_callback(self._control_ended)
        self._tasks.append(asyncio.create_task(self._apply_loop(), name="netmap-apply"))
        waiters = [asyncio.ensure_future(self._first_applied.wait()),
                   asyncio.ensure_future(stopping.wait())]
        try:
            done, _ = await asyncio.wait([*waiters, self._tasks[0], self._tasks[1]],
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        for t in self._tasks:
            if t in done:
                exc = t.exception()
                if isinstance(exc, AuthKeyRejected):
                    raise LoginFailed(f"the {exc}") from None
                if exc is not None:
                    raise exc
        return self._first_applied.is_set()

    def _control_ended(self, task: asyncio.Task) -> None:
        # run() only returns by an exception; after start-up nobody awaits it: never silent
        if not task.cancelled() and task.exception() is not None and self._first_applied.is_set():
            log.error("control client stopped: %s; the netmap no longer updates",
                      task.exception())

    async def logout(self) -> None:
        # stop the login/map loop first, or it would register a fresh key right after
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.control.logout()

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.netstack is not None:
            await self.netstack.aclose()
        if self.magic is not None:
            await self.magic.aclose()

    # -- netmap -> data plane --------------------------------------------------------------------
    def _on_auth_url(self, url: str) -> None:
        # the URL is what the user must open; it is not a secret
        log.warning("to log in, open %s", url)

    def _on_netmap(self, nm) -> None:
        self._nm_ready.set()

    async def _apply_loop(self) -> None:
        while True:
            await self._nm_ready.wait()
            self._nm_ready.clear()
            nm = self.control.netmap
            if nm is None:
                continue
            try:
                await self._apply(nm)
            except TsproxyError as e:
                log.error("cannot apply the netmap: %s", e)
                raise
            self._first_applied.set()

    async def _build(self, nm) -> None:
        from tsproxy.daemon.dataplane import build_tailnet
        from tsproxy.netstack.inbound_filter import InboundFilter
        from tsproxy.netstack.stack import Stack
        from tsproxy.proxy.aio.dialer import Dialer
        from tsproxy.wg.device import WgDevice

        loop = asyncio.get_running_loop()
        ident = self.control.ident
        self.device = WgDevice(ident.node_key, now=loop.time(), mtu=TUN_MTU)
        self.filter = InboundFilter()
        stack = Stack(nm.addresses, mtu=TUN_MTU, now=loop.time(), verify_checksums=False)
        try:
            self.pipeline, self.magic, self.netstack = await build_tailnet(
                self.device, stack, packet_filter=self.filter, node_private=ident.node_key,
                disco_private=ident.disco_key, port=self.udp_port,
                on_endpoints=self.control.set_endpoints,
                on_home_derp=self.control.set_preferred_derp, trust=self.trust)
        except OSError as e:
            raise TsproxyError(f"cannot open the UDP port {self.udp_port} ({e.strerror})") from None
        self.split_dns = SplitDns(self.netstack)
        self.dialer = Dialer(self.netstack, names=nm.names, tunnel_prefixes=self._prefixes(nm),
                             resolver=self.split_dns.resolve, policy=self.non_tailnet,
                             dns_suffixes=[nm.magicdns_suffix] if nm.magicdns_suffix else [],
                             tailnet_ranges=True)

    def _prefixes(self, nm) -> list:
        return self._table(nm).networks()

    def _table(self, nm) -> RouteTable:
        return RouteTable.from_netmap(
            nm, exit_node=find_exit_node(nm, self.exit_node), accept_routes=self.accept_routes,
            allow_lan=self.exit_node_allow_lan_access, policy=self.non_tailnet,
            split_dns=list(self.split_dns.routes) if self.split_dns is not None else ())

    def _apply_routing(self, nm, diff=None) -> None:
        """Netmap + selection -> one RouteTable for the dialer, and the same routes in WireGuard
        (a changed selection re-routes every peer at once, without a new netmap)."""
        from tsproxy.dns.aio import DohResolver
        table = self._table(nm)
        routes = assign_routes(nm, exit_node=table.exit_node, accept_routes=self.accept_routes)
        if diff is not None:
            apply_peer_diff(self.device, diff, endpoint_for=self.magic.endpoint_for, routes=routes)
        apply_routes(self.device, routes)
        if self.doh is None:
            self.doh = DohResolver(self.netstack, self._doh_url)
            self.dialer.resolvers["exit"] = self.doh.resolve
        old, self.table = self.table, table
        self.dialer.set_table(table)
        if old is not None and old.signature() != table.signature():
            self._reset_rerouted(old, table)
        ex = table.exit_node
        problem = ex.problem if ex is not None else None
        if ex is not None and problem != self._exit_problem:
            if problem:
                log.warning("%s: destinations outside the tailnet are refused", problem)
            else:
                log.info("exit node %s in use%s", ex.name,
                         "" if ex.doh_url else " (it offers no DNS: names outside the tailnet fail)")
        self._exit_problem = problem

    def _reset_rerouted(self, old: RouteTable, new: RouteTable) -> int:
        """Reset the TCP connections whose destination the new table sends another way (another
        exit node, none, a subnet no longer accepted): their path is gone, and a reset tells the
        client at once instead of a stall until TCP gives up."""
        n = 0
        for conn, stream in list(getattr(self.netstack, "streams", {}).items()):
            try:
                ip = ipaddress.ip_address(bytes(conn.key[0]))
            except (AttributeError, TypeError, ValueError, IndexError):
                continue
            if _carrier(old, ip) != _carrier(new, ip):
                stream.abort()
                n += 1
        if n:
            self.counters["rerouted_reset"] += n
            log.info("reset %d connection%s whose route changed", n, "" if n == 1 else "s")
        return n

    def _doh_url(self) -> str:
        ex = self.table.exit_node if self.table is not None else None
        return ex.doh_url if ex is not None and ex.problem is None else ""

    def set_exit_node(self, selected: str | None, allow_lan_access: bool | None = None) -> dict:
        """Select (or with "" / None clear) the exit node at runtime; takes effect for new
        connections at once.  Returns the exit node status (selected, usable, problem)."""
        before, self.exit_node = self.exit_node, (selected or "").strip() or None
        if allow_lan_access is not None:
            self.exit_node_allow_lan_access = bool(allow_lan_access)
        if before and not self.exit_node:
            log.info("exit node %s no longer used: destinations outside the tailnet follow "
                     "--non-tailnet %s", before, self.non_tailnet)
        self._exit_problem = None
        return self._reroute()

    def set_accept_routes(self, on: bool) -> dict:
        self.accept_routes = bool(on)
        return self._reroute()

    def _reroute(self) -> dict:
        if self.netmap is not None and self.device is not None:
            self._apply_routing(self.netmap)
            if self.on_applied is not None:
                self.on_applied(self.netmap)
        return self.routing_status()

    def routing_status(self) -> dict:
        if self.table is not None:
            st = self.table.status()
        else:
            ex = find_exit_node(None, self.exit_node)
            st = {"policy": self.non_tailnet, "exit_node": ex.status() if ex else None,
                  "allow_lan_access": self.exit_node_allow_lan_access, "subnets": []}
        st["accept_routes"] = self.accept_routes
        return st

    async def _apply(self, nm) -> None:
        if self.device is None:
            await self._build(nm)
        ident = self.control.ident
        if self.device.private_key != ident.node_key:     # node key rotated (expiry renewal)
            log.info("node key changed; renegotiating every tunnel")
            self.device.set_private_key(ident.node_key)
            self.magic.set_private_key(ident.node_key)
        stack = self.netstack.stack
        addrs = [ipaddress.ip_address(a) for a in nm.addresses]
        if addrs and addrs != stack.addresses:
            stack.addresses = addrs
            stack.addr_set = {a.packed for a in addrs}
        if nm.only_tcp_443 != self.magic.only_tcp_443:
            log.info("node attribute only-tcp-443 %s: %s", "set" if nm.only_tcp_443 else "cleared",
                     "no UDP, everything over DERP" if nm.only_tcp_443 else "UDP allowed again")
        self.magic.set_only_tcp_443(nm.only_tcp_443)
        self.magic.set_derp_map(nm.derp_map)
        self.magic.set_peers(list(nm.wireguard_peers().values()))
        self.filter.set_match(nm.packet_filter.match)
        self.split_dns.update(nm.dns.routes)
        self._apply_routing(nm, diff_peers(self.netmap, nm))
        self.netmap = nm
        if self.on_applied is not None:
            self.on_applied(nm)

    # -- status --------------------------------------------------------------------------------
    def addresses(self) -> list[str]:
        return [str(a) for a in self.netmap.addresses] if self.netmap else []

    def status(self) -> dict:
        ctl = self.control.status()
        out = {"control": {"url": ctl["control_url"], "state": ctl["state"],
                           "last_error": ctl["last_error"], "failures": ctl["failures"]},
               "auth_url": self.control.auth_url or None, "self": None, "peers": [],
               "home_derp": None, "magicsock": None, "routing": self.routing_status()}
        nm = self.netmap
        if nm is None:
            return out
        me = nm.self_node
        out["self"] = {"name": me.name.rstrip("."), "addresses": self.addresses(),
                       "node_key": me.key.text() if me.key else None}
        paths = {}
        if self.magic is not None:
            ms = self.magic.status()
            out["magicsock"] = ms
            out["home_derp"] = ms.get("home_derp")
            paths = {p["node_key"]: p for p in self.magic.peer_status()}
        wg_routes = {p["public_key"]: p["allowed_ips"] for p in self.device.peer_status()} \
            if self.device is not None else {}
        now = time.time()
        for node in sorted(nm.peers.values(), key=lambda n: n.name):
            key = node.key.text() if node.key else ""
            ps = paths.get(key, {})
            hs = ps.get("last_handshake")
            out["peers"].append({
                "name": node.short_name(nm.magicdns_suffix) or node.name,
                "fqdn": node.name.rstrip("."),
                "addresses": [str(a.network_address) for a in node.addresses],
                "allowed_ips": [str(a) for a in node.allowed_ips],
                "online": node.online, "expired": node.expired,
                "node_key": key, "path": ps.get("path"), "latency_ms": ps.get("latency_ms"),
                "handshake_age": (now - hs) if hs else None,
                "handshakes": ps.get("handshakes", 0),
                "rx_bytes": ps.get("rx_bytes", 0), "tx_bytes": ps.get("tx_bytes", 0),
                "rx_packets": ps.get("rx_packets", 0), "tx_packets": ps.get("tx_packets", 0),
                "routes": wg_routes.get(node.key.b64(), []) if node.key else [],
                "primary_routes": [str(a) for a in node.primary_routes],
                "exit_node_option": any(a.prefixlen == 0 for a in node.allowed_ips),
            })
        return out

    def counter_sources(self) -> list:
        return [("wg", self.device), ("magicsock", self.magic), ("netstack", self.netstack),
                ("dialer", self.dialer), ("filter", self.filter), ("routing", self),
                ("control", self.control)]
