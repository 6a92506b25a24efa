"""Minimal DNS message codec (RFC 1035, RFC 3596): A/AAAA queries and their answers.

    header: ID(2) FLAGS(2) QDCOUNT(2) ANCOUNT(2) NSCOUNT(2) ARCOUNT(2)   all big-endian
    question: QNAME (labels) QTYPE(2) QCLASS(2)
    answer RR: NAME (labels or 0xC0 pointer) TYPE(2) CLASS(2) TTL(4) RDLENGTH(2) RDATA

Parsing never raises anything but DnsFormatError; name compression loops are bounded.
"""

from __future__ import annotations

import ipaddress
import struct

from tsproxy.errors import RemoteProtocolError

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3

_HEADER = struct.Struct("!HHHHHH")
_QTAIL = struct.Struct("!HH")
_RR = struct.Struct("!HHIH")
MAX_POINTERS = 32


class DnsFormatError(RemoteProtocolError):
    pass


def encode_name(name: str) -> bytes:
    out = bytearray()
    name = name.rstrip(".")
    if name:
        for label in name.split("."):
            raw = label.encode("idna") if not label.isascii() else label.encode()
            if not 0 < len(raw) < 64:
                raise ValueError(f"bad DNS label in {name!r}")
            out.append(len(raw))
            out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError("DNS name too long")
    return bytes(out)


def build_query(txid: int, name: str, qtype: int, recursion: bool = True) -> bytes:
    flags = 0x0100 if recursion else 0
    return _HEADER.pack(txid, flags, 1, 0, 0, 0) + encode_name(name) + _QTAIL.pack(qtype, CLASS_IN)


def _read_name(buf: bytes, off: int) -> tuple[str, int]:
    """Return (name, offset after the name as it appears at `off`)."""
    labels = []
    end = None
    jumps = 0
    while True:
        if off >= len(buf):
            raise DnsFormatError("truncated name")
        n = buf[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(buf):
                raise DnsFormatError("truncated pointer")
            if end is None:
                end = off + 2
            jumps += 1
            if jumps > MAX_POINTERS:
                raise DnsFormatError("name compression loop")
            off = ((n & 0x3F) << 8) | buf[off + 1]
            continue
        if n & 0xC0:
            raise DnsFormatError("bad label type")
        off += 1
        if n == 0:
            break
        if off + n > len(buf):
            raise DnsFormatError("truncated label")
        labels.append(buf[off:off + n].decode("ascii", "replace"))
        off += n
    return ".".join(labels), (end if end is not None else off)


def parse_response(buf: bytes) -> tuple[int, int, str, list[tuple[str, int, int, object]]]:
    """-> (txid, rcode, question name, [(name, type, ttl, value)]) where value is an
    ip_address for A/AAAA, a name for CNAME, raw bytes otherwise."""
    if len(buf) < _HEADER.size:
        raise DnsFormatError("short DNS header")
    txid, flags, qd, an, _, _ = _HEADER.unpack_from(buf)
    if not flags & 0x8000:
        raise DnsFormatError("not a response")
    rcode = flags & 0xF
    off = _HEADER.size
    qname = ""
    for i in range(qd):
        name, off = _read_name(buf, off)
        if i == 0:
            qname = name
        off += _QTAIL.size
        if off > len(buf):
            raise DnsFormatError("truncated question")
    answers = []
    for _ in range(an):
        name, off = _read_name(buf, off)
        if off + _RR.size > len(buf):
            raise DnsFormatError("truncated RR")
        rtype, rclass, ttl, rdlen = _RR.unpack_from(buf, off)
        off += _RR.size
        rdata = buf[off:off + rdlen]
        if len(rdata) != rdlen:
            raise DnsFormatError("truncated RDATA")
        if rtype == TYPE_A and rdlen == 4:
            value: object = ipaddress.IPv4Address(rdata)
        elif rtype == TYPE_AAAA and rdlen == 16:
            value = ipaddress.IPv6Address(rdata)
        elif rtype == TYPE_CNAME:
            value, _ = _read_name(buf, off)
        else:
            value = bytes(rdata)
        off += rdlen
        if rclass == CLASS_IN:
            answers.append((name, rtype, ttl, value))
    return txid, rcode, qname, answers


def addresses_for(answers, name: str) -> list:
    """Follow CNAMEs from `name` and return its A/AAAA addresses in answer order."""
    want = {name.rstrip(".").lower()}
    for _ in range(8):
        grew = False
        for n, t, _, v in answers:
            if t == TYPE_CNAME and n.lower() in want and v.lower() not in want:
                want.add(v.lower())
                grew = True
        if not grew:
            break
    return [v for n, t, _, v in answers if t in (TYPE_A, TYPE_AAAA) and n.lower() in want]
