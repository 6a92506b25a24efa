"""The tailnet packet filter on inbound packets: only new flows are judged."""

import ipaddress
import struct

from tsproxy.control.filter import PacketFilter
from tsproxy.netstack.inbound_filter import InboundFilter
from tsproxy.netstack.wire import udp

ME, PEER, OTHER = "100.64.0.1", "100.64.0.2", "100.64.0.3"


def v4(src, dst, proto, payload):
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


def tcp(src, dst, dport, flags, sport=40000):
    return v4(src, dst, 6, struct.pack(">HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0))


def v6_tcp_syn(src, dst, dport):
    seg = struct.pack(">HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    return struct.pack(">IHBB16s16s", 6 << 28, len(seg), 6, 64, ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed) + seg


RULES = [{"SrcIPs": [PEER, "fd7a:115c:a1e0::2"], "DstPorts": [{"IP": "*", "Ports": {"First": 22, "Last": 22}}]}]


def test_new_tcp_flows_judged_established_pass():
    f = InboundFilter(PacketFilter(RULES).match)
    syn_ok = tcp(PEER, ME, 22, 0x02)
    syn_bad_port = tcp(PEER, ME, 80, 0x02)
    syn_bad_src = tcp(OTHER, ME, 22, 0x02)
    synack = tcp(OTHER, ME, 80, 0x12)          # reply to a connection we opened
    ack = tcp(OTHER, ME, 80, 0x10)
    out = f.filter([syn_ok, syn_bad_port, syn_bad_src, synack, ack])
    assert out == [syn_ok, synack, ack]
    assert f.counters == {"filter_dropped": 2, "filter_accepted_new": 1}
    assert f.filter([v6_tcp_syn("fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1", 22)])
    assert not f.filter([v6_tcp_syn("fd7a:115c:a1e0::3", "fd7a:115c:a1e0::1", 22)])


def test_no_filter_yet_denies_new_flows_only():
    f = InboundFilter(None)
    assert f.filter([tcp(PEER, ME, 22, 0x02)]) == []
    assert len(f.filter([tcp(PEER, ME, 22, 0x10)])) == 1


def test_udp_replies_to_our_flows_pass_unsolicited_are_judged():
    f = InboundFilter(PacketFilter([]).match)          # deny-all
    me, peer = ipaddress.ip_address(ME).packed, ipaddress.ip_address(PEER).packed
    query = udp.build(me, peer, 5353, 53, b"q")
    f.note_outbound([query])
    reply = udp.build(peer, me, 53, 5353, b"r")
    stray = udp.build(peer, me, 53, 5354, b"r")
    assert f.filter([reply, stray]) == [reply]


def test_icmp_echo_request_judged_reply_passes():
    f = InboundFilter(PacketFilter([{"SrcIPs": [PEER], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 0}}]}]).match)
    req_ok = v4(PEER, ME, 1, bytes([8, 0, 0, 0, 0, 1, 0, 1]))
    req_bad = v4(OTHER, ME, 1, bytes([8, 0, 0, 0, 0, 1, 0, 1]))
    reply = v4(OTHER, ME, 1, bytes([0, 0, 0, 0, 0, 1, 0, 1]))
    assert f.filter([req_ok, req_bad, reply]) == [req_ok, reply]


def test_garbage_is_left_to_the_stack():
    f = InboundFilter(None)
    junk = [b"", b"\x45", b"\x60" + bytes(10), bytes(40)]
    assert f.filter(junk) == junk
