"""The test control server's HTTPS listener: asyncio.start_server's interface, but a client that
speaks plain HTTP to it gets `400 Client sent an HTTP request to an HTTPS server` (as from Go's
net/http) instead of a failed handshake.

    srv = await start_tls_server(handler, host, port, ssl_context, limit=...)
    srv.sockets[0].getsockname(); srv.close(); await srv.wait_closed()

Each accepted socket is peeked (MSG_PEEK, nothing consumed): a first byte of 0x16 is a TLS
handshake record and the socket is handed to TLS; anything else is answered and closed.
Failed handshakes close only their own connection, quietly.
"""

from __future__ import annotations

import asyncio
import logging
import socket

log = logging.getLogger(__name__)
TLS_HANDSHAKE = b"\x16"
MAX_PLAIN_HEAD = 16 << 10
PLAIN_HTTP_REPLY = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close"
                    b"\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")


async def start_tls_server(handler, host: str, port: int, ctx, *, limit: int,
                           handshake_timeout: float = 10.0) -> "TlsServer":
    srv = TlsServer(handler, ctx, limit=limit, handshake_timeout=handshake_timeout)
    await srv.listen(host, port)
    return srv


class TlsServer:
    def __init__(self, handler, ctx, *, limit: int, handshake_timeout: float):
        self._handler, self._ctx = handler, ctx
        self._limit, self._timeout = limit, handshake_timeout
        self.sockets: list[socket.socket] = []
        self._accept: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.counters = {"accepted": 0, "plain_http_refused": 0, "handshake_failed": 0}

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sockets = [sock]
        self._accept = loop.create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:                  # EMFILE and friends: do not spin
                log.debug("test control: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            self.counters["accepted"] += 1
            t = loop.create_task(self._serve(conn))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                first = await _peek(loop, conn)
            if first != TLS_HANDSHAKE:
                if first:
                    self.counters["plain_http_refused"] += 1
                    await self._refuse_plain(loop, conn)
                conn.close()
                return
            reader = asyncio.StreamReader(limit=self._limit)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._ctx, ssl_handshake_timeout=self._timeout)
        except (OSError, TimeoutError):           # ssl.SSLError is an OSError
            self.counters["handshake_failed"] += 1
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self._handler(reader, writer)

    async def _refuse_plain(self, loop, conn: socket.socket) -> None:
        # read the request head first and half-close after the answer: closing with unread
        # bytes would send a reset and the client might never see the 400
        head = b""
        async with asyncio.timeout(self._timeout):
            while b"\r\n\r\n" not in head and len(head) < MAX_PLAIN_HEAD:
                chunk = await loop.sock_recv(conn, 4096)
                if not chunk:
                    break
                head += chunk
            await loop.sock_sendall(conn, PLAIN_HTTP_REPLY)
            conn.shutdown(socket.SHUT_WR)
            while await loop.sock_recv(conn, 4096):     # until the client closes too
                pass

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        if self._accept is not None:
            self._accept.cancel()
        for t in list(self._tasks):
            t.cancel()

    async def wait_closed(self) -> None:
        pending = [t for t in (self._accept, *self._tasks) if t is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _peek(loop, conn: socket.socket) -> bytes:
    """The first byte the client sent, left in the socket (b"" if it closed first)."""
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        ready = loop.create_future()
        loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(conn.fileno())
