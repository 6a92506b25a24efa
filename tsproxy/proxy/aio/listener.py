"""One listening port, two protocols: first byte 0x05 -> SOCKS5, 0x04 -> SOCKS4/4a, anything else
HTTP (CONNECT, absolute-URI forward proxying, /proxy.pac).  `protocols` restricts a listener to
"socks5" (SOCKS5 and SOCKS4) or "http" for the separate --socks5 / --http-proxy flags.

Every handshake is bounded by handshake_timeout (slowloris clients are closed) and every buffer
by a fixed size; a bad client gets its protocol's error reply and is closed, and nothing it does
affects the other connections (each lives in its own task).
"""

from __future__ import annotations

import asyncio
import logging

from tsproxy.errors import DialError, RemoteProtocolError
from tsproxy.proxy.aio import http_server, socks_server
from tsproxy.proxy.aio.http_server import UpstreamPool
from tsproxy.proxy.pac import PacConfig

log = logging.getLogger(__name__)


class ProxyServer:
    def __init__(self, dialer, *, listen=("127.0.0.1", 1055), auth=None, pac: PacConfig | None = None,
                 protocols: str = "mixed", handshake_timeout: float = 10.0):
        if protocols not in ("mixed", "socks5", "http"):
            raise ValueError(f"unknown listener kind {protocols!r}")
        self.dialer = dialer
        self.listen = listen
        self.auth = auth
        self.pac = pac or PacConfig()
        self.protocols = protocols
        self.handshake_timeout = handshake_timeout
        self.server = None
        self.http_pool = UpstreamPool()
        self._conns: set[asyncio.Task] = set()
        self.counters = {"accepted": 0, "socks5": 0, "socks4": 0, "http": 0, "bad_request": 0,
                         "auth_failed": 0, "handshake_timeout": 0, "dial_failed": 0}

    async def start(self) -> None:
        host, port = self.listen
        self.server = await asyncio.start_server(self._accept, host, port, limit=64 * 1024,
                                                 reuse_address=True, backlog=1024)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.sockets[0].getsockname()[:2]

    @property
    def sockets(self):
        return self.server.sockets if self.server else ()

    @property
    def open_connections(self) -> int:
        """Client connections being served now."""
        return len(self._conns)

    def address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        self.http_pool.close()
        if self.server is not None:
            await self.server.wait_closed()

    async def _accept(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)
        self.counters["accepted"] += 1
        # (TCP_NODELAY: asyncio and uvloop set it on every accepted TCP socket)
        try:
            req = None
            try:
                # one timer for the first byte and the whole SOCKS handshake
                async with asyncio.timeout(self.handshake_timeout):
                    first = await reader.read(1)
                    if not first:
                        return
                    kind = first[0]
                    socks = kind in (4, 5)
                    if socks and self.protocols != "http":
                        self.counters["socks5" if kind == 5 else "socks4"] += 1
                        req = await socks_server.handshake(self, first, reader, writer)
                        if req is None:
                            return
            except TimeoutError:
                self.counters["handshake_timeout"] += 1
                return
            if req is not None:
                await socks_server.serve(self, req, reader, writer)
            elif not socks and self.protocols != "socks5":
                self.counters["http"] += 1
                await http_server.serve(self, first, reader, writer)
            else:
                self.counters["bad_request"] += 1
        except (ConnectionError, RemoteProtocolError, DialError, asyncio.IncompleteReadError) as e:
            log.debug("proxy connection ended: %s", e)
        except Exception:
            log.exception("proxy connection failed")
        finally:
            transport = writer.transport
            if transport.get_write_buffer_size():
                try:
                    await asyncio.wait_for(writer.drain(), 1.0)
                except (Exception, asyncio.CancelledError):
                    pass
            transport.abort() if transport.get_write_buffer_size() else writer.close()
