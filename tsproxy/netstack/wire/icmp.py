"""ICMP (RFC 792) and ICMPv6 (RFC 4443): echo replies and the errors we map to dial failures.

    type 1 | code 1 | checksum 2 | rest-of-header 4 | body
Error bodies start with the offending packet's IP header and at least 8 bytes of its payload.
"""

from tsproxy.netstack.wire import ip
from tsproxy.netstack.wire.checksum import checksum, ones_sum

V4_ECHO_REPLY, V4_UNREACH, V4_ECHO_REQUEST, V4_TIME_EXCEEDED = 0, 3, 8, 11
V6_UNREACH, V6_TOO_BIG, V6_TIME_EXCEEDED, V6_ECHO_REQUEST, V6_ECHO_REPLY = 1, 2, 3, 128, 129

# error kinds handed to connections
REFUSED = "refused"
UNREACHABLE = "unreachable"
PROHIBITED = "prohibited"
TTL = "ttl"


def classify_v4(icmp_type: int, code: int):
    if icmp_type == V4_UNREACH:
        if code == 3:
            return REFUSED
        if code in (9, 10, 13):
            return PROHIBITED
        if code == 4:                      # fragmentation needed: we set DF, treat as soft
            return None
        return UNREACHABLE
    if icmp_type == V4_TIME_EXCEEDED:
        return TTL
    return None


def classify_v6(icmp_type: int, code: int):
    if icmp_type == V6_UNREACH:
        if code == 4:
            return REFUSED
        if code in (1, 5, 6):
            return PROHIBITED
        return UNREACHABLE
    if icmp_type == V6_TIME_EXCEEDED:
        return TTL
    return None


def echo_reply(version: int, src: bytes, dst: bytes, body) -> bytes:
    """Reply to an echo request whose ICMP message is `body`, from `src` (us) to `dst`."""
    msg = bytearray(body)
    if version == 4:
        msg[0] = V4_ECHO_REPLY
        msg[2:4] = b"\0\0"
        msg[2:4] = checksum(msg).to_bytes(2, "big")
        return ip.build_v4(src, dst, ip.PROTO_ICMP, len(msg)) + msg
    msg[0] = V6_ECHO_REPLY
    msg[2:4] = b"\0\0"
    s = (ones_sum(msg) + ip.pseudo_sum(src, dst, ip.PROTO_ICMPV6, len(msg))) % 0xFFFF
    msg[2:4] = (~s & 0xFFFF).to_bytes(2, "big")
    return ip.build_v6(src, dst, ip.PROTO_ICMPV6, len(msg)) + msg


def port_unreachable(version: int, src: bytes, dst: bytes, offending: bytes) -> bytes:
    """ICMP port unreachable for a UDP datagram nobody listens for (quoting it, bounded)."""
    if version == 4:
        quote = offending[:548]
        msg = bytearray(bytes((V4_UNREACH, 3, 0, 0, 0, 0, 0, 0)) + quote)
        msg[2:4] = checksum(msg).to_bytes(2, "big")
        return ip.build_v4(src, dst, ip.PROTO_ICMP, len(msg)) + msg
    quote = offending[:1232]
    msg = bytearray(bytes((V6_UNREACH, 4, 0, 0, 0, 0, 0, 0)) + quote)
    s = (ones_sum(msg) + ip.pseudo_sum(src, dst, ip.PROTO_ICMPV6, len(msg))) % 0xFFFF
    msg[2:4] = (~s & 0xFFFF).to_bytes(2, "big")
    return ip.build_v6(src, dst, ip.PROTO_ICMPV6, len(msg)) + msg
