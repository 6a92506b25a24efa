"""Static port forwards: 127.0.0.1:LPORT -> HOST:PORT through the dialer (TCP and UDP).

TCP: every accepted connection is dialed and relayed; a failed dial closes that one client
connection and nothing else.  UDP: one tunnel UDP session per client address, idle sessions
expire, the number of sessions is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tsproxy.errors import DialError
from tsproxy.proxy.aio.relay import abort, relay
from tsproxy.proxy.specs import ForwardSpec, fmt_hostport

log = logging.getLogger(__name__)

UDP_IDLE = 60.0
UDP_MAX_SESSIONS = 1024


class ForwardServer:
    def __init__(self, dialer, spec: ForwardSpec):
        self.dialer = dialer
        self.spec = spec
        self.key = spec.key
        self._server: asyncio.AbstractServer | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self.last_error: str | None = None         # the last dial failure, logged once
        self._tasks: set = set()
        self._sessions: dict = {}
        self.stats = {"connections": 0, "active": 0, "dial_failures": 0, "bytes_out": 0, "bytes_in": 0}
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        s = self.spec
        if s.proto == "tcp":
            self._server = await asyncio.start_server(self._on_client, s.listen_host, s.listen_port,
                                                      limit=256 * 1024, reuse_address=True)
            self.bound = self._server.sockets[0].getsockname()[:2]
        else:
            loop = asyncio.get_running_loop()
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpForwardProtocol(self), local_addr=(s.listen_host, s.listen_port))
            self.bound = self._udp.get_extra_info("sockname")[:2]

    def describe(self) -> dict:
        host, port = self.bound or (self.spec.listen_host, self.spec.listen_port)
        return {"proto": self.spec.proto, "listen": fmt_hostport(host, port),
                "target": fmt_hostport(self.spec.host, self.spec.port), **self.stats,
                "last_error": self.last_error}

    async def _on_client(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.stats["connections"] += 1
        self.stats["active"] += 1
        try:
            try:
                tr, tw = await self.dialer.open_connection(self.spec.host, self.spec.port)
            except DialError as e:
                self.stats["dial_failures"] += 1
                if str(e) != self.last_error:         # once per reason, not per connection
                    self.last_error = str(e)
                    log.warning("forward %s: %s (closing its connections until this changes)",
                                self.spec.text, e)
                abort(writer)                       # RST tells the client it failed
                return
            counters = [[0], [0]]
            await relay(reader, writer, tr, tw, counters=counters)
            self.stats["bytes_out"] += counters[0][0]
            self.stats["bytes_in"] += counters[1][0]
        except (ConnectionError, OSError, TimeoutError) as e:
            log.debug("forward %s connection ended: %r", self.spec.text, e)
        finally:
            self.stats["active"] -= 1
            self._tasks.discard(task)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._udp is not None:
            self._udp.close()
        for sess in list(self._sessions.values()):
            sess.close()
        self._sessions.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


class _UdpSession:
    def __init__(self, fwd: ForwardServer, client):
        self.fwd = fwd
        self.client = client
        self.last = time.monotonic()
        self.relay = None
        self.task: asyncio.Task | None = None

    async def send(self, data: bytes) -> None:
        self.last = time.monotonic()
        if self.relay is None:
            self.relay = await self.fwd.dialer.open_udp()
            self.task = asyncio.ensure_future(self._replies())
        await self.relay.sendto(data, self.fwd.spec.host, self.fwd.spec.port)
        self.fwd.stats["bytes_out"] += len(data)

    async def _replies(self) -> None:
        while True:
            try:
                async with asyncio.timeout(UDP_IDLE):
                    data, _ = await self.relay.recvfrom()
            except TimeoutError:
                if time.monotonic() - self.last >= UDP_IDLE:
                    self.fwd._sessions.pop(self.client, None)
                    self.close()
                    return
                continue
            self.fwd.stats["bytes_in"] += len(data)
            if self.fwd._udp is not None:
                self.fwd._udp.sendto(data, self.client)

    def close(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        if self.relay is not None:
            self.relay.close()


class _UdpForwardProtocol(asyncio.DatagramProtocol):
    def __init__(self, fwd: ForwardServer):
        self.fwd = fwd

    def datagram_received(self, data, addr):
        fwd = self.fwd
        sess = fwd._sessions.get(addr)
        if sess is None:
            if len(fwd._sessions) >= UDP_MAX_SESSIONS:
                oldest = min(fwd._sessions.values(), key=lambda s: s.last)
                fwd._sessions.pop(oldest.client, None)
                oldest.close()
            sess = fwd._sessions[addr] = _UdpSession(fwd, addr)
            fwd.stats["connections"] += 1
        task = asyncio.ensure_future(self._send(sess, data))
        fwd._tasks.add(task)
        task.add_done_callback(fwd._tasks.discard)

    async def _send(self, sess, data):
        try:
            await sess.send(data)
        except DialError as e:
            self.fwd.stats["dial_failures"] += 1
            log.info("udp forward %s: %s", self.fwd.spec.text, e)
