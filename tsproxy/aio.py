"""Small asyncio edge pieces shared by the packet transports (wg/aio, magicsock/aio, netstack/aio).

    DeadlineTimer  one loop timer for a sans-IO core's next_deadline(): re-arming only ever
                   moves it earlier, so a hot path can call arm() after every batch for free
    UdpAddrs       (ip, port) endpoints <-> socket addresses for one UDP socket, with IPv4-mapped
                   IPv6 folded back to IPv4 so an endpoint looks the same on any socket family
    bind_udp       a non-blocking UDP socket, dual-stack when possible, with large buffers
"""

from __future__ import annotations

import asyncio
import socket

SOCKET_BUFFER = 4 * 1024 * 1024
_ADDR_CACHE_MAX = 4096


class DeadlineTimer:
    def __init__(self, loop: asyncio.AbstractEventLoop, callback):
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def arm(self, deadline: float | None) -> None:
        if deadline is None:
            return
        if self._handle is not None:
            if self._at <= deadline:
                return
            self._handle.cancel()
        self._at = deadline
        self._handle = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._handle = self._at = None
        self._callback()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = self._at = None


class UdpAddrs:
    def __init__(self, family: int):
        self.family = family
        self._norm: dict = {}
        self._sockaddr: dict = {}

    def norm(self, raw) -> tuple[str, int]:
        """Socket address from recvfrom -> (ip, port)."""
        ep = self._norm.get(raw)
        if ep is None:
            host = raw[0]
            if host.startswith("::ffff:") and "." in host:
                host = host[7:]
            ep = (host, raw[1])
            if len(self._norm) > _ADDR_CACHE_MAX:
                self._norm.clear()
            self._norm[raw] = ep
        return ep

    def sockaddr(self, ep: tuple[str, int]):
        """(ip, port) -> what sendto wants on this socket."""
        sa = self._sockaddr.get(ep)
        if sa is None:
            host, port = ep
            if self.family == socket.AF_INET6 and ":" not in host:
                host = "::ffff:" + host
            sa = (host, port)
            if len(self._sockaddr) > _ADDR_CACHE_MAX:
                self._sockaddr.clear()
            self._sockaddr[ep] = sa
        return sa


def bind_udp(host: str | None, port: int) -> socket.socket:
    """Dual-stack when possible; an explicit IPv4 host gets a plain IPv4 socket."""
    host = str(host) if host else None          # ipaddress objects welcome
    if host and ":" not in host:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        addr = (host, port)
    else:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            addr = (host or "::", port)
        except OSError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            addr = ("0.0.0.0", port)
    try:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass
        sock.setblocking(False)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock
