"""Reverse forwards: tunnel connections to our tunnel address on TPORT are connected to a local
service (wireproxy's TCPServerTunnel)."""

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
        self._server = await self.netstack.start_server(self.spec.tunnel_port, self._on_conn)

    def describe(self) -> dict:
        return {"tunnel_port": self.spec.tunnel_port,
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
