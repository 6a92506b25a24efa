"""HTTP proxy: CONNECT tunnels, absolute-URI forward proxying with streamed bodies and keep-alive
to the client, and the PAC file at /proxy.pac.  Idle upstream connections are pooled per
host:port (UpstreamPool, shared by all clients of one listener, bounded, with an idle timeout)."""

from __future__ import annotations

import asyncio
import re

from tsproxy.errors import (DialError, DialTimeout, NotAllowed,
                            RemoteProtocolError)
from tsproxy.proxy import http
from tsproxy.proxy.aio.relay import relay

CHUNK = 64 * 1024
MAX_CHUNK_LINE = 4096
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
KEEPALIVE_IDLE = 120.0


class UpstreamPool:
    """Idle keep-alive upstream connections per (host, port); at most `per_host` each and
    `total` overall, dropped after `idle` seconds or as soon as the upstream closed them."""

    def __init__(self, per_host: int = 8, total: int = 256, idle: float = 30.0):
        self.per_host, self.total, self.idle = per_host, total, idle
        self._idle: dict[tuple, list] = {}
        self._count = 0
        self.counters = {"reused": 0, "opened": 0, "expired": 0}

    def take(self, key, epoch: int = 0):
        """`epoch` is the dialer's route_epoch: a connection pooled under other routes (another
        exit node, routes no longer accepted) is not reused, it may lead nowhere now."""
        now = asyncio.get_running_loop().time()
        conns = self._idle.get(key)
        while conns:
            ur, uw, ubuf, since, e = conns.pop()
            self._count -= 1
            if ur.at_eof() or uw.is_closing() or ubuf or now - since > self.idle or e != epoch:
                self.counters["expired"] += 1
                uw.close()
                continue
            self.counters["reused"] += 1
            return ur, uw, ubuf
        return None

    def put(self, key, ur, uw, ubuf, epoch: int = 0) -> None:
        conns = self._idle.setdefault(key, [])
        if len(conns) >= self.per_host or self._count >= self.total or ubuf:
            uw.close()
            return
        conns.append((ur, uw, ubuf, asyncio.get_running_loop().time(), epoch))
        self._count += 1

    def close(self) -> None:
        for conns in self._idle.values():
            for _, uw, _, _, _ in conns:
                uw.close()
        self._idle.clear()
        self._count = 0


def _dial_status(e: DialError) -> tuple[int, str]:
    if isinstance(e, NotAllowed):
        return 403, "Forbidden"
    if isinstance(e, DialTimeout):
        return 504, "Gateway Timeout"
    return 502, "Bad Gateway"


async def _read_head(reader, buf: bytearray, parse, limit=http.MAX_HEAD):
    while True:
        r = parse(buf, limit)
        if r is not None:
            head, used = r
            del buf[:used]
            return head
        data = await reader.read(CHUNK)
        if not data:
            if buf:
                raise RemoteProtocolError("connection closed inside a header block")
            return None
        buf += data


class _Body:
    """Reads a message body from `reader` (after `buf`, already-received bytes) and copies it,
    framing untouched, to `writer`."""

    def __init__(self, reader, buf: bytearray):
        self.reader, self.buf = reader, buf

    async def _some(self, n: int) -> bytes:
        if self.buf:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        data = await self.reader.read(n)
        if not data:
            raise RemoteProtocolError("connection closed inside a body")
        return data

    async def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > MAX_CHUNK_LINE:
                raise RemoteProtocolError("chunk size line too long")
            data = await self.reader.read(CHUNK)
            if not data:
                raise RemoteProtocolError("connection closed inside a chunked body")
            self.buf += data

    async def copy_length(self, n: int, writer) -> None:
        while n > 0:
            data = await self._some(min(n, CHUNK))
            n -= len(data)
            writer.write(data)
            await writer.drain()

    async def copy_chunked(self, writer) -> None:
        while True:
            line = await self._line()
            size_s = line.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_s):       # int(, 16) also takes "0x10", "1_0", "+5"
                raise RemoteProtocolError("bad chunk size")
            size = int(size_s, 16)
            writer.write(line)
            if size == 0:
                while True:                   # trailers up to the empty line
                    t = await self._line()
                    writer.write(t)
                    if t in (b"\r\n", b"\n"):
                        await writer.drain()
                        return
            await self.copy_length(size + 2, writer)

    async def copy_to_eof(self, writer) -> None:
        if self.buf:
            writer.write(bytes(self.buf))
            self.buf.clear()
        while data := await self.reader.read(CHUNK):
            writer.write(data)
            await writer.drain()


async def serve(srv, first: bytes, reader, writer) -> None:
    buf = bytearray(first)
    handshake = True
    while True:
        try:
            if handshake:
                async with asyncio.timeout(srv.handshake_timeout):
                    head = await _read_head(reader, buf, http.parse_request_head)
            else:
                # an idle keep-alive client may wait longer, but not forever; a slow head
                # after that is still bounded by the same timer
                async with asyncio.timeout(KEEPALIVE_IDLE):
                    head = await _read_head(reader, buf, http.parse_request_head)
        except TimeoutError:
            if not handshake and not buf:
                return
            srv.counters["handshake_timeout"] += 1
            writer.write(http.error_response(408, "Request Timeout"))
            return
        except http.HeaderTooLarge:
            srv.counters["bad_request"] += 1
            writer.write(http.error_response(431, "Request Header Fields Too Large"))
            return
        except RemoteProtocolError:
            srv.counters["bad_request"] += 1
            writer.write(http.error_response(400, "Bad Request"))
            return
        if head is None:
            return
        handshake = False
        if head.method != "CONNECT" and head.target == "/proxy.pac" and head.method in ("GET", "HEAD"):
            _serve_pac(srv, head, writer)
            if not _client_keepalive(head):
                return
            continue
        if srv.auth is not None and not srv.auth.check_basic(
                (head.get(b"proxy-authorization") or b"").decode("latin-1")):
            srv.counters["auth_failed"] += 1
            writer.write(http.error_response(
                407, "Proxy Authentication Required",
                [(b"Proxy-Authenticate", b'Basic realm="tsproxy"')], close=False))
            # keep the connection if the request had no body, so the client can retry on it
            if http.content_length(head) or http.is_chunked(head) or not _client_keepalive(head):
                return
            continue
        if head.method == "CONNECT":
            await _connect(srv, head, buf, reader, writer)
            return
        try:
            host, port, path = http.split_absolute(head.target)
        except RemoteProtocolError:
            srv.counters["bad_request"] += 1
            writer.write(http.error_response(400, "Bad Request"))
            return
        if not await _forward(srv, head, host, port, path, buf, reader, writer):
            return


def _client_keepalive(head) -> bool:
    conn = head.tokens(b"connection") | head.tokens(b"proxy-connection")
    if head.version == b"HTTP/1.0":
        return b"keep-alive" in conn
    return b"close" not in conn


def _serve_pac(srv, head, writer) -> None:
    host, port = writer.get_extra_info("sockname")[:2]
    body = srv.pac.render(host, port).encode()
    hdrs = [(b"Content-Type", b"application/x-ns-proxy-autoconfig"),
            (b"Content-Length", str(len(body)).encode())]
    if not _client_keepalive(head):
        hdrs.append((b"Connection", b"close"))
    writer.write(http.serialize_head(b"HTTP/1.1 200 OK", hdrs) + (body if head.method == "GET" else b""))


async def _connect(srv, head, buf, reader, writer) -> None:
    try:
        host, port = http.split_authority(head.target)
    except RemoteProtocolError:
        srv.counters["bad_request"] += 1
        writer.write(http.error_response(400, "Bad Request"))
        return
    try:
        ur, uw = await srv.dialer.open_connection(host, port)
    except DialError as e:
        srv.counters["dial_failed"] += 1
        writer.write(http.error_response(*_dial_status(e), detail=str(e)))
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    if buf:
        uw.write(bytes(buf))
        buf.clear()
    await relay(reader, writer, ur, uw)


async def _forward(srv, head, host, port, path, buf, reader, writer) -> bool:
    """One absolute-URI request over a pooled or new upstream -> keep the client connection?"""
    key = (host.lower(), port)
    pooled = srv.http_pool.take(key, getattr(srv.dialer, "route_epoch", 0))
    if pooled is None:
        try:
            ur, uw = await srv.dialer.open_connection(host, port)
        except DialError as e:
            srv.counters["dial_failed"] += 1
            writer.write(http.error_response(*_dial_status(e), detail=str(e)))
            return False
        srv.http_pool.counters["opened"] += 1
        pooled = (ur, uw, bytearray())
    ur, uw, ubuf = pooled
    pooled_again = False
    try:
        keep, pooled_again = await _exchange(srv, head, host, port, path, buf, reader, writer,
                                             key, ur, uw, ubuf)
        return keep
    finally:
        if not pooled_again:
            uw.close()                 # failed, half-done or not keep-alive: not reusable


async def _exchange(srv, head, host, port, path, buf, reader, writer, key, ur, uw, ubuf):
    try:
        req_len = http.content_length(head)
        req_chunked = http.is_chunked(head)
    except RemoteProtocolError:
        writer.write(http.error_response(400, "Bad Request"))
        uw.close()
        return False, False
    hdrs = http.end_to_end(head)
    if not any(k.lower() == b"host" for k, _ in hdrs):
        hdrs.insert(0, (b"Host", (f"[{host}]" if ":" in host else host).encode()
                        + (b"" if port == 80 else f":{port}".encode())))
    if req_chunked:
        hdrs.append((b"Transfer-Encoding", b"chunked"))
    hdrs.append((b"Connection", b"keep-alive"))
    uw.write(http.serialize_head(f"{head.method} {path} HTTP/1.1".encode(), hdrs))
    body = _Body(reader, buf)
    if req_chunked:
        await body.copy_chunked(uw)
    elif req_len:
        await body.copy_length(req_len, uw)
    await uw.drain()

    resp = None
    while resp is None or 100 <= resp.status < 200:
        try:
            resp = await _read_head(ur, ubuf, http.parse_response_head)
        except RemoteProtocolError:
            resp = None
        if resp is None:
            writer.write(http.error_response(502, "Bad Gateway"))
            return False, False
        if 100 <= resp.status < 200 and resp.status != 101:
            continue                          # interim responses are not forwarded to 1.0 clients
        if resp.status == 101:
            writer.write(http.error_response(502, "Bad Gateway"))
            return False, False
    client_keep = _client_keepalive(head)
    up_keep = b"close" not in resp.tokens(b"connection") and resp.version == b"HTTP/1.1"
    no_body = head.method == "HEAD" or resp.status in (204, 304)
    try:
        r_len = http.content_length(resp)
        r_chunked = http.is_chunked(resp)
    except RemoteProtocolError:
        writer.write(http.error_response(502, "Bad Gateway"))
        return False, False
    rh = http.end_to_end(resp)
    until_eof = not no_body and not r_chunked and r_len is None
    if r_chunked and not no_body:
        if head.version == b"HTTP/1.0":
            until_eof, client_keep = True, False   # 1.0 clients get the raw stream until close
        else:
            rh.append((b"Transfer-Encoding", b"chunked"))
    if until_eof:
        client_keep = False
    rh.append((b"Connection", b"keep-alive" if client_keep else b"close"))
    writer.write(http.serialize_head(b"HTTP/1.1 " + str(resp.status).encode() + b" " + resp.reason, rh))
    rbody = _Body(ur, ubuf)
    if not no_body:
        if r_chunked and head.version == b"HTTP/1.0":
            await _dechunk(rbody, writer)
            up_keep = False
        elif r_chunked:
            await rbody.copy_chunked(writer)
        elif r_len is not None:
            await rbody.copy_length(r_len, writer)
        else:
            await rbody.copy_to_eof(writer)
            up_keep = False
    await writer.drain()
    if up_keep:
        srv.http_pool.put(key, ur, uw, ubuf, getattr(srv.dialer, "route_epoch", 0))
    return client_keep, up_keep


async def _dechunk(body: _Body, writer) -> None:
    class _Sink:
        def __init__(self):
            self.out = bytearray()

        def write(self, b):
            self.out += b

        async def drain(self):
            pass
    while True:
        line = await body._line()
        size_s = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_s):
            raise RemoteProtocolError("bad chunk size from upstream")
        size = int(size_s, 16)
        if size == 0:
            while (await body._line()) not in (b"\r\n", b"\n"):
                pass
            return
        sink = _Sink()
        await body.copy_length(size + 2, sink)
        writer.write(bytes(sink.out[:-2]))
        await writer.drain()
