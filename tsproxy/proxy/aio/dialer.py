"""The dialer every front end shares: where does HOST:PORT go?

    tunnel IP literal (inside a peer's AllowedIPs / the tailnet)   -> netstack
    a name the netmap knows (MagicDNS short name or FQDN)          -> netstack
    a name the tunnel's DNS server resolves to a tunnel address   -> netstack
    a name under the tailnet's domains (MagicDNS suffix, split-DNS
      routes) that no node / route resolver answers                -> HostUnreachable
    an address in the tailnet's ranges (Tailscale mode: CGNAT and
      the Tailscale ULA) that no node holds                        -> HostUnreachable
    anything else                                                 -> --non-tailnet policy:
        direct (dial from the host, like tailscaled), exit-node, or refuse

Names and addresses of the tailnet never reach the host's resolver or the host's routes.
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

from tsproxy.errors import (ConnectionRefused, DialError, DialTimeout, HostUnreachable,
                            NetworkUnreachable, NotAllowed)

log = logging.getLogger(__name__)

# Tailscale assigns node addresses from these; an address inside that no node holds is a
# missing tailnet host, never something to route through the host (Tailscale mode only: a
# wg-quick network may use 100.64.x outside its tunnel).
TAILNET_RANGES = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))


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
        self.netstack = netstack
        self.names: dict[str, list] = {}
        self.set_names(names or {})
        self.prefixes = [ipaddress.ip_network(p) for p in tunnel_prefixes]
        self.resolver = resolver            # async name -> [ip] over the tunnel, or None
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.dns_suffixes = [s.lower().strip(".") for s in dns_suffixes]
        self.route_domains = [s.lower().strip(".") for s in route_domains]   # split-DNS routes
        self.tailnet_ranges = TAILNET_RANGES if tailnet_ranges else ()
        self.counters = {"dial_tunnel": 0, "dial_direct": 0, "dial_refused_policy": 0, "dial_failed": 0,
                         "dial_no_such_node": 0, "host_resolve": 0}

    def in_tunnel(self, ip) -> bool:
        ip = ipaddress.ip_address(ip)
        return any(ip.version == n.version and ip in n for n in self.prefixes)

    def _in_ranges(self, ip) -> bool:
        return any(ip.version == n.version and ip in n for n in self.tailnet_ranges)

    def _tailnet_domain(self, name: str, domains) -> str | None:
        for d in domains:
            if d and (name == d or name.endswith("." + d)):
                return d
        return None

    def _no_such(self, what: str) -> HostUnreachable:
        self.counters["dial_no_such_node"] += 1
        return HostUnreachable(f"{what}: no such node on the tailnet")

    def set_names(self, names: dict) -> None:
        # values may be strings or ip_address objects; routing needs the objects
        self.names = {k.lower().rstrip("."): [ipaddress.ip_address(str(a)) for a in v]
                      for k, v in names.items()}

    async def route(self, host: str) -> tuple[str, list]:
        """-> ("tunnel", [ips]) or ("outside", [host]) for the policy to handle; raises
        HostUnreachable for tailnet names and addresses that no node has."""
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            ip = None
        if ip is not None:
            if self.in_tunnel(ip):
                return "tunnel", [ip]
            if self._in_ranges(ip):
                raise self._no_such(str(ip))
            return "outside", [str(ip)]
        name = host.lower().rstrip(".")
        if name in self.names:
            return "tunnel", list(self.names[name])
        for suffix in self.dns_suffixes:
            if name.endswith("." + suffix) and name[: -len(suffix) - 1] in self.names:
                return "tunnel", list(self.names[name[: -len(suffix) - 1]])
        routed = self._tailnet_domain(name, self.route_domains)
        if self.resolver is not None:
            try:
                ips = [ipaddress.ip_address(a) for a in await self.resolver(name)]
            except HostUnreachable:
                ips = []
            tun = [a for a in ips if self.in_tunnel(a)]
            if tun:
                return "tunnel", tun
            if any(self._in_ranges(a) for a in ips):
                raise self._no_such(name)
            if ips and (self.policy != "direct" or routed):
                # the tunnel's resolver answered: dial that address, never re-ask the host
                return "outside", [str(ips[0])]
        if routed:
            self.counters["dial_no_such_node"] += 1
            raise HostUnreachable(f"{name}: the split-DNS resolvers for {routed} have no address for it")
        if self._tailnet_domain(name, self.dns_suffixes):
            raise self._no_such(name)
        return "outside", [host]

    async def open_connection(self, host: str, port: int, *, timeout: float | None = None):
        timeout = self.connect_timeout if timeout is None else timeout
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"   # IPv6 in brackets
        kind, targets = await self.route(host)
        if kind == "tunnel":
            self.counters["dial_tunnel"] += 1
            last: DialError | None = None
            # IPv4 first: the tunnel peers of wg-quick setups nearly always have it
            for ip in sorted(targets, key=lambda a: a.version):
                try:
                    return await self.netstack.open_connection(str(ip), port, timeout=timeout)
                except DialError as e:
                    last = e
            self.counters["dial_failed"] += 1
            raise last or HostUnreachable(f"{where}: no address")
        return await self._outside(targets[0], port, timeout, where)

    async def _outside(self, host: str, port: int, timeout: float, where: str):
        if self.policy == "refuse":
            self.counters["dial_refused_policy"] += 1
            raise NotAllowed(f"{where} is not on the tunnel and --non-tailnet is refuse")
        if self.policy == "exit-node":
            self.counters["dial_refused_policy"] += 1
            raise NotAllowed(f"{where} is not on the tunnel and no exit node is selected")
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
    Outside destinations follow the policy: direct uses a host socket, others refuse."""

    def __init__(self, dialer: Dialer):
        self.dialer = dialer
        self._tunnel = None
        self._direct = None
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=1024)
        self._tasks: list = []
        self.dropped = 0

    async def sendto(self, data: bytes, host: str, port: int) -> None:
        kind, targets = await self.dialer.route(host)
        if kind == "tunnel":
            if self._tunnel is None:
                self._tunnel = await self.dialer.netstack.open_udp()
                self._tasks.append(asyncio.ensure_future(self._pump_tunnel()))
            ip = sorted(targets, key=lambda a: a.version)[0]
            self._tunnel.sendto(data, (str(ip), port))
            return
        if self.dialer.policy != "direct":
            self.dialer.counters["dial_refused_policy"] += 1
            raise NotAllowed(f"{host}:{port} is not on the tunnel and --non-tailnet is {self.dialer.policy}")
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
