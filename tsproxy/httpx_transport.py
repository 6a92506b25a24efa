"""httpx over a tsproxy.Node: an httpcore network backend whose TCP connections are the node's.

    async with httpx.AsyncClient(transport=node.httpx_transport()) as client:
        await client.get("http://peer-a/")

https:// works too: TLS runs over the tailnet stream through an ssl.MemoryBIO pair.
Install with `pip install tsproxy[httpx]`.
"""

from __future__ import annotations

import ssl

try:
    import httpcore
    import httpx
except ImportError as e:                       # pragma: no cover - depends on the install
    raise ImportError("node.httpx_transport() needs httpx: pip install 'tsproxy[httpx]'") from e

from tsproxy.errors import DialError, DialTimeout

READ_SIZE = 256 * 1024


class NodeStream(httpcore.AsyncNetworkStream):
    def __init__(self, reader, writer):
        self._r = reader
        self._w = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            if timeout is None:
                return await self._r.read(max_bytes)
            import asyncio
            async with asyncio.timeout(timeout):
                return await self._r.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no data within {timeout:g} s") from None
        except (OSError, DialError) as e:
            raise httpcore.ReadError(str(e)) from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._w.write(buffer)
            await self._w.drain()
        except (OSError, DialError) as e:
            raise httpcore.WriteError(str(e)) from None

    async def aclose(self) -> None:
        self._w.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        tls = TlsStream(self, ssl_context, server_hostname)
        await tls.handshake(timeout)
        return tls

    def get_extra_info(self, info: str):
        return self._w.get_extra_info(info) if info in ("peername", "sockname") else None


class TlsStream(httpcore.AsyncNetworkStream):
    """TLS over a NodeStream with ssl.MemoryBIO (the tailnet stream is not a socket)."""

    def __init__(self, raw: NodeStream, ctx: ssl.SSLContext, server_hostname: str | None):
        self._raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self._raw.write(data)

    async def _io(self, fn, *args, timeout=None):
        while True:
            try:
                result = fn(*args)
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._raw.read(READ_SIZE, timeout)
                if not data:
                    self._in.write_eof()
                else:
                    self._in.write(data)
                continue
            except ssl.SSLError as e:
                raise httpcore.ConnectError(f"TLS: {e}") from None
            await self._flush()
            return result

    async def handshake(self, timeout) -> None:
        await self._io(self._ssl.do_handshake, timeout=timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await self._io(self._ssl.read, max_bytes, timeout=timeout)
        except ssl.SSLZeroReturnError:
            return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        while view:
            n = await self._io(self._ssl.write, view, timeout=timeout)
            view = view[n:]

    async def aclose(self) -> None:
        await self._raw.aclose()

    def get_extra_info(self, info: str):
        if info == "ssl_object":
            return self._ssl
        return self._raw.get_extra_info(info)


class NodeBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, node):
        self.node = node

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None):
        try:
            r, w = await self.node.open_connection(host, port, timeout=timeout)
        except DialTimeout as e:
            raise httpcore.ConnectTimeout(str(e)) from None
        except DialError as e:
            raise httpcore.ConnectError(str(e)) from None
        return NodeStream(r, w)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("a tsproxy.Node has no unix sockets")

    async def sleep(self, seconds: float) -> None:
        import asyncio
        await asyncio.sleep(seconds)


class NodeTransport(httpx.AsyncHTTPTransport):
    """httpx.AsyncHTTPTransport whose connection pool dials through the node."""

    def __init__(self, node, *, verify=True, cert=None, http1: bool = True, http2: bool = False,
                 limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20),
                 retries: int = 0):
        super().__init__(verify=verify, cert=cert, trust_env=False, http1=http1, http2=http2,
                         limits=limits, retries=retries)
        # the pool httpx built is replaced by one on our backend (same settings); httpx's request
        # mapping and error translation in handle_async_request stay as they are
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, cert=cert, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, http1=http1, http2=http2, retries=retries,
            network_backend=NodeBackend(node))
