"""TCP header (RFC 9293 3.1) and options (MSS, window scale, SACK-permitted, SACK).

    sport 2 | dport 2 | seq 4 | ack 4 | data offset 4 bits, flags 12 bits | window 2 |
    checksum 2 | urgent 2 | options (data offset * 4 - 20)

`Packetizer` precomputes everything constant for one 4-tuple (IP header template, pseudo-
header sum) so building a segment costs one checksum pass over header and payload.
"""

import struct

from tsproxy.netstack.wire.checksum import ones_sum
from tsproxy.netstack.wire.ip import DEFAULT_TTL, DF, PROTO_TCP

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

OPT_END, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8

HEADER = struct.Struct("!HHIIHHHH")
unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_H = struct.Struct("!H")
_pack_h_into = _H.pack_into
_from_bytes = int.from_bytes


def parse_options(opts) -> dict:
    """-> {"mss": int, "wscale": int, "sack_perm": True, "sack": [(l, r), ...]}; malformed
    options end the parse (RFC 9293: be liberal), never raise."""
    out = {}
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            break
        length = opts[i + 1]
        if length < 2 or i + length > n:
            break
        body = opts[i + 2:i + length]
        if kind == OPT_MSS and length == 4:
            out["mss"] = _from_bytes(body, "big")
        elif kind == OPT_WSCALE and length == 3:
            out["wscale"] = min(body[0], 14)
        elif kind == OPT_SACK_PERM and length == 2:
            out["sack_perm"] = True
        elif kind == OPT_SACK and (length - 2) % 8 == 0:
            out["sack"] = [(_from_bytes(body[j:j + 4], "big"), _from_bytes(body[j + 4:j + 8], "big"))
                           for j in range(0, length - 2, 8)]
        i += length
    return out


def syn_options(mss: int, wscale: int | None, sack_perm: bool) -> bytes:
    o = bytes((OPT_MSS, 4)) + mss.to_bytes(2, "big")
    if sack_perm:
        o += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2))
    if wscale is not None:
        o += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    return o


def sack_option(blocks) -> bytes:
    """At most 4 blocks fit without timestamps; NOP NOP keeps 4-byte alignment."""
    blocks = blocks[:4]
    o = bytearray((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks)))
    for left, right in blocks:
        o += (left & 0xFFFFFFFF).to_bytes(4, "big") + (right & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(o)


class Packetizer:
    """Builds whole IP+TCP packets for one connection (addresses packed, ports ints)."""

    __slots__ = ("v4", "ports_hi", "sport", "dport", "ip_prefix", "ip_suffix", "ip_const_sum",
                 "pseudo_base", "hlen")

    def __init__(self, src: bytes, dst: bytes, sport: int, dport: int, ttl: int = DEFAULT_TTL):
        self.v4 = len(src) == 4
        self.sport, self.dport = sport, dport
        if self.v4:
            hdr = _V4.pack(0x45, 0, 0, 0, DF, ttl, PROTO_TCP, 0, src, dst)
            self.ip_prefix = hdr
            self.ip_const_sum = ones_sum(hdr)
            self.hlen = 20
        else:
            self.ip_prefix = _V6.pack(6 << 28, 0, PROTO_TCP, ttl, src, dst)
            self.ip_const_sum = 0
            self.hlen = 40
        self.pseudo_base = ones_sum(src + dst) + PROTO_TCP

    def build(self, seq: int, ack: int, flags: int, window: int, options: bytes = b"",
              payload=b"") -> bytearray:
        hl = 20 + len(options)
        tcp_len = hl + len(payload)
        buf = bytearray(self.ip_prefix)
        ih = self.hlen
        if self.v4:
            total = ih + tcp_len
            _pack_h_into(buf, 2, total)
            s = (self.ip_const_sum + total) % 0xFFFF
            _pack_h_into(buf, 10, ~s & 0xFFFF)
        else:
            _pack_h_into(buf, 4, tcp_len)
        buf += _pack_header(self.sport, self.dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                            (hl << 10) | flags, window, 0, 0)
        if options:
            buf += options
        if payload:
            buf += payload
        seg = memoryview(buf)[ih:]
        if tcp_len & 1:
            s = _from_bytes(seg, "big") * 256
        else:
            s = _from_bytes(seg, "big")
        s = (s + self.pseudo_base + tcp_len) % 0xFFFF
        _pack_h_into(buf, ih + 16, ~s & 0xFFFF)   # 0xFFFF and 0 both verify
        return buf


def segment_checksum_ok(pkt, start: int, end: int, src: bytes, dst: bytes, proto: int) -> bool:
    seg = memoryview(pkt)[start:end]
    n = end - start
    s = _from_bytes(seg, "big") * 256 if n & 1 else _from_bytes(seg, "big")
    s = (s + ones_sum(src + dst) + proto + n) % 0xFFFF
    return s == 0
