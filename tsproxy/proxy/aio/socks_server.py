"""SOCKS5 (CONNECT, UDP ASSOCIATE; BIND refused) and SOCKS4/4a CONNECT over the shared dialer."""

from __future__ import annotations

import asyncio

from tsproxy.errors import (ConnectionRefused, DialError, DialTimeout, HostUnreachable,
                            NetworkUnreachable, NotAllowed, RemoteProtocolError)
from tsproxy.proxy import socks5 as socks
from tsproxy.proxy.aio.relay import relay

MAX_HANDSHAKE = 1024


def reply_code(e: DialError) -> int:
    if isinstance(e, NotAllowed):
        return socks.REP_NOT_ALLOWED
    if isinstance(e, NetworkUnreachable):
        return socks.REP_NET_UNREACHABLE
    if isinstance(e, ConnectionRefused):
        return socks.REP_REFUSED
    if isinstance(e, DialTimeout):
        return socks.REP_TTL_EXPIRED
    if isinstance(e, HostUnreachable):
        return socks.REP_HOST_UNREACHABLE
    return socks.REP_FAILURE


async def _read_until(reader, buf: bytearray, parse):
    while True:
        r = parse(buf)
        if r is not None:
            value, used = r
            del buf[:used]
            return value
        if len(buf) > MAX_HANDSHAKE:
            raise RemoteProtocolError("SOCKS handshake too long")
        data = await reader.read(4096)
        if not data:
            raise RemoteProtocolError("SOCKS client closed during the handshake")
        buf += data


class Request:
    """A SOCKS request read off the client: what to do once the handshake is over."""
    __slots__ = ("version", "cmd", "host", "port", "buf", "prefix")

    def __init__(self, version: int, cmd: int, host: str, port: int, buf: bytearray,
                 prefix: bytes = b""):
        self.version, self.cmd, self.host, self.port = version, cmd, host, port
        self.buf = buf            # bytes the client pipelined after the request
        self.prefix = prefix      # a method choice not sent yet: it goes with the reply


def _pipelined(buf: bytearray) -> bool:
    """A whole request is already here (the client did not wait for the method choice)."""
    try:
        return socks.parse_request(buf) is not None
    except RemoteProtocolError:
        return False              # reported by the real parse, after the method choice


async def handshake(srv, first: bytes, reader, writer) -> Request | None:
    """The SOCKS5 or SOCKS4 handshake up to the request (the caller bounds it in time); None
    when it was refused and answered here.  A SOCKS5 client that sent its request together
    with its greeting gets the method choice in one write with the reply (one segment and
    one client wakeup less; for the client the bytes are the same)."""
    buf = bytearray(first)
    if first[0] == 4:
        cmd, host, port, _userid = await _read_until(reader, buf, socks.parse_socks4)
        return Request(4, cmd, host, port, buf)
    try:
        methods = await _read_until(reader, buf, socks.parse_greeting)
        prefix = b""
        if srv.auth is not None:
            if socks.METHOD_USERPASS not in methods:
                writer.write(bytes((5, socks.METHOD_UNACCEPTABLE)))
                srv.counters["auth_failed"] += 1
                return None
            writer.write(bytes((5, socks.METHOD_USERPASS)))
            user, password = await _read_until(reader, buf, socks.parse_userpass)
            if not srv.auth.check(user, password):
                writer.write(b"\x01\x01")
                srv.counters["auth_failed"] += 1
                return None
            writer.write(b"\x01\x00")
        else:
            if socks.METHOD_NONE not in methods:
                writer.write(bytes((5, socks.METHOD_UNACCEPTABLE)))
                return None
            if _pipelined(buf):
                prefix = bytes((5, socks.METHOD_NONE))
            else:
                writer.write(bytes((5, socks.METHOD_NONE)))
        try:
            cmd, host, port = await _read_until(reader, buf, socks.parse_request)
        except socks.AddressTypeError:
            writer.write(prefix + socks.reply(socks.REP_ATYP_UNSUPPORTED))
            srv.counters["bad_request"] += 1
            return None
    except RemoteProtocolError:
        srv.counters["bad_request"] += 1
        raise
    return Request(5, cmd, host, port, buf, prefix)


async def serve(srv, req: Request, reader, writer) -> None:
    """Carry out a request `handshake` returned: CONNECT and relay, UDP ASSOCIATE, or refuse."""
    if req.version == 4:
        return await _serve4(srv, req, reader, writer)
    prefix = req.prefix
    if req.cmd == socks.CMD_CONNECT:
        try:
            ur, uw = await srv.dialer.open_connection(req.host, req.port)
        except DialError as e:
            srv.counters["dial_failed"] += 1
            writer.write(prefix + socks.reply(reply_code(e)))
            await writer.drain()
            return
        bnd = uw.get_extra_info("sockname") or ("0.0.0.0", 0)
        writer.write(prefix + socks.reply(socks.REP_OK, str(bnd[0]), int(bnd[1])))
        if req.buf:                            # data pipelined after the request
            uw.write(bytes(req.buf))
        await relay(reader, writer, ur, uw)
    elif req.cmd == socks.CMD_UDP:
        if prefix:
            writer.write(prefix)
        await _udp_associate(srv, req.host, req.port, reader, writer)
    else:
        writer.write(prefix + socks.reply(socks.REP_CMD_UNSUPPORTED))
        await writer.drain()


async def _serve4(srv, req: Request, reader, writer) -> None:
    # SOCKS4 has no password: with auth configured it is refused outright
    if req.cmd != socks.CMD_CONNECT or srv.auth is not None:
        writer.write(socks.socks4_reply(socks.S4_REJECTED))
        await writer.drain()
        return
    try:
        ur, uw = await srv.dialer.open_connection(req.host, req.port)
    except DialError:
        srv.counters["dial_failed"] += 1
        writer.write(socks.socks4_reply(socks.S4_REJECTED))
        await writer.drain()
        return
    writer.write(socks.socks4_reply(socks.S4_GRANTED))
    if req.buf:
        uw.write(bytes(req.buf))
    await relay(reader, writer, ur, uw)


class _ClientUdp(asyncio.DatagramProtocol):
    """The UDP socket a SOCKS5 client sends its encapsulated datagrams to."""

    def __init__(self, assoc):
        self.assoc = assoc

    def datagram_received(self, data, addr):
        self.assoc.from_client(data, addr)


class _Association:
    MAX_PENDING = 256

    def __init__(self, srv, client_ip: str, udp, relay_):
        self.srv, self.client_ip, self.relay = srv, client_ip, relay_
        self.transport = None
        self.client_addr = None
        self.pending: set[asyncio.Task] = set()
        self.counters = {"udp_in": 0, "udp_out": 0, "udp_dropped": 0, "udp_fragments": 0}

    def from_client(self, data: bytes, addr) -> None:
        # only the client that opened the association may use it (RFC 1928 section 7)
        if addr[0] != self.client_ip or (self.client_addr is not None and addr != self.client_addr):
            self.counters["udp_dropped"] += 1
            return
        try:
            frag, host, port, payload = socks.parse_udp(data)
        except RemoteProtocolError:
            self.counters["udp_dropped"] += 1
            return
        if frag:
            self.counters["udp_fragments"] += 1
            return
        self.client_addr = addr
        if len(self.pending) >= self.MAX_PENDING:
            self.counters["udp_dropped"] += 1
            return
        t = asyncio.ensure_future(self._send(payload, host, port))
        self.pending.add(t)
        t.add_done_callback(self.pending.discard)

    async def _send(self, payload, host, port) -> None:
        try:
            await self.relay.sendto(payload, host, port)
            self.counters["udp_out"] += 1
        except (DialError, OSError):
            self.counters["udp_dropped"] += 1

    async def pump_back(self) -> None:
        while True:
            data, (host, port) = await self.relay.recvfrom()
            if self.client_addr is None or self.transport is None:
                continue
            self.counters["udp_in"] += 1
            self.transport.sendto(socks.build_udp(str(host), int(port), data), self.client_addr)


async def _udp_associate(srv, host, port, reader, writer) -> None:
    loop = asyncio.get_running_loop()
    local_ip = writer.get_extra_info("sockname")[0]
    peer_ip = writer.get_extra_info("peername")[0]
    try:
        udp_relay = await srv.dialer.open_udp()
    except DialError as e:
        writer.write(socks.reply(reply_code(e)))
        return
    assoc = _Association(srv, peer_ip, None, udp_relay)
    transport, _ = await loop.create_datagram_endpoint(lambda: _ClientUdp(assoc), local_addr=(local_ip, 0))
    assoc.transport = transport
    pump = asyncio.ensure_future(assoc.pump_back())
    try:
        bnd = transport.get_extra_info("sockname")
        writer.write(socks.reply(socks.REP_OK, bnd[0], bnd[1]))
        await writer.drain()
        # the association lives as long as the TCP control connection
        while await reader.read(4096):
            pass
    finally:
        pump.cancel()
        for t in list(assoc.pending):
            t.cancel()
        await asyncio.gather(pump, *assoc.pending, return_exceptions=True)
        transport.close()
        udp_relay.close()
