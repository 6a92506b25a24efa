"""Reverse forwards: tunnel connections to our tunnel address on TPORT are connected to a local
service (wireproxy's TCPServerTunnel); `udp:` specs relay datagrams, one local socket per
tunnel source, expired after a minute of silence."""

from __future__ import annotations

import asyncio
import logging

from tsproxy.proxy.aio.relay import abort, relay
from tsproxy.proxy.specs import ReverseSpec, fmt_hostport

log = logging.getLogger(__name__)


class ReverseForward:
    def __init__(self, netstack, spec: ReverseSpec):
        self.netstack = netstack
        self.spec = spec
        self._server = None
        self.stats = {"connections": 0, "failures": 0}

    async def start(self) -> None:
        if self.spec.proto == "udp":
            self._udp = UdpReverse(self.netstack, self.spec, self.stats)
            await self._udp.start()
            return
        self._server = await self.netstack.start_server(self.spec.tunnel_port, self._on_conn)

    _udp = None

    def describe(self) -> dict:
        return {"proto": self.spec.proto, "tunnel_port": self.spec.tunnel_port,
                "target": fmt_hostport(self.spec.local_host, self.spec.local_port), **self.stats}

    async def _on_conn(self, reader, writer) -> None:
        self.stats["connections"] += 1
        try:
            lr, lw = await asyncio.wait_for(
                asyncio.open_connection(self.spec.local_host, self.spec.local_port), 10)
        except (OSError, TimeoutError) as e:
            self.stats["failures"] += 1
            log.info("reverse %s: local service unreachable (%s)", self.spec.text, e)
            abort(writer)
            return
        try:
            await relay(reader, writer, lr, lw)
        except (ConnectionError, OSError, TimeoutError):
            pass

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._udp is not None:
            await self._udp.aclose()


UDP_IDLE = 60.0
UDP_MAX_SESSIONS = 256


class _LocalSide(asyncio.DatagramProtocol):
    def __init__(self, on_reply):
        self.on_reply = on_reply
        self.last = 0.0

    def datagram_received(self, data, addr):
        self.on_reply(data)


class UdpReverse:
    def __init__(self, netstack, spec: ReverseSpec, stats: dict):
        self.netstack, self.spec, self.stats = netstack, spec, stats
        self.sessions: dict = {}                  # tunnel source (ip, port) -> (transport, proto)
        self._ep = None
        self._task = None

    async def start(self) -> None:
        self._ep = await self.netstack.open_udp(self.spec.tunnel_port)
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data, src = await self._ep.recvfrom()
            now = loop.time()
            sess = self.sessions.get(src)
            if sess is None:
                self._expire(now)
                if len(self.sessions) >= UDP_MAX_SESSIONS:
                    self.stats["failures"] += 1
                    continue
                try:
                    tr, proto = await loop.create_datagram_endpoint(
                        lambda s=src: _LocalSide(lambda d, s=s: self._ep.sendto(d, s)),
                        remote_addr=(self.spec.local_host, self.spec.local_port))
                except OSError as e:
                    self.stats["failures"] += 1
                    log.info("reverse %s: local service unreachable (%s)", self.spec.text, e)
                    continue
                self.stats["connections"] += 1
                sess = self.sessions[src] = (tr, proto)
            sess[1].last = now
            sess[0].sendto(data)

    def _expire(self, now: float) -> None:
        for src, (tr, proto) in list(self.sessions.items()):
            if now - proto.last > UDP_IDLE:
                tr.close()
                del self.sessions[src]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for tr, _ in self.sessions.values():
            tr.close()
        self.sessions.clear()
        if self._ep is not None:
            self._ep.close()
