"""Small asyncio edge pieces shared by the packet transports (wg/aio, magicsock/aio, netstack/aio).

    DeadlineTimer  one loop timer for a sans-IO core's next_deadline(): re-arming only ever
                   moves it earlier, so a hot path can call arm() after every batch for free
    UdpAddrs       (ip, port) endpoints <-> socket addresses for one UDP socket, with IPv4-mapped
                   IPv6 folded back to IPv4 so an endpoint looks the same on any socket family
    bind_udp       a non-blocking UDP socket, dual-stack when possible, with large buffers
    size_udp_buffers / udp_buffer_sizes   those buffers: set (forced past the sysctl cap when
                   the process may) and read back
    process_status what a load test watches come back to baseline (tasks, fds, RSS, buffers)
    UdpBatchSocket batched receive/send on one UDP socket: GRO and GSO where the kernel has them
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct

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
        self.fired_at: float | None = None   # the deadline the last callback was armed for

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
        self.fired_at = self._at
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


# -- batched UDP I/O: GRO on receive, GSO on send (Linux), a plain path everywhere else ------------
SOL_UDP = 17
UDP_SEGMENT = 103                 # linux/udp.h: sendmsg cmsg, equal-size segments of one buffer
UDP_GRO = 104                     # linux/udp.h: setsockopt + recvmsg cmsg with the segment size
GSO_MAX_SEGMENTS = 64             # UDP_MAX_SEGMENTS in older kernels (newer allow 128)
GSO_MAX_BYTES = 65000             # one UDP datagram's payload limit, with headroom
RECV_BUFFER = 65536               # a GRO buffer holds at most 64 KiB
GRO_IDLE_LIMIT = 4096             # datagrams read with GRO on but none coalesced: pause GRO
GRO_RETRY_AFTER = 1 << 20         # datagrams read with GRO paused before trying it again
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_SEG_SIZE = struct.Struct("=H").pack


class UdpBatchSocket:
    """One non-blocking UDP socket read and written in batches.

    `recv_batch(limit)` drains the socket until EAGAIN (or `limit` datagrams) and returns
    `[(data, (ip, port))]`.  With UDP_GRO the kernel hands several datagrams of one flow as one
    buffer plus their segment size; that buffer is copied once and split into memoryview slices,
    so a 45-datagram burst costs one copy, not 45.  Without GRO each datagram is one `bytes`.

    `send_batch([(data, (ip, port))])` groups runs of datagrams to the same address whose sizes
    are equal (the last of a run may be shorter) into one sendmsg with UDP_SEGMENT: one system
    call for the run, gathered from the caller's buffers without joining them.  A kernel or
    device that refuses GSO (EIO, EINVAL, ENOPROTOOPT...) switches it off for this socket and the
    run is sent one datagram at a time; `gro=False, gso=False` forces the plain path.

    recvmsg costs about a microsecond more per call than recvfrom, so where the path never
    coalesces (most NICs and veth without GRO forwarding) GRO is paused after GRO_IDLE_LIMIT
    datagrams and tried again after GRO_RETRY_AFTER.  Buffers the kernel coalesced before the
    pause are still read with recvmsg: the switch to recvfrom waits for the queue to run dry.
    """

    def __init__(self, sock: socket.socket, *, gro: bool = True, gso: bool = True):
        self.sock = sock
        self.addrs = UdpAddrs(sock.family)
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self.gro = gro and _enable_gro(sock)
        self._gro_capable = self.gro
        self._gro_draining = False         # paused, but coalesced buffers may still be queued
        self._gro_idle = 0                 # datagrams since the last coalesced buffer / the pause
        self.gso = gso and _gso_available(sock)
        self.counters = {"rx_datagrams": 0, "rx_gro_buffers": 0, "rx_errors": 0, "gro_paused": 0,
                         "tx_datagrams": 0, "tx_gso_sends": 0, "tx_errors": 0, "gso_disabled": 0}

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def recv_batch(self, limit: int) -> list:
        out: list = []
        append = out.append
        norm = self.addrs.norm
        buf, view = self._buf, self._view
        sock = self.sock
        gro = self.gro or self._gro_draining
        coalesced = 0
        while len(out) < limit:
            try:
                if gro:
                    n, anc, _flags, raw = sock.recvmsg_into([buf], _GRO_CMSG_SPACE)
                else:
                    n, raw = sock.recvfrom_into(buf)
                    anc = None
            except (BlockingIOError, InterruptedError):
                self._gro_draining = False        # the queue ran dry: recvfrom from now on
                break
            except OSError:                       # e.g. an ICMP error queued on the socket
                self.counters["rx_errors"] += 1
                break
            addr = norm(raw)
            seg = _gro_segment(anc) if anc else 0
            if seg and n > seg:
                coalesced += 1
                whole = memoryview(bytes(view[:n]))
                for off in range(0, n, seg):
                    append((whole[off:off + seg], addr))
            else:
                append((bytes(view[:n]), addr))
        self.counters["rx_datagrams"] += len(out)
        if self._gro_capable:
            self._gro_account(len(out), coalesced)
        return out

    def _gro_account(self, n: int, coalesced: int) -> None:
        if coalesced:
            self.counters["rx_gro_buffers"] += coalesced
            self._gro_idle = 0
            return
        self._gro_idle += n
        if self.gro and self._gro_idle >= GRO_IDLE_LIMIT:
            if _set_gro(self.sock, False):
                self.gro, self._gro_draining, self._gro_idle = False, True, 0
                self.counters["gro_paused"] += 1
        elif not self.gro and self._gro_idle >= GRO_RETRY_AFTER:
            self._gro_idle = 0
            self.gro = _set_gro(self.sock, True)

    def send_batch(self, datagrams) -> int:
        """Send [(data, (ip, port))]; returns how many went out (the rest are counted errors)."""
        if not self.gso:
            return self._send_plain(datagrams, 0, len(datagrams))
        sent = 0
        i, n = 0, len(datagrams)
        while i < n:
            data, ep = datagrams[i]
            size = len(data)
            j, total = i + 1, size
            while j < n and j - i < GSO_MAX_SEGMENTS:
                d2, ep2 = datagrams[j]
                l2 = len(d2)
                if l2 > size or (ep2 is not ep and ep2 != ep) or total + l2 > GSO_MAX_BYTES:
                    break
                total += l2
                j += 1
                if l2 < size:                     # a shorter datagram ends the run
                    break
            if j - i == 1 or not self.gso:
                sent += self._send_plain(datagrams, i, j)
            else:
                sent += self._send_gso(datagrams, i, j, size, ep)
            i = j
        return sent

    def _send_gso(self, datagrams, i: int, j: int, size: int, ep) -> int:
        try:
            self.sock.sendmsg([d for d, _ in datagrams[i:j]],
                              [(SOL_UDP, UDP_SEGMENT, _SEG_SIZE(size))], 0, self.addrs.sockaddr(ep))
        except (BlockingIOError, InterruptedError):
            self.counters["tx_errors"] += j - i   # socket buffer full: UDP may drop
            return 0
        except OSError as e:
            if e.errno in _GSO_REFUSED:
                self.gso = False                  # this kernel/device cannot segment for us
                self.counters["gso_disabled"] += 1
                return self._send_plain(datagrams, i, j)
            self.counters["tx_errors"] += j - i
            return 0
        self.counters["tx_gso_sends"] += 1
        self.counters["tx_datagrams"] += j - i
        return j - i

    def _send_plain(self, datagrams, i: int, j: int) -> int:
        sendto = self.sock.sendto
        sockaddr = self.addrs.sockaddr
        sent = 0
        for k in range(i, j):
            data, ep = datagrams[k]
            try:
                sendto(data, sockaddr(ep))
                sent += 1
            except OSError:                       # buffer full, unreachable...: UDP may drop
                self.counters["tx_errors"] += 1
        self.counters["tx_datagrams"] += sent
        return sent

    def close(self) -> None:
        self.sock.close()


_GSO_REFUSED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


def _set_gro(sock: socket.socket, on: bool) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1 if on else 0)
        return True
    except OSError:
        return False


def _enable_gro(sock: socket.socket) -> bool:
    return _set_gro(sock, True)


def _gso_available(sock: socket.socket) -> bool:
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)     # 0 on kernels that know the option
        return True
    except OSError:
        return False


def _gro_segment(anc) -> int:
    for level, kind, data in anc:
        if level == SOL_UDP and kind == UDP_GRO:
            if len(data) >= 4:
                return struct.unpack_from("=i", data)[0]
            if len(data) >= 2:
                return struct.unpack_from("=H", data)[0]
    return 0
