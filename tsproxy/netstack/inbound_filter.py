"""The tailnet packet filter applied to packets arriving from peers (PROTOCOL.md 3.13).

Only packets that open a new flow are judged: a TCP SYN without ACK, an ICMP/ICMPv6 echo
request, and a UDP datagram that is not a reply to one we sent (a small table of our outbound
UDP flows answers that).  Everything else belongs to a flow we started or already accepted and
passes without a lookup, so the hot path costs two byte reads per packet.

`match(src_ip, dst_ip, proto, dst_port) -> bool` is control.filter.PacketFilter.match (or any
callable with that shape); `None` means no filter received yet, which denies new flows as the
Go client does.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

TCP, UDP, ICMP, ICMP6, TSMP = 6, 17, 1, 58, 99
MAX_UDP_FLOWS = 4096


class InboundFilter:
    def __init__(self, match=None):
        self.match = match
        self._udp_out: OrderedDict = OrderedDict()   # (peer ip bytes, peer port, our port)
        self.counters = {"filter_dropped": 0, "filter_accepted_new": 0}

    def set_match(self, match) -> None:
        self.match = match

    def note_outbound(self, packets) -> None:
        """Remember UDP flows we start, so their replies are not judged as new flows."""
        flows = self._udp_out
        for p in packets:
            v = p[0] >> 4
            if v == 4:
                if p[9] != UDP:
                    continue
                off = (p[0] & 15) * 4
                key = (p[16:20], int.from_bytes(p[off + 2:off + 4], "big"),
                       int.from_bytes(p[off:off + 2], "big"))
            elif v == 6:
                if p[6] != UDP:
                    continue
                key = (p[24:40], int.from_bytes(p[42:44], "big"), int.from_bytes(p[40:42], "big"))
            else:
                continue
            if key in flows:
                flows.move_to_end(key)
            else:
                flows[key] = True
                if len(flows) > MAX_UDP_FLOWS:
                    flows.popitem(last=False)

    def filter(self, packets: list) -> list:
        out = None
        for i, p in enumerate(packets):
            if self._allowed(p):
                if out is not None:
                    out.append(p)
            else:
                self.counters["filter_dropped"] += 1
                if out is None:
                    out = list(packets[:i])
        return packets if out is None else out

    def _allowed(self, p) -> bool:
        if len(p) < 20:
            return True                    # the stack counts and drops malformed packets
        v = p[0] >> 4
        if v == 4:
            proto, off = p[9], (p[0] & 15) * 4
            src, dst = p[12:16], p[16:20]
        elif v == 6 and len(p) >= 40:
            proto, off = p[6], 40
            src, dst = p[8:24], p[24:40]
        else:
            return True
        if proto == TSMP:
            return True                    # peer-to-peer control, before the filter (Go
                                           # tstun); the stack counts and drops it
        if proto == TCP:
            if len(p) < off + 14 or (p[off + 13] & 0x12) != 0x02:   # not a bare SYN
                return True
            port = int.from_bytes(p[off + 2:off + 4], "big")
        elif proto == UDP:
            if len(p) < off + 8:
                return True
            sport = int.from_bytes(p[off:off + 2], "big")
            port = int.from_bytes(p[off + 2:off + 4], "big")
            if (src, sport, port) in self._udp_out:
                return True
        elif proto in (ICMP, ICMP6):
            if len(p) < off + 1 or p[off] not in (8, 128):         # only echo requests open flows
                return True
            port = 0
        else:
            port = 0
        if self.match is None:
            return False
        ok = self.match(str(ipaddress.ip_address(bytes(src))), str(ipaddress.ip_address(bytes(dst))),
                        proto, port)
        if ok:
            self.counters["filter_accepted_new"] += 1
        return ok
