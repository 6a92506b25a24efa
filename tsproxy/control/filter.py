"""Sans-IO packet filter matcher for inbound flows (PROTOCOL.md 3.13).

FilterRule: SrcIPs ["*" | IP | CIDR | "a-b" | "cap:..."], DstPorts [{IP, Bits?, Ports{First,Last}}],
IPProto [] (empty = TCP, UDP, ICMPv4, ICMPv6).  A flow is allowed when some rule matches its
source, protocol, destination address and (for port protocols) destination port.  No rules =
no new inbound flows.  Malformed entries are skipped and counted, never raised, so one bad rule
does not break the rest.  ICMP has no ports: it matches on addresses alone.
"""

from __future__ import annotations

import ipaddress

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
DEFAULT_PROTOS = frozenset((PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6))
_PORTLESS = (PROTO_ICMP, PROTO_ICMPV6)
_ALL = ((4, 0, (1 << 32) - 1), (6, 0, (1 << 128) - 1))


def parse_ip_set(text: str, bits=None) -> list | None:
    """-> [(version, lo_int, hi_int)], or None if not understood.  "cap:" sources match none."""
    if not isinstance(text, str):
        return None
    if text == "*":
        return list(_ALL)
    if text.startswith("cap:"):
        return []
    try:
        if "-" in text:
            a, b = (ipaddress.ip_address(x) for x in text.split("-", 1))
            if a.version != b.version or int(a) > int(b):
                return None
            return [(a.version, int(a), int(b))]
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
        else:
            ip = ipaddress.ip_address(text)
            plen = ip.max_prefixlen if bits is None else int(bits)
            net = ipaddress.ip_network(f"{ip}/{plen}", strict=False)
    except (ValueError, TypeError):
        return None
    return [(net.version, int(net.network_address), int(net.broadcast_address))]


def _in(ranges, version: int, ip: int) -> bool:
    for v, lo, hi in ranges:
        if v == version and lo <= ip <= hi:
            return True
    return False


class PacketFilter:
    """Compiled rules.  match() is the question the netstack asks for each new inbound flow."""

    def __init__(self, rules: list):
        self.counters = {"filter_bad_entries": 0}
        self._rules = []
        for r in rules or ():
            compiled = self._compile(r)
            if compiled is not None:
                self._rules.append(compiled)

    def _compile(self, r):
        if not isinstance(r, dict):
            self.counters["filter_bad_entries"] += 1
            return None
        srcs = []
        src_bits = r.get("SrcBits") or []
        for i, s in enumerate(r.get("SrcIPs") or ()):
            bits = src_bits[i] if i < len(src_bits) else None
            got = parse_ip_set(s, bits)
            if got is None:
                self.counters["filter_bad_entries"] += 1
                continue
            srcs.extend(got)
        dsts = []
        for d in r.get("DstPorts") or ():
            if not isinstance(d, dict):
                self.counters["filter_bad_entries"] += 1
                continue
            ips = parse_ip_set(d.get("IP"), d.get("Bits"))
            ports = d.get("Ports") or {}
            try:
                first, last = int(ports.get("First", 0)), int(ports.get("Last", 0))
            except (TypeError, ValueError, AttributeError):
                ips = None
            if ips is None:
                self.counters["filter_bad_entries"] += 1
                continue
            dsts.append((ips, first, last))
        protos = r.get("IPProto")
        if protos:
            protos = frozenset(p for p in protos if isinstance(p, int))
        else:
            protos = DEFAULT_PROTOS
        if not srcs or not dsts:
            return None
        return srcs, dsts, protos

    def __len__(self) -> int:
        return len(self._rules)

    def match(self, src_ip, dst_ip, proto: int, dst_port: int = 0) -> bool:
        src = ipaddress.ip_address(src_ip)
        dst = ipaddress.ip_address(dst_ip)
        sv, si, dv, di = src.version, int(src), dst.version, int(dst)
        for srcs, dsts, protos in self._rules:
            if proto not in protos or not _in(srcs, sv, si):
                continue
            for ips, first, last in dsts:
                if _in(ips, dv, di) and (proto in _PORTLESS or first <= dst_port <= last):
                    return True
        return False
