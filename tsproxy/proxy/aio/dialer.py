"""The dialer every front end shares: where does HOST:PORT go?

control.routing.RouteTable decides (tailnet peer, subnet via a peer, the exit node, resolve
a name first, dial from the host, or refuse with the reason); this module carries it out:
tunnel decisions dial through the netstack, `resolve` asks the named resolver (split-DNS route
resolvers, a wg-quick DNS server, the exit node's DNS-over-HTTPS) and decides again on the
answer, `direct` dials from the host, `refuse` raises.

Names and addresses of the tailnet never reach the host's resolver or the host's routes, and
with an exit node selected nothing outside the tailnet does either (unless
--exit-node-allow-lan-access leaves LAN addresses to the --non-tailnet policy).
`host_resolve` counts names handed to the host's resolver, `dial_direct` host dials.

Failures are tsproxy.errors.DialError subclasses so every front end can map them to its own
reply codes (SOCKS 0x02-0x06, HTTP 403/502/504, a closed forward).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket

from tsproxy.control.routing import NOT_ALLOWED, TAILNET_RANGES, Decision, RouteTable
from tsproxy.errors import (ConnectionRefused, DialError, DialTimeout, HostUnreachable,
                            NetworkUnreachable, NotAllowed)

log = logging.getLogger(__name__)
__all__ = ["Dialer", "UdpRelay", "TAILNET_RANGES"]


def _os_error(e: OSError, where: str) -> DialError:
    if isinstance(e, ConnectionRefusedError):
        return ConnectionRefused(f"{where}: connection refused")
    if isinstance(e, socket.gaierror):
        return HostUnreachable(f"{where}: name not found")
    if e.errno == errno.ENETUNREACH:
        return NetworkUnreachable(f"{where}: network unreachable")
    if e.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return HostUnreachable(f"{where}: host unreachable")
    if isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT:
        return DialTimeout(f"{where}: timed out")
    return HostUnreachable(f"{where}: {e.strerror or e}")


class Dialer:
    def __init__(self, netstack, *, names: dict | None = None, tunnel_prefixes=(),
                 resolver=None, policy: str = "direct", connect_timeout: float = 10.0,
                 dns_suffixes=(), route_domains=(), tailnet_ranges: bool = False):
        """The keyword arguments build the first RouteTable (plain WireGuard mode and tests);
        Tailscale mode replaces it with set_table() on each netmap.  `resolver` is an async
        name -> [ip] over the tunnel (split-DNS routes, or a wg-quick DNS server)."""
        self.netstack = netstack
        self.connect_timeout = connect_timeout
        # via -> async name -> [ip]; "split-dns" and "tunnel" share the one given here
        self.resolvers: dict = {"split-dns": resolver, "tunnel": resolver}
        self.table = RouteTable(prefixes=tunnel_prefixes, names=names, suffixes=dns_suffixes,
                                split_dns=route_domains, policy=policy,
                                tailnet_ranges=tailnet_ranges,
                                tunnel_dns=resolver is not None and not tailnet_ranges)
        self.counters = {"dial_tunnel": 0, "dial_direct": 0, "dial_refused_policy": 0, "dial_failed": 0,
                         "dial_no_such_node": 0, "host_resolve": 0, "dial_subnet": 0, "dial_exit": 0,
                         "dial_exit_unavailable": 0, "exit_dns_lookups": 0}
        self.route_epoch = 0

    def set_table(self, table: RouteTable) -> None:
        """Use `table` for new connections; route_epoch moves when the routes differ (another
        exit node, subnets accepted or not), so pooled upstream connections are not reused."""
        if table.signature() != self.table.signature():
            self.route_epoch += 1
        self.table = table

    @property
    def policy(self) -> str:
        return self.table.policy

    def in_tunnel(self, ip) -> bool:
        return self.table.in_tunnel(ip)

    async def decide(self, host: str) -> Decision:
        """The table's decision for `host`, names resolved as it says; never a refusal."""
        table = self.table
        d = table.decide(host)
        if d.kind != "resolve":
            return d
        name = host.lower().rstrip(".")
        resolve = self.resolvers.get(d.via)
        ips: list = []
        if resolve is not None:
            if d.via == "exit":
                self.counters["exit_dns_lookups"] += 1
            try:
                ips = list(await resolve(name))
            except HostUnreachable as e:
                if d.via == "exit":        # fail closed: never fall back to the host's resolver
                    self.counters["dial_failed"] += 1
                    raise HostUnreachable(f"cannot resolve {name} through exit node {d.peer}: {e}") from None
                ips = []
        return table.after_resolve(name, d.via, ips)

    def _refuse(self, d: Decision, where: str = "") -> DialError:
        if d.counter:
            self.counters[d.counter] = self.counters.get(d.counter, 0) + 1
        reason = d.reason
        if where and d.subject and reason.startswith(d.subject):
            reason = where + reason[len(d.subject):]          # "example.com:443 is not on ..."
        return (NotAllowed if d.error == NOT_ALLOWED else HostUnreachable)(reason)

    async def route(self, host: str, port: int | None = None) -> tuple[str, list]:
        """-> ("tunnel", [ips]) or ("outside", [host or ip]) to dial from the host; raises the
        DialError of a refusal (tailnet names no node has, the policy, an unusable exit node)."""
        d = await self.decide(host)
        if d.kind == "refuse":
            where = "" if port is None else (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            raise self._refuse(d, where)
        if d.tunnel:
            return "tunnel", list(d.targets)
        return "outside", [str(d.targets[0])]

    async def open_connection(self, host: str, port: int, *, timeout: float | None = None):
        timeout = self.connect_timeout if timeout is None else timeout
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"   # IPv6 in brackets
        d = await self.decide(host)
        if d.kind == "refuse":
            raise self._refuse(d, where)
        targets = list(d.targets)
        if d.tunnel:
            self.counters["dial_tunnel"] += 1
            if d.kind != "tailnet":
                self.counters["dial_" + d.kind] += 1
            last: DialError | None = None
            # IPv4 first: the tunnel peers of wg-quick setups nearly always have it
            for ip in sorted(targets, key=lambda a: a.version):
                try:
                    return await self.netstack.open_connection(str(ip), port, timeout=timeout)
                except DialError as e:
                    last = e
            self.counters["dial_failed"] += 1
            raise last or HostUnreachable(f"{where}: no address")
        return await self._direct(str(targets[0]), port, timeout, where)

    async def _direct(self, host: str, port: int, timeout: float, where: str):
        self.counters["dial_direct"] += 1
        if not _is_literal(host):
            self.counters["host_resolve"] += 1
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.open_connection(host, port, limit=256 * 1024)
        except TimeoutError:
            self.counters["dial_failed"] += 1
            raise DialTimeout(f"{where}: no answer within {timeout:g} s") from None
        except OSError as e:
            self.counters["dial_failed"] += 1
            raise _os_error(e, where) from None

    async def open_udp(self) -> "UdpRelay":
        return UdpRelay(self)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class UdpRelay:
    """Datagrams to HOST:PORT through the tunnel (SOCKS5 UDP ASSOCIATE, UDP forwards).
    Outside destinations go as the RouteTable says: the tunnel (exit node), a host socket
    (direct), or a refusal."""

    def __init__(self, dialer: Dialer):
        self.dialer = dialer
        self._tunnel = None
        self._direct = None
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=1024)
        self._tasks: list = []
        self.dropped = 0

    async def sendto(self, data: bytes, host: str, port: int) -> None:
        kind, targets = await self.dialer.route(host, port)
        if kind == "tunnel":
            if self._tunnel is None:
                self._tunnel = await self.dialer.netstack.open_udp()
                self._tasks.append(asyncio.ensure_future(self._pump_tunnel()))
            ip = sorted(targets, key=lambda a: a.version)[0]
            self._tunnel.sendto(data, (str(ip), port))
            return
        loop = asyncio.get_running_loop()
        target = targets[0]
        if not _is_literal(target):
            # resolve here (counted) rather than inside sendto, which would block the loop
            self.dialer.counters["host_resolve"] += 1
            try:
                infos = await loop.getaddrinfo(target, port, family=socket.AF_INET,
                                               type=socket.SOCK_DGRAM)
            except OSError as e:
                raise _os_error(e, f"{host}:{port}") from None
            target = infos[0][4][0]
        if self._direct is None:
            self._direct, _ = await loop.create_datagram_endpoint(
                lambda: _DirectProtocol(self), local_addr=("0.0.0.0", 0))
        self.dialer.counters["dial_direct"] += 1
        self._direct.sendto(data, (target, port))

    def _put(self, item) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1

    async def _pump_tunnel(self) -> None:
        while True:
            try:
                item = await self._tunnel.recvfrom()
            except DialError:
                continue                      # an ICMP error for one datagram: keep going
            except ConnectionError:
                return
            self._put(item)

    async def recvfrom(self):
        return await self._queue.get()

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tunnel is not None:
            self._tunnel.close()
        if self._direct is not None:
            self._direct.close()


class _DirectProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay):
        self.relay = relay

    def datagram_received(self, data, addr):
        self.relay._put((data, addr[:2]))
