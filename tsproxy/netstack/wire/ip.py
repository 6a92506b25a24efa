"""IPv4 (RFC 791) and IPv6 (RFC 8200) headers.

    IPv4: ver/ihl 1 | tos 1 | total len 2 | id 2 | flags/frag 2 | ttl 1 | proto 1 | csum 2 |
          src 4 | dst 4 | options (ihl*4 - 20)
    IPv6: ver/tc/flow 4 | payload len 2 | next header 1 | hop limit 1 | src 16 | dst 16 |
          extension headers...

`parse(packet)` returns (version, src, dst, proto, payload offset, payload end, flags) with
packed addresses, or None for anything malformed; callers count the drop.
"""

import struct

from tsproxy.netstack.wire.checksum import checksum, ones_sum

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
_EXT_SKIP = {0, 43, 60}          # hop-by-hop, routing, destination options
_EXT_FRAGMENT = 44
_EXT_NONE = 59

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_pack_v4 = _V4.pack
_pack_v6 = _V6.pack
_unpack_v4 = _V4.unpack_from
_unpack_v6 = _V6.unpack_from

DF = 0x4000
MF = 0x2000
FRAG_MASK = 0x1FFF
DEFAULT_TTL = 64

# parse() result codes for the drop counters
BAD_HEADER = "ip_bad_header"
BAD_CHECKSUM = "ip_bad_checksum"
FRAGMENT = "ip_fragment"


def parse(pkt, verify_checksum: bool = True):
    """-> (version, src, dst, proto, start, end) or an error code string."""
    n = len(pkt)
    if n < 20:
        return BAD_HEADER
    v = pkt[0] >> 4
    if v == 4:
        vihl, _, total, _, frag, _, proto, _, src, dst = _unpack_v4(pkt)
        ihl = (vihl & 15) * 4
        if ihl < 20 or total < ihl or total > n:
            return BAD_HEADER
        if verify_checksum and checksum(pkt[:ihl]) != 0:
            return BAD_CHECKSUM
        if frag & (MF | FRAG_MASK):
            return FRAGMENT
        return 4, src, dst, proto, ihl, total
    if v == 6:
        if n < 40:
            return BAD_HEADER
        _, plen, nh, _, src, dst = _unpack_v6(pkt)
        end = 40 + plen
        if end > n:
            return BAD_HEADER
        off = 40
        for _ in range(8):                      # bounded walk over extension headers
            if nh in _EXT_SKIP:
                if off + 8 > end:
                    return BAD_HEADER
                nh, hlen = pkt[off], (pkt[off + 1] + 1) * 8
                off += hlen
                if off > end:
                    return BAD_HEADER
            elif nh == _EXT_FRAGMENT:
                return FRAGMENT
            else:
                break
        else:
            return BAD_HEADER
        if nh == _EXT_NONE:
            return BAD_HEADER
        return 6, src, dst, nh, off, end
    return BAD_HEADER


def build_v4(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int = 0, ttl: int = DEFAULT_TTL) -> bytes:
    hdr = _pack_v4(0x45, 0, 20 + payload_len, ident, DF, ttl, proto, 0, src, dst)
    c = checksum(hdr)
    return hdr[:10] + bytes((c >> 8, c & 0xFF)) + hdr[12:]


def build_v6(src: bytes, dst: bytes, proto: int, payload_len: int, hop_limit: int = DEFAULT_TTL) -> bytes:
    return _pack_v6(6 << 28, payload_len, proto, hop_limit, src, dst)


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Folded sum of the TCP/UDP pseudo-header (RFC 9293 3.1, RFC 8200 8.1)."""
    if len(src) == 4:
        return ones_sum(src + dst + bytes((0, proto)) + length.to_bytes(2, "big"))
    return ones_sum(src + dst + length.to_bytes(4, "big") + bytes((0, 0, 0, proto)))
