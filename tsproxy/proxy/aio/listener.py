"""One listener, two protocols: first byte 0x05/0x04 is SOCKS, anything else HTTP.

Every client gets `handshake_timeout` seconds to finish its greeting and request (slowloris
clients are closed); every malformed request gets the protocol's error answer and a close;
each connection lives in its own task, so one broken client never disturbs another.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from tsproxy.errors import (ConnectionRefused, DialError, DialTimeout, HostUnreachable,
                            NetworkUnreachable, NotAllowed, RemoteProtocolError)
from tsproxy.proxy import http as H
from tsproxy.proxy import pac as P
from tsproxy.proxy import socks as S
from tsproxy.proxy.aio.relay import abort, relay

log = logging.getLogger(__name__)

MAX_HANDSHAKE = 4096
POOL_PER_HOST = 8
POOL_IDLE = 30.0
READ_CHUNK = 256 * 1024


def socks_code(e: BaseException) -> int:
    if isinstance(e, NotAllowed):
        return S.REP_NOT_ALLOWED
    if isinstance(e, NetworkUnreachable):
        return S.REP_NET_UNREACHABLE
    if isinstance(e, HostUnreachable):
        return S.REP_HOST_UNREACHABLE
    if isinstance(e, ConnectionRefused):
        return S.REP_REFUSED
    if isinstance(e, DialTimeout):
        return S.REP_TTL_EXPIRED
    return S.REP_FAILURE


def http_status(e: BaseException) -> tuple[int, str]:
    if isinstance(e, NotAllowed):
        return 403, "Forbidden"
    if isinstance(e, DialTimeout):
        return 504, "Gateway Timeout"
    return 502, "Bad Gateway"


class _Buffered:
    """Reader wrapper that can give back bytes read past a message boundary."""

    def __init__(self, reader):
        self.reader = reader
        self.buf = bytearray()

    async def read(self, n: int = READ_CHUNK) -> bytes:
        if self.buf:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        return await self.reader.read(n)

    async def fill(self) -> bool:
        data = await self.reader.read(READ_CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def unread(self, data) -> None:
        self.buf[:0] = data


class ProxyServer:
    def __init__(self, dialer, *, listen=("127.0.0.1", 1055), auth=None, protocols: str = "mixed",
                 pac: P.PacConfig | None = None, handshake_timeout: float = 10.0):
        self.dialer = dialer
        self.listen = listen
        self.auth = auth
        self.protocols = protocols
        self.pac = pac or P.PacConfig()
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set = set()
        self._pool: dict = {}
        self.stats = {"connections": 0, "active": 0, "socks5": 0, "socks4": 0, "http": 0,
                      "bad_requests": 0, "auth_failures": 0, "dial_failures": 0, "timeouts": 0}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, self.listen[0], self.listen[1],
                                                  limit=READ_CHUNK, reuse_address=True, backlog=1024)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.sockets[0].getsockname()[:2]

    def address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for conns in self._pool.values():
            for _, w, _ in conns:
                abort(w)
        self._pool.clear()
        if self._server is not None:
            await self._server.wait_closed()

    # ------------------------------------------------------------------ dispatch
    async def _on_client(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.stats["connections"] += 1
        self.stats["active"] += 1
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                async with asyncio.timeout(self.handshake_timeout):
                    first = await reader.read(1)
            except TimeoutError:
                self.stats["timeouts"] += 1
                return
            if not first:
                return
            br = _Buffered(reader)
            br.unread(first)
            if first[0] == 5 and self.protocols in ("mixed", "socks5"):
                self.stats["socks5"] += 1
                await self._socks5(br, writer)
            elif first[0] == 4 and self.protocols in ("mixed", "socks5"):
                self.stats["socks4"] += 1
                await self._socks4(br, writer)
            elif self.protocols in ("mixed", "http"):
                self.stats["http"] += 1
                await self._http(br, writer)
            else:
                self.stats["bad_requests"] += 1
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            log.debug("proxy client ended: %r", e)
        except RemoteProtocolError as e:
            self.stats["bad_requests"] += 1
            log.debug("proxy client protocol error: %s", e)
        finally:
            self.stats["active"] -= 1
            self._tasks.discard(task)
            if not writer.is_closing():
                abort(writer) if writer.transport.get_write_buffer_size() else writer.close()

    async def _read_until(self, br: _Buffered, parse):
        """Run a sans-IO parser over the buffered bytes until it completes (bounded, timed)."""
        async with asyncio.timeout(self.handshake_timeout):
            while True:
                r = parse(bytes(br.buf))
                if r is not None:
                    value, used = r
                    del br.buf[:used]
                    return value
                if len(br.buf) > MAX_HANDSHAKE and parse is not H.parse_head:
                    raise RemoteProtocolError("handshake too long")
                if not await br.fill():
                    raise asyncio.IncompleteReadError(bytes(br.buf), None)

    # ------------------------------------------------------------------ SOCKS5
    async def _socks5(self, br: _Buffered, writer) -> None:
        try:
            methods = await self._read_until(br, S.parse_greeting)
        except TimeoutError:
            self.stats["timeouts"] += 1
            return
        want = S.METHOD_USERPASS if self.auth else S.METHOD_NONE
        if want not in methods:
            writer.write(bytes((S.VERSION, S.METHOD_UNACCEPTABLE)))
            await writer.drain()
            return
        writer.write(bytes((S.VERSION, want)))
        if self.auth:
            try:
                user, password = await self._read_until(br, S.parse_userpass)
            except TimeoutError:
                self.stats["timeouts"] += 1
                return
            ok = self.auth.check(user, password)
            writer.write(bytes((1, 0 if ok else 1)))
            await writer.drain()
            if not ok:
                self.stats["auth_failures"] += 1
                return
        try:
            cmd, host, port = await self._read_until(br, S.parse_request)
        except S.AddressTypeError:
            writer.write(S.reply(S.REP_ATYP_UNSUPPORTED))
            await writer.drain()
            return
        except TimeoutError:
            self.stats["timeouts"] += 1
            return
        except RemoteProtocolError:
            writer.write(S.reply(S.REP_FAILURE))
            await writer.drain()
            raise
        if cmd == S.CMD_CONNECT:
            if port == 0:
                writer.write(S.reply(S.REP_HOST_UNREACHABLE))
                await writer.drain()
                return
            try:
                tr, tw = await self.dialer.open_connection(host, port)
            except DialError as e:
                self.stats["dial_failures"] += 1
                writer.write(S.reply(socks_code(e)))
                await writer.drain()
                return
            bhost, bport = (tw.get_extra_info("sockname") or ("0.0.0.0", 0))[:2]
            writer.write(S.reply(S.REP_OK, bhost, bport))
            await writer.drain()
            if br.buf:                                    # early data sent with the request
                tw.write(bytes(br.buf))
                br.buf.clear()
            await relay(br, writer, tr, tw)
        elif cmd == S.CMD_UDP:
            await self._udp_associate(br, writer)
        else:
            writer.write(S.reply(S.REP_CMD_UNSUPPORTED))
            await writer.drain()

    async def _udp_associate(self, br: _Buffered, writer) -> None:
        loop = asyncio.get_running_loop()
        client_ip = writer.get_extra_info("peername")[0]
        relay_ = await self.dialer.open_udp()
        proto = _UdpAssociation(client_ip, relay_)
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(self.address[0], 0))
        try:
            host, port = transport.get_extra_info("sockname")[:2]
            writer.write(S.reply(S.REP_OK, host, port))
            await writer.drain()
            replies = asyncio.ensure_future(proto.pump_replies())
            try:
                # the association lives as long as the control connection (RFC 1928 7)
                while await br.read(4096):
                    pass
            finally:
                replies.cancel()
                await asyncio.gather(replies, return_exceptions=True)
        finally:
            transport.close()
            relay_.close()

    # ------------------------------------------------------------------ SOCKS4/4a
    async def _socks4(self, br: _Buffered, writer) -> None:
        try:
            cmd, host, port, _userid = await self._read_until(br, S.parse_socks4)
        except TimeoutError:
            self.stats["timeouts"] += 1
            return
        if cmd != 1 or self.auth is not None:
            # SOCKS4 has no password: refuse it when credentials are required
            if self.auth is not None:
                self.stats["auth_failures"] += 1
            writer.write(S.socks4_reply(S.S4_REJECTED))
            await writer.drain()
            return
        try:
            tr, tw = await self.dialer.open_connection(host, port)
        except DialError:
            self.stats["dial_failures"] += 1
            writer.write(S.socks4_reply(S.S4_REJECTED))
            await writer.drain()
            return
        writer.write(S.socks4_reply(S.S4_GRANTED))
        await writer.drain()
        await relay(br, writer, tr, tw)

    # ------------------------------------------------------------------ HTTP
    async def _http_error(self, writer, code: int, reason: str, extra: str = "", body: str = "") -> None:
        body = body or f"{code} {reason}\n"
        writer.write((f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                      f"Connection: close\r\n{extra}\r\n{body}").encode())
        await writer.drain()

    async def _http(self, br: _Buffered, writer) -> None:
        first = True
        while True:
            try:
                if first:
                    head = await self._read_until(br, lambda b: H.parse_head(b, request=True))
                else:
                    # keep-alive: the next request may come later than a handshake would
                    if not br.buf and not await br.fill():
                        return
                    head = await self._read_until(br, lambda b: H.parse_head(b, request=True))
            except TimeoutError:
                self.stats["timeouts"] += 1
                if first:
                    await self._http_error(writer, 408, "Request Timeout")
                return
            except H.HeadTooLarge:
                self.stats["bad_requests"] += 1
                await self._http_error(writer, 431, "Request Header Fields Too Large")
                return
            except H.BadRequest as e:
                self.stats["bad_requests"] += 1
                await self._http_error(writer, 400, "Bad Request", body=f"400 Bad Request: {e}\n")
                return
            first = False
            method, target, _ = head.start
            if not target.startswith("/") and self.auth and not self.auth.check_basic(head.get("proxy-authorization")):
                self.stats["auth_failures"] += 1
                await self._http_error(writer, 407, "Proxy Authentication Required",
                                       'Proxy-Authenticate: Basic realm="tsproxy"\r\n')
                return
            if method == "CONNECT":
                await self._http_connect(br, writer, target)
                return
            if target.startswith("/"):
                if method in ("GET", "HEAD") and target.split("?")[0] in ("/proxy.pac", "/wpad.dat"):
                    await self._serve_pac(writer, head, method)
                    if "close" in head.connection_tokens():
                        return
                    continue
                self.stats["bad_requests"] += 1
                await self._http_error(writer, 400, "Bad Request",
                                       body="400 Bad Request: this is a proxy; send an absolute URI or CONNECT\n")
                return
            if not await self._http_forward(br, writer, head):
                return

    async def _serve_pac(self, writer, head: H.Head, method: str) -> None:
        host, port = self.address
        if host in ("0.0.0.0", "::"):
            host_hdr = head.get("host")
            host = H.split_authority(host_hdr, port)[0] if host_hdr else "127.0.0.1"
        body = P.render(self.pac, host, port).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ns-proxy-autoconfig\r\n"
                     b"Content-Length: %d\r\nCache-Control: no-cache\r\n\r\n" % len(body))
        if method == "GET":
            writer.write(body)
        await writer.drain()

    async def _http_connect(self, br: _Buffered, writer, target: str) -> None:
        try:
            host, port = H.split_authority(target, 443)
        except H.BadRequest as e:
            self.stats["bad_requests"] += 1
            await self._http_error(writer, 400, "Bad Request", body=f"400 Bad Request: {e}\n")
            return
        try:
            tr, tw = await self.dialer.open_connection(host, port)
        except DialError as e:
            self.stats["dial_failures"] += 1
            code, reason = http_status(e)
            await self._http_error(writer, code, reason, body=f"{code} {reason}: {e}\n")
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        if br.buf:
            tw.write(bytes(br.buf))
            br.buf.clear()
        await relay(br, writer, tr, tw)

    # plain forward proxying ---------------------------------------------------------------
    async def _upstream(self, host: str, port: int):
        loop = asyncio.get_running_loop()
        conns = self._pool.get((host, port), [])
        while conns:
            r, w, t = conns.pop()
            if loop.time() - t < POOL_IDLE and not w.is_closing() and not r.at_eof():
                return r, w, True
            abort(w)
        r, w = await self.dialer.open_connection(host, port)
        return r, w, False

    def _give_back(self, host: str, port: int, r, w) -> None:
        conns = self._pool.setdefault((host, port), [])
        if len(conns) < POOL_PER_HOST:
            conns.append((r, w, asyncio.get_running_loop().time()))
        else:
            w.close()

    async def _http_forward(self, br: _Buffered, writer, head: H.Head) -> bool:
        """Forward one request; True if the client connection stays open for another."""
        method, target, version = head.start
        try:
            _, host, port, path = H.parse_absolute_uri(target)
            req_body = H.BodyFramer(head, request=True)
        except H.BadRequest as e:
            self.stats["bad_requests"] += 1
            await self._http_error(writer, 400, "Bad Request", body=f"400 Bad Request: {e}\n")
            return False
        client_keep = version == "HTTP/1.1" and "close" not in head.connection_tokens()
        host_header = f"[{host}]" if ":" in host else host
        if port != 80:
            host_header += f":{port}"
        for attempt in (0, 1):
            try:
                ur, uw, reused = await self._upstream(host, port)
            except DialError as e:
                self.stats["dial_failures"] += 1
                code, reason = http_status(e)
                await self._http_error(writer, code, reason, body=f"{code} {reason}: {e}\n")
                return False
            uw.write(H.upstream_request(head, path, host_header))
            try:
                # stream the request body
                while not req_body.finished:
                    data = await br.read()
                    if not data:
                        return False
                    n = req_body.feed(data)
                    uw.write(data[:n])
                    if n < len(data):
                        br.unread(data[n:])
                    await uw.drain()
                ubr = _Buffered(ur)
                resp = await self._read_response_head(ubr)
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                abort(uw)
                if reused and attempt == 0 and req_body.mode == "none":
                    continue                     # a pooled connection went stale: retry once
                await self._http_error(writer, 502, "Bad Gateway", body="502 Bad Gateway: upstream closed\n")
                return False
            except RemoteProtocolError as e:
                abort(uw)
                await self._http_error(writer, 502, "Bad Gateway", body=f"502 Bad Gateway: {e}\n")
                return False
            break
        framer = H.BodyFramer(resp, request=False, method=method)
        upstream_keep = resp.start[0] == "HTTP/1.1" and "close" not in resp.connection_tokens()
        keep = client_keep and framer.mode != "close"
        writer.write(H.downstream_response(resp, keep))
        try:
            while not framer.finished:
                data = await ubr.read()
                if not data:
                    if framer.mode == "close":
                        break
                    abort(uw)
                    return False                 # truncated response: the client sees the cut
                n = framer.feed(data)
                writer.write(data[:n])
                if n < len(data):
                    ubr.unread(data[n:])
                await writer.drain()
        except (ConnectionError, OSError):
            abort(uw)
            raise
        if upstream_keep and framer.mode != "close" and not ubr.buf:
            self._give_back(host, port, ur, uw)
        else:
            abort(uw) if framer.mode != "close" else uw.close()
        await writer.drain()
        return keep

    async def _read_response_head(self, ubr: _Buffered) -> H.Head:
        while True:
            r = H.parse_head(bytes(ubr.buf), request=False)
            if r is not None:
                head, used = r
                del ubr.buf[:used]
                if head.start[1] == "100":
                    continue                      # interim response: wait for the real one
                return head
            if not await ubr.fill():
                raise asyncio.IncompleteReadError(bytes(ubr.buf), None)


class _UdpAssociation(asyncio.DatagramProtocol):
    """SOCKS5 UDP relay for one client: datagrams from the client's IP only, FRAG must be 0."""

    def __init__(self, client_ip: str, relay_):
        self.client_ip = client_ip
        self.client_addr = None
        self.relay = relay_
        self.transport = None
        self.dropped = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if addr[0] != self.client_ip:
            self.dropped += 1
            return
        try:
            frag, host, port, payload = S.parse_udp(data)
        except RemoteProtocolError:
            self.dropped += 1
            return
        if frag != 0:
            self.dropped += 1                    # fragments are refused (RFC 1928 7 allows it)
            return
        self.client_addr = addr
        asyncio.ensure_future(self._send(payload, host, port))

    async def _send(self, payload, host, port):
        try:
            await self.relay.sendto(payload, host, port)
        except DialError:
            self.dropped += 1

    async def pump_replies(self):
        while True:
            data, (host, port) = await self.relay.recvfrom()
            if self.client_addr is not None and self.transport is not None:
                self.transport.sendto(S.build_udp(str(ipaddress.ip_address(host)) if _is_ip(host) else host,
                                                  port, data), self.client_addr)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
