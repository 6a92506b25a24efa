"""Plain WireGuard mode's data plane, shared by the daemon and `tsproxy.Node`:

    Dialer ──► NetstackRuntime(Stack) ──► [filter] ──► DeviceLoop(WgDevice) ──► UdpBind
    NetstackRuntime ◄── [filter] ◄──────────────────────────────────────────────┘

Built from a parsed wg-quick file by daemon/dataplane.py (the pipeline order is written there);
the inbound filter slot is empty (allow all) unless a `packet_filter` is given.  `aclose()`
frees the stack and the UDP port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

from tsproxy.daemon import wgconf
from tsproxy.errors import ConfigError


def resolve_endpoint(host: str, port: int) -> tuple[str, int]:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        return str(ip), port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve peer endpoint {host!r} ({e.strerror})") from None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)   # prefer IPv4 like wg does by default
    return infos[0][4][0], port


class WgPlane:
    def __init__(self, conf: wgconf.WgConfig, *, non_tailnet: str = "direct", packet_filter=None):
        self.conf = conf
        self.non_tailnet = non_tailnet
        self.filter = packet_filter       # e.g. netstack.inbound_filter.InboundFilter; None: all
        self.pipeline = None
        self.device = None
        self.udp = None
        self.netstack = None
        self.dialer = None

    async def start(self) -> None:
        from tsproxy.daemon.dataplane import build_wireguard
        from tsproxy.dns.aio import TunnelResolver
        from tsproxy.netstack.stack import Stack
        from tsproxy.proxy.aio.dialer import Dialer
        from tsproxy.wg.device import WgDevice

        loop = asyncio.get_running_loop()
        iface = self.conf.interface
        now = loop.time()
        self.device = WgDevice(iface.private_key, now=now)
        tunnel_prefixes = []
        for peer in self.conf.peers:
            endpoint = resolve_endpoint(*peer.endpoint) if peer.endpoint else None
            self.device.add_peer(peer.public_key, allowed_ips=peer.allowed_ips, endpoint=endpoint,
                                 preshared_key=peer.preshared_key,
                                 persistent_keepalive=float(peer.persistent_keepalive))
            tunnel_prefixes += peer.allowed_ips
        stack = Stack([a.ip for a in iface.addresses], mtu=iface.mtu, now=now,
                      verify_checksums=False)   # WireGuard's Poly1305 already authenticated them
        try:
            self.pipeline, self.udp, self.netstack = await build_wireguard(
                self.device, stack, port=iface.listen_port or 0, packet_filter=self.filter)
        except OSError as e:
            raise ConfigError(f"cannot open the WireGuard UDP port {iface.listen_port or 0} ({e.strerror})") from None
        resolver = TunnelResolver(self.netstack, iface.dns_servers, iface.dns_search)
        self.dialer = Dialer(self.netstack, names={}, tunnel_prefixes=tunnel_prefixes,
                             resolver=resolver.resolve if iface.dns_servers else None,
                             policy=self.non_tailnet, dns_suffixes=iface.dns_search)

    async def aclose(self) -> None:
        try:
            if self.netstack is not None:
                await self.netstack.aclose()
        finally:
            if self.udp is not None:
                await self.udp.aclose()

    def addresses(self) -> list[str]:
        return [str(a.ip) for a in self.conf.interface.addresses]

    def peer_status(self) -> list[dict]:
        now = time.time()
        peers = []
        dev_status = {p["public_key"]: p for p in self.device.peer_status()} if self.device else {}
        for i, peer in enumerate(self.conf.peers):
            st = dev_status.get(peer.public_key.b64(), {})
            hs = st.get("last_handshake")
            peers.append({
                "name": f"peer{i + 1}",
                "public_key": peer.public_key.b64(),
                "allowed_ips": [str(n) for n in peer.allowed_ips],
                "endpoint": _fmt_endpoint(st.get("endpoint")),
                "handshake_age": (now - hs) if hs else None,
                "handshakes": st.get("handshakes", 0),
                "rx_bytes": st.get("rx_bytes", 0),
                "rx_packets": st.get("rx_packets", 0), "tx_packets": st.get("tx_packets", 0),
                "tx_bytes": st.get("tx_bytes", 0),
            })
        return peers

    def counter_sources(self) -> list:
        return [("wg", self.device), ("udp", self.udp), ("netstack", self.netstack),
                ("dialer", self.dialer), ("filter", self.filter)]


def _fmt_endpoint(ep) -> str | None:
    if isinstance(ep, tuple) and len(ep) == 2:
        host, port = ep
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None if ep is None else str(ep)
