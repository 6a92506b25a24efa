"""SOCKS5 (RFC 1928, RFC 1929 auth) and SOCKS4/4a codecs, sans-IO.

Parsers take the bytes received so far and return None when more are needed, the parsed value
and the number of bytes consumed when complete, or raise RemoteProtocolError.

    greeting   VER=5 NMETHODS METHODS...
    auth       VER=1 ULEN UNAME PLEN PASSWD
    request    VER=5 CMD RSV=0 ATYP DST.ADDR DST.PORT      ATYP 1 = IPv4, 3 = name, 4 = IPv6
    reply      VER=5 REP RSV=0 ATYP BND.ADDR BND.PORT
    UDP        RSV(2)=0 FRAG ATYP DST.ADDR DST.PORT DATA
    SOCKS4     VER=4 CMD=1 DSTPORT(2) DSTIP(4) USERID NUL [HOST NUL if DSTIP=0.0.0.x]
"""

from __future__ import annotations

import functools
import ipaddress
import struct

from tsproxy.errors import RemoteProtocolError

VERSION = 5
METHOD_NONE, METHOD_USERPASS, METHOD_UNACCEPTABLE = 0x00, 0x02, 0xFF
CMD_CONNECT, CMD_BIND, CMD_UDP = 1, 2, 3
ATYP_V4, ATYP_NAME, ATYP_V6 = 1, 3, 4

REP_OK = 0x00
REP_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NET_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_CMD_UNSUPPORTED = 0x07
REP_ATYP_UNSUPPORTED = 0x08

S4_GRANTED, S4_REJECTED = 0x5A, 0x5B

_PORT = struct.Struct("!H")


def parse_greeting(buf: bytes):
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise RemoteProtocolError(f"not SOCKS5 (version {buf[0]})")
    n = buf[1]
    if n == 0:
        raise RemoteProtocolError("SOCKS5 greeting offers no methods")
    if len(buf) < 2 + n:
        return None
    return set(buf[2:2 + n]), 2 + n


def parse_userpass(buf: bytes):
    if len(buf) < 2:
        return None
    if buf[0] != 1:
        raise RemoteProtocolError(f"bad username/password version {buf[0]}")
    ulen = buf[1]
    if len(buf) < 2 + ulen + 1:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    return (bytes(buf[2:2 + ulen]), bytes(buf[3 + ulen:end])), end


def _parse_addr(buf: bytes, off: int):
    """-> (host str, port, end offset) or None; raises for an unknown ATYP."""
    if len(buf) < off + 1:
        return None
    atyp = buf[off]
    if atyp == ATYP_V4:
        end = off + 1 + 4 + 2
        if len(buf) < end:
            return None
        host = "%d.%d.%d.%d" % tuple(buf[off + 1:off + 5])
    elif atyp == ATYP_V6:
        end = off + 1 + 16 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[off + 1:off + 17])))
    elif atyp == ATYP_NAME:
        if len(buf) < off + 2:
            return None
        n = buf[off + 1]
        end = off + 2 + n + 2
        if len(buf) < end:
            return None
        if n == 0:
            raise RemoteProtocolError("empty SOCKS5 domain name")
        try:
            host = bytes(buf[off + 2:off + 2 + n]).decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError("non-ASCII SOCKS5 domain name") from None
    else:
        raise AddressTypeError(atyp)
    port = _PORT.unpack_from(buf, end - 2)[0]
    return host, port, end


class AddressTypeError(RemoteProtocolError):
    def __init__(self, atyp: int):
        super().__init__(f"unsupported SOCKS5 address type {atyp}")


def parse_request(buf: bytes):
    """-> ((cmd, host, port), consumed) or None."""
    if len(buf) < 4:
        return None
    if buf[0] != VERSION:
        raise RemoteProtocolError(f"bad SOCKS5 request version {buf[0]}")
    cmd = buf[1]
    r = _parse_addr(buf, 3)
    if r is None:
        return None
    host, port, end = r
    return (cmd, host, port), end


@functools.lru_cache(maxsize=256)
def _encode_host(host: str) -> bytes:
    # replies carry our own tunnel address nearly always: parsed once
    try:
        ip = ipaddress.ip_address(host)
        return (bytes((ATYP_V4,)) if ip.version == 4 else bytes((ATYP_V6,))) + ip.packed
    except ValueError:
        raw = host.encode("idna")[:255]
        return bytes((ATYP_NAME, len(raw))) + raw


def encode_addr(host: str, port: int) -> bytes:
    return _encode_host(host) + _PORT.pack(port)


def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return bytes((VERSION, code, 0)) + encode_addr(host, port)


def parse_udp(datagram: bytes):
    """-> (frag, host, port, payload) or raises RemoteProtocolError."""
    if len(datagram) < 4 or datagram[0] or datagram[1]:
        raise RemoteProtocolError("bad SOCKS5 UDP header")
    r = _parse_addr(datagram, 3)
    if r is None:
        raise RemoteProtocolError("truncated SOCKS5 UDP header")
    host, port, end = r
    return datagram[2], host, port, bytes(datagram[end:])


def build_udp(host: str, port: int, payload: bytes) -> bytes:
    return b"\0\0\0" + encode_addr(host, port) + payload


MAX_S4_FIELD = 255


def parse_socks4(buf: bytes):
    """-> ((cmd, host, port, userid), consumed) or None."""
    if len(buf) < 8:
        return None
    if buf[0] != 4:
        raise RemoteProtocolError("not SOCKS4")
    cmd = buf[1]
    port = _PORT.unpack_from(buf, 2)[0]
    ip = bytes(buf[4:8])
    nul = buf.find(b"\0", 8)
    if nul < 0:
        if len(buf) > 8 + MAX_S4_FIELD:
            raise RemoteProtocolError("SOCKS4 user id too long")
        return None
    userid = bytes(buf[8:nul])
    end = nul + 1
    if ip[:3] == b"\0\0\0" and ip[3] != 0:        # SOCKS4a: the host name follows
        nul2 = buf.find(b"\0", end)
        if nul2 < 0:
            if len(buf) > end + MAX_S4_FIELD:
                raise RemoteProtocolError("SOCKS4a host name too long")
            return None
        try:
            host = bytes(buf[end:nul2]).decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError("non-ASCII SOCKS4a host name") from None
        if not host:
            raise RemoteProtocolError("empty SOCKS4a host name")
        end = nul2 + 1
    else:
        host = str(ipaddress.IPv4Address(ip))
    return (cmd, host, port, userid), end


def socks4_reply(code: int) -> bytes:
    return bytes((0, code, 0, 0, 0, 0, 0, 0))
