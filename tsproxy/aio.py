"""Small asyncio edge pieces shared by the packet transports (wg/aio, magicsock/aio, netstack/aio).

    DeadlineTimer  one loop timer for a sans-IO core's next_deadline(): re-arming only ever
                   moves it earlier, so a hot path can call arm() after every batch for free
    UdpAddrs       (ip, port) endpoints <-> socket addresses for one UDP socket, with IPv4-mapped
                   IPv6 folded back to IPv4 so an endpoint looks the same on any socket family
    bind_udp       a non-blocking UDP socket, dual-stack when possible, with large buffers
    size_udp_buffers / udp_buffer_sizes   those buffers: set (forced past the sysctl cap when
                   the process may) and read back
    process_status what a load test watches come back to baseline (tasks, fds, RSS, buffers)
"""

from __future__ import annotations

import asyncio
import os
import socket

# What the UDP socket asks for.  Under load the netstack's advertised windows together invite a
# burst of datagrams while the loop is busy elsewhere; the kernel queue must hold that burst
# (a full queue is a host RcvbufErrors drop and an RTO for some connection).  16 MiB holds
# about 11,000 full-size WireGuard datagrams.
UDP_BUFFER = 16 * 1024 * 1024
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
        size_udp_buffers(sock)
        sock.setblocking(False)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


_FORCE = {socket.SO_RCVBUF: getattr(socket, "SO_RCVBUFFORCE", 33),
          socket.SO_SNDBUF: getattr(socket, "SO_SNDBUFFORCE", 32)}


def size_udp_buffers(sock: socket.socket, want: int = UDP_BUFFER) -> dict:
    """Receive and send buffers of `want` bytes: SO_*BUFFORCE first (allowed with CAP_NET_ADMIN,
    e.g. as root, and not capped by net.core.rmem_max/wmem_max), else the plain option, which
    the kernel caps at the sysctl.  Returns what was obtained (udp_buffer_sizes)."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, _FORCE[opt], want)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, want)
            except OSError:
                pass
    return udp_buffer_sizes(sock)


def udp_buffer_sizes(sock: socket.socket) -> dict:
    """{"rcvbuf": bytes, "sndbuf": bytes} as the kernel reports them (Linux doubles the value
    asked for, to cover its bookkeeping); {} for a closed socket."""
    try:
        return {"rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)}
    except OSError:
        return {}


def process_status(udp_sock: socket.socket | None) -> dict:
    """asyncio tasks of the running loop, open fds, RSS, and the UDP socket's buffers."""
    out: dict = {}
    try:
        out["asyncio_tasks"] = len(asyncio.all_tasks())
    except RuntimeError:                       # no running loop (status of a stopped node)
        out["asyncio_tasks"] = 0
    try:
        out["open_fds"] = len(os.listdir("/proc/self/fd"))
        with open("/proc/self/statm") as f:
            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    if udp_sock is not None:
        out["udp_buffers"] = udp_buffer_sizes(udp_sock)
    return out
