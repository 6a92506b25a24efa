"""asyncio face of the netstack: one timer, batched output, and TCP streams with backpressure.

`NetstackRuntime.deliver(packets)` feeds inbound IP packets; outbound packets go to
`send_packets(list)` once per batch (app writes are coalesced with `call_soon`).  Streams
implement the subset of asyncio.StreamReader/StreamWriter the proxies use, on one object:

  * reading pulls straight from the connection's bounded receive buffer, so an application
    that stops reading closes the TCP window;
  * writing hands bytes to the connection's bounded send buffer; what does not fit waits in
    the stream and `drain()` blocks until it has moved on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from tsproxy.aio import DeadlineTimer
from tsproxy.errors import (ConnectionRefused, DialError, DialTimeout, HostUnreachable,
                            NetworkUnreachable, NotAllowed)
from tsproxy.netstack import tcp as T

log = logging.getLogger(__name__)

DRAIN_LOW = 64 * 1024


def _dial_error(kind: str | None, where: str) -> DialError:
    if kind in ("refused", "reset"):
        return ConnectionRefused(f"{where}: connection refused")
    if kind == "prohibited":
        return NotAllowed(f"{where}: administratively prohibited")
    if kind == "timeout" or kind == "dial_timeout":
        return DialTimeout(f"{where}: connection timed out")
    if kind == "ttl":
        return HostUnreachable(f"{where}: TTL expired in transit")
    return HostUnreachable(f"{where}: host unreachable")


class TcpStream:
    """A TCP connection on the netstack, usable as both reader and writer."""

    def __init__(self, rt: "NetstackRuntime", conn: T.TcpConnection):
        self.rt = rt
        self.conn = conn
        self.loop = rt.loop
        self._rbuf = bytearray()                  # leftovers of readline/readexactly
        self._wpending = bytearray()
        self._read_waiter: asyncio.Future | None = None
        self._drain_waiters: list[asyncio.Future] = []
        self._closed_fut = self.loop.create_future()
        self.connected = self.loop.create_future()
        self._eof_wanted = False
        self._closing = False
        self.error: str | None = None

    # ---- events from the connection
    def _on_event(self, kind, detail) -> None:
        if kind == T.EV_CONNECTED:
            if not self.connected.done():
                self.connected.set_result(None)
        elif kind == T.EV_READABLE or kind == T.EV_EOF:
            self._wake_reader()
        elif kind == T.EV_WRITABLE:
            self._push_pending()
        elif kind == T.EV_ERROR:
            self.error = detail
            if not self.connected.done():
                self.connected.set_exception(_dial_error(detail, "%s:%d" % self._address(0)))
            self._wake_all()
        elif kind == T.EV_CLOSED:
            if not self.connected.done():
                self.connected.set_exception(_dial_error(self.error or "reset", "%s:%d" % self._address(0)))
            self._wake_all()
            if not self._closed_fut.done():
                self._closed_fut.set_result(None)

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_all(self) -> None:
        self._wake_reader()
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # ---- reader API
    def _pull(self, n: int) -> bytes:
        data = self.conn.recv(n, self.loop.time())
        if data:
            self.rt.touch(self.conn)
        return data

    def _eof(self) -> bool:
        c = self.conn
        return (c.eof or c.state == T.CLOSED) and not c.rcv_buf

    async def _wait_readable(self) -> None:
        if self.conn.rcv_buf or self._eof() or self.error:
            return
        self._read_waiter = self.loop.create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    async def read(self, n: int = -1) -> bytes:
        if self._rbuf:
            k = len(self._rbuf) if n < 0 else min(n, len(self._rbuf))
            data = bytes(self._rbuf[:k])
            del self._rbuf[:k]
            return data
        if n == 0:
            return b""
        while True:
            if self.conn.rcv_buf:
                return self._pull(n if n > 0 else 1 << 30)
            if self.error and self.error != "timeout" and not self.conn.eof:
                raise ConnectionResetError(f"connection {self.error}")
            if self._eof():
                if self.error == "timeout":
                    raise TimeoutError("connection timed out")
                return b""
            await self._wait_readable()

    def read_nowait(self, n: int) -> bytes:
        """Up to n bytes that are already here, without waiting (b"" when none are)."""
        if self._rbuf:
            k = min(n, len(self._rbuf))
            data = bytes(self._rbuf[:k])
            del self._rbuf[:k]
            return data
        if self.conn.rcv_buf and n > 0:
            return self._pull(n)
        return b""

    async def readexactly(self, n: int) -> bytes:
        while len(self._rbuf) < n:
            chunk = await self._read_more()
            if not chunk:
                partial = bytes(self._rbuf)
                self._rbuf.clear()
                raise asyncio.IncompleteReadError(partial, n)
        data = bytes(self._rbuf[:n])
        del self._rbuf[:n]
        return data

    async def readuntil(self, separator: bytes = b"\n", limit: int = 65536) -> bytes:
        start = 0
        while True:
            i = self._rbuf.find(separator, start)
            if i >= 0:
                end = i + len(separator)
                data = bytes(self._rbuf[:end])
                del self._rbuf[:end]
                return data
            if len(self._rbuf) > limit:
                raise asyncio.LimitOverrunError("separator not found within the limit", len(self._rbuf))
            start = max(0, len(self._rbuf) - len(separator) + 1)
            chunk = await self._read_more()
            if not chunk:
                partial = bytes(self._rbuf)
                self._rbuf.clear()
                raise asyncio.IncompleteReadError(partial, None)

    async def readline(self) -> bytes:
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial

    async def _read_more(self) -> bytes:
        while True:
            if self.conn.rcv_buf:
                chunk = self._pull(1 << 30)
                self._rbuf += chunk
                return chunk
            if self._eof() or (self.error and self.error != "timeout"):
                return b""
            await self._wait_readable()

    def at_eof(self) -> bool:
        return not self._rbuf and self._eof()

    # ---- writer API
    def write(self, data) -> None:
        if self._closing or self._eof_wanted:
            raise RuntimeError("write after close or write_eof")
        if not data:
            return
        if self.error or self.conn.state == T.CLOSED:
            return                                  # drain() reports it
        if self._wpending:
            self._wpending += data
        else:
            n = self.conn.send(data, self.loop.time())
            if n < len(data):
                self._wpending += memoryview(data)[n:]
            self.rt.touch(self.conn)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def _push_pending(self) -> None:
        if self._wpending:
            n = self.conn.send(self._wpending, self.loop.time())
            if n:
                del self._wpending[:n]
                self.rt.touch(self.conn)
        if not self._wpending:
            if self._eof_wanted:
                self.conn.shutdown_write(self.loop.time())
                self.rt.touch(self.conn)
        if len(self._wpending) <= DRAIN_LOW:
            for w in self._drain_waiters:
                if not w.done():
                    w.set_result(None)
            self._drain_waiters.clear()

    async def drain(self) -> None:
        while True:
            if self.error or self.conn.state == T.CLOSED and self._wpending:
                raise ConnectionResetError(f"connection {self.error or 'closed'}")
            if len(self._wpending) <= DRAIN_LOW:
                return
            w = self.loop.create_future()
            self._drain_waiters.append(w)
            await w

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_wanted:
            return
        self._eof_wanted = True
        if not self._wpending:
            self.conn.shutdown_write(self.loop.time())
            self.rt.touch(self.conn)

    def close(self) -> None:
        """Graceful: queued bytes still go out, then FIN."""
        if self._closing:
            return
        self._closing = True
        self._eof_wanted = True
        self.conn.app_closed = True
        if not self._wpending:
            self.conn.close(self.loop.time())
        self.rt.touch(self.conn)
        if self.conn.state == T.CLOSED and not self._closed_fut.done():
            self._closed_fut.set_result(None)

    def abort(self) -> None:
        self._closing = True
        self._wpending.clear()
        self.conn.abort(self.loop.time())
        self.rt.touch(self.conn)
        self._wake_all()
        if not self._closed_fut.done():
            self._closed_fut.set_result(None)

    def is_closing(self) -> bool:
        return self._closing or self.conn.state == T.CLOSED

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed_fut)

    def get_extra_info(self, name: str, default=None):
        if name == "peername":
            return self._address(0)
        if name == "sockname":
            return self._address(2)
        return default

    def _address(self, i: int) -> tuple[str, int]:
        """(ip text, port) of the key's remote (0) or local (2) end, made when asked."""
        key = self.conn.key
        raw = key[i]
        text = socket.inet_ntoa(raw) if len(raw) == 4 else str(ipaddress.IPv6Address(raw))
        return text, key[i + 1]


class UdpEndpoint:
    """A UDP socket on the netstack."""

    def __init__(self, rt: "NetstackRuntime", sock):
        self.rt = rt
        self.sock = sock
        self._waiter: asyncio.Future | None = None
        sock.notify = self._notify

    def _notify(self, sock, kind) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def port(self) -> int:
        return self.sock.port

    def sendto(self, data: bytes, addr) -> None:
        self.sock.sendto(data, addr)
        self.rt.kick()

    async def recvfrom(self):
        while True:
            item = self.sock.recvfrom()
            if item is not None:
                return item
            if self.sock.error:
                err, self.sock.error = self.sock.error, None
                raise _dial_error(err, "udp")
            if self.sock.closed:
                raise ConnectionError("UDP endpoint closed")
            self._waiter = self.rt.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        self.sock.close()
        self._notify(self.sock, "closed")


class NetstackRuntime:
    def __init__(self, stack, send_packets):
        self.stack = stack
        self.send_packets = send_packets
        self.loop = asyncio.get_running_loop()
        self.streams: dict = {}
        self.servers: dict = {}                    # port -> callback
        self._tasks: set = set()
        self._timer = DeadlineTimer(self.loop, self._on_timer)
        self._kicked = False
        self.closed = False
        self.counters = stack.counters

    # ---- plumbing
    def deliver(self, packets) -> None:
        self.stack.receive_packets(packets, self.loop.time())
        self._process()

    def touch(self, conn) -> None:
        self.stack.poke(conn)
        self.kick()

    def kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._on_kick)

    def _on_kick(self) -> None:
        self._kicked = False
        self._process()

    def _process(self) -> None:
        if self.closed:
            return
        for conn in self.stack.take_touched():
            events = conn.take_events()
            stream = self.streams.get(conn)
            if stream is None:
                if conn.passive and any(e[0] == T.EV_CONNECTED for e in events):
                    stream = self._accept(conn)
                if stream is None:
                    continue
            for kind, detail in events:
                stream._on_event(kind, detail)
            if conn.state == T.CLOSED or conn.state == T.TIME_WAIT:
                self.streams.pop(conn, None)
        self.stack.service_budget(self.loop.time())
        out = self.stack.packets_to_send()
        if out:
            self.send_packets(out)
        self._arm()

    def _arm(self) -> None:
        self._timer.arm(self.stack.next_deadline())

    def _on_timer(self) -> None:
        self.stack.handle_timer(self.loop.time())
        self._process()

    # ---- TCP
    async def open_connection(self, ip, port: int, *, timeout: float = 10.0):
        if self.closed:
            raise NetworkUnreachable("the tunnel is shut down")
        try:
            # the deadline is the connection's own, on the stack's one timer
            conn = self.stack.tcp_connect(ip, port, self.loop.time(), timeout=timeout)
        except ValueError as e:
            raise HostUnreachable(str(e)) from None
        stream = TcpStream(self, conn)
        self.streams[conn] = stream
        self.kick()
        try:
            await stream.connected
        except DialTimeout:
            stream.abort()
            if stream.error != "dial_timeout":
                raise
            where = f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
            raise DialTimeout(f"{where}: no answer within {timeout:g} s") from None
        except BaseException:
            stream.abort()
            raise
        return stream, stream

    def _accept(self, conn):
        cb = self.servers.get(conn.key[3])
        if cb is None:
            conn.abort(self.loop.time())
            return None
        stream = TcpStream(self, conn)
        stream.connected.set_result(None)
        self.streams[conn] = stream
        task = self.loop.create_task(self._serve(cb, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    async def _serve(self, cb, stream) -> None:
        try:
            await cb(stream, stream)
        except Exception:
            log.exception("tunnel connection handler failed")
            stream.abort()

    async def start_server(self, port: int, client_connected_cb):
        if port in self.servers:
            raise OSError(f"tunnel port {port} is already served")
        self.servers[port] = client_connected_cb
        self.stack.tcp_listen(port)
        return _TunnelServer(self, port)

    # ---- UDP
    async def open_udp(self, local_port: int = 0) -> UdpEndpoint:
        return UdpEndpoint(self, self.stack.udp_bind(local_port))

    async def aclose(self) -> None:
        if self.closed:
            return
        for stream in list(self.streams.values()):
            stream.abort()
        self._process()
        self.closed = True
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._timer.cancel()


class _TunnelServer:
    def __init__(self, rt: NetstackRuntime, port: int):
        self.rt = rt
        self.port = port

    def close(self) -> None:
        self.rt.servers.pop(self.port, None)
        self.rt.stack.tcp_unlisten(self.port)

    async def wait_closed(self) -> None:
        return None
