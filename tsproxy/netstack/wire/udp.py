"""UDP (RFC 768): header `sport 2 | dport 2 | length 2 | checksum 2`, whole packets built here."""

import struct

from tsproxy.netstack.wire import ip
from tsproxy.netstack.wire.checksum import ones_sum

HEADER = struct.Struct("!HHHH")
unpack_header = HEADER.unpack_from


def build(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    length = 8 + len(payload)
    seg = bytearray(HEADER.pack(sport, dport, length, 0))
    seg += payload
    s = (ones_sum(seg) + ip.pseudo_sum(src, dst, ip.PROTO_UDP, length)) % 0xFFFF
    c = ~s & 0xFFFF
    seg[6:8] = (c or 0xFFFF).to_bytes(2, "big")       # 0 means "no checksum" in UDP
    hdr = ip.build_v4(src, dst, ip.PROTO_UDP, length) if len(src) == 4 else ip.build_v6(src, dst, ip.PROTO_UDP, length)
    return hdr + seg
