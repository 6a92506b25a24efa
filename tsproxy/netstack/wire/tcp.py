"""TCP header (RFC 9293 3.1) and options (MSS, window scale, SACK-permitted, SACK).

    sport 2 | dport 2 | seq 4 | ack 4 | data offset 4 bits, flags 12 bits | window 2 |
    checksum 2 | urgent 2 | options (data offset * 4 - 20)

`Packetizer` precomputes everything constant for one 4-tuple (IP header pieces, pseudo-header
and port sum) so building a segment costs one checksum pass over the payload and one copy.
"""

import struct

from tsproxy.netstack.wire.checksum import fold, ones_sum
from tsproxy.netstack.wire.ip import DEFAULT_TTL, DF, PROTO_TCP

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

OPT_END, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8

HEADER = struct.Struct("!HHIIHHHH")
unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_IP4_TCP = struct.Struct("!2sH6sH8sHHIIHHHH")    # the IPv4 header's variable fields, then TCP
_IP6_TCP = struct.Struct("!4sH2s32sHHIIHHHH")
_join = bytearray().join                           # one allocation for the whole packet
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
    """Builds whole IP+TCP packets for one connection (addresses packed, ports ints).

    The TCP checksum is summed from the header fields as integers plus one conversion of the
    payload (read straight from the caller's buffer, a memoryview of the send buffer is fine),
    so the packet is assembled in one join with its checksums already in place: one copy of
    the payload, no patching.  Byte-identical to summing the finished segment."""

    __slots__ = ("v4", "sport", "dport", "hlen", "ip_const_sum", "pseudo_base", "_pack", "_pre",
                 "_mid", "_addrs")

    def __init__(self, src: bytes, dst: bytes, sport: int, dport: int, ttl: int = DEFAULT_TTL):
        self.v4 = len(src) == 4
        self.sport, self.dport = sport, dport
        self._addrs = src + dst
        if self.v4:
            hdr = _V4.pack(0x45, 0, 0, 0, DF, ttl, PROTO_TCP, 0, src, dst)
            self.ip_const_sum = ones_sum(hdr)
            self.hlen = 20
            self._pre, self._mid = hdr[:2], hdr[4:10]           # ver/ihl/tos; id/frag/ttl/proto
            self._pack = _IP4_TCP.pack
        else:
            hdr = _V6.pack(6 << 28, 0, PROTO_TCP, ttl, src, dst)
            self.ip_const_sum = 0
            self.hlen = 40
            self._pre, self._mid = hdr[:4], hdr[6:8]            # ver/class/flow; next hdr/hops
            self._pack = _IP6_TCP.pack
        # pseudo-header (addresses, protocol) and the ports: constant for the connection
        self.pseudo_base = ones_sum(src + dst) + PROTO_TCP + sport + dport

    def build(self, seq: int, ack: int, flags: int, window: int, options: bytes = b"",
              payload=b"") -> bytearray:
        olen = len(options)
        if olen & 3:
            raise ValueError(f"TCP options must fill 32-bit words, got {olen} bytes")
        hl = 20 + olen
        plen = len(payload)
        tcp_len = hl + plen
        seq &= 0xFFFFFFFF
        ack &= 0xFFFFFFFF
        offflags = (hl << 10) | flags
        s = (self.pseudo_base + tcp_len + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16)
             + (ack & 0xFFFF) + offflags + window)
        if olen:
            s += _from_bytes(options, "big")
        if plen:
            # header and options are whole words, so the payload's words line up on its own;
            # folded on its own first, the big integer is never copied by an addition
            p = _from_bytes(payload, "big")
            if plen & 1:
                p <<= 8
            s += fold(p) if plen > 360 else p
        s %= 0xFFFF
        tcs = ~s & 0xFFFF                             # 0xFFFF and 0 both verify
        if self.v4:
            total = 20 + tcp_len
            ics = ~((self.ip_const_sum + total) % 0xFFFF) & 0xFFFF
            hdr = self._pack(self._pre, total, self._mid, ics, self._addrs, self.sport,
                             self.dport, seq, ack, offflags, window, tcs, 0)
        else:
            hdr = self._pack(self._pre, tcp_len, self._mid, self._addrs, self.sport, self.dport,
                             seq, ack, offflags, window, tcs, 0)
        return _join((hdr, options, payload))


def segment_checksum_ok(pkt, start: int, end: int, src: bytes, dst: bytes, proto: int) -> bool:
    seg = memoryview(pkt)[start:end]
    n = end - start
    s = _from_bytes(seg, "big") * 256 if n & 1 else _from_bytes(seg, "big")
    s = (s + ones_sum(src + dst) + proto + n) % 0xFFFF
    return s == 0
