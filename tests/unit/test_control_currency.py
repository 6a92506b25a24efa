"""Protocol currency (docs/protocol-notes.md): the capability version we advertise, what
controls and peers of newer versions send that we do not act on (unknown node attributes,
c2n paths, TSMP packets: handled or dropped and counted, never an error), 64-bit DERP region
IDs."""

from __future__ import annotations

import base64
import ipaddress
import json

from tsproxy.control import messages as msg
from tsproxy.control.netmap import MapSession, unknown_node_attrs
from tsproxy.control.noiseconn import ClientHandshake
from tsproxy.control.ping import c2n_answer
from tsproxy.disco import wire as disco
from tsproxy.keys import DiscoPrivate, MachinePrivate, NodePrivate
from tsproxy.netstack.inbound_filter import InboundFilter
from tsproxy.netstack.stack import Stack
from tsproxy.netstack.wire import ip

NOW = 1_760_000_000.0
ME = NodePrivate(bytes([1]) * 32).public()
PEER = NodePrivate(bytes([2]) * 32).public()
DK = DiscoPrivate(bytes([3]) * 32).public()
BIG_REGION = 2 ** 63 - 1                    # Go's int on 64-bit platforms


def test_we_advertise_a_current_capability_version_everywhere():
    assert msg.CAPABILITY_VERSION >= 133            # Tailscale 1.96
    body = json.loads(msg.build_map_request(node_key=ME, disco_key=DK,
                                            hostinfo=msg.hostinfo("h"), endpoints=[]))
    assert body["Version"] == msg.CAPABILITY_VERSION
    hs = ClientHandshake(MachinePrivate.generate(), MachinePrivate.generate().public(),
                         "127.0.0.1:1", version=msg.CAPABILITY_VERSION)
    head = hs.request.decode("latin-1")
    b64 = next(ln.split(":", 1)[1].strip() for ln in head.split("\r\n")
               if ln.lower().startswith("x-tailscale-handshake:"))
    init = base64.b64decode(b64)
    assert int.from_bytes(init[:2], "big") == msg.CAPABILITY_VERSION  # Noise version header


def test_c2n_paths_of_our_capability_version():
    st, out = c2n_answer(b"GET /debug/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert st == 200 and out.startswith(b"HTTP/1.1 200 ")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1]) == {"Warnings": {}}
    st, out = c2n_answer(b"GET /debug/health HTTP/1.1\r\n\r\n", {"control-health": "boom"})
    w = json.loads(out.split(b"\r\n\r\n", 1)[1])["Warnings"]
    assert w["control-health"]["Text"] == "boom"
    st, out = c2n_answer(b"POST /debug/netmap HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    assert st == 501 and b"feature not included in this build" in out
    for path in (b"/debug/tka/log", b"/remoteapi/localapi/v0/status", b"/sockstats"):
        st, out = c2n_answer(b"GET " + path + b" HTTP/1.1\r\n\r\n")
        assert st == 404 and out.startswith(b"HTTP/1.1 404 ")
    st, out = c2n_answer(b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    assert st == 200 and out.endswith(b"\r\n\r\nabc")
    assert c2n_answer(b"\x00\xff junk")[0] == 400


def test_unknown_node_attributes_are_told_apart_from_known_ones():
    caps = {"only-tcp-443": None, "https://tailscale.com/cap/is-admin": None,
            "default-auto-update": [True], "disable-hosts-file-updates": None,
            "force-register-magicdns-ipv4-only": None, "emit-runtime-metrics": None,
            "disable-udp-gro": None, "some-future-attr?v=3": [{"x": 1}]}
    assert unknown_node_attrs(caps) == ["disable-udp-gro", "some-future-attr?v=3"]


def _node(i, key, **kw):
    n = {"ID": i, "StableID": f"s{i}", "Name": f"n{i}.t.test.", "Key": key.text(),
         "DiscoKey": DK.text(), "Addresses": [f"100.64.0.{i}/32"], "MachineAuthorized": True}
    n.update(kw)
    return n


def test_64_bit_derp_region_ids_in_maps_homes_and_patches():
    region = {"RegionID": BIG_REGION, "RegionCode": "big", "RegionName": "big",
              "Nodes": [{"Name": "1", "RegionID": BIG_REGION, "HostName": "127.0.0.1",
                         "DERPPort": 443}]}
    s = MapSession()
    nm = s.apply(msg.parse_map_response({
        "Node": _node(1, ME, HomeDERP=BIG_REGION),
        "DERPMap": {"Regions": {str(BIG_REGION): region, "900": {**region, "RegionID": 900}}},
        "Peers": [_node(2, PEER, HomeDERP=2 ** 40)]}), NOW)
    assert BIG_REGION in nm.derp_map.regions and nm.self_node.home_derp == BIG_REGION
    assert nm.peers[2].home_derp == 2 ** 40
    nm = s.apply(msg.parse_map_response({"PeersChangedPatch": [
        {"NodeID": 2, "DERPRegion": BIG_REGION}]}), NOW)
    assert nm.peers[2].home_derp == BIG_REGION
    hi = msg.hostinfo("h", preferred_derp=BIG_REGION)
    assert json.loads(json.dumps(hi))["NetInfo"]["PreferredDERP"] == BIG_REGION
    # a disco pong to a ping that came over DERP: Go's pseudo address carries uint16(region)
    pong = disco.build_pong(b"t" * 12, (disco.DERP_MAGIC_IP, 70000))
    assert disco.parse_message(pong)[2] == (disco.DERP_MAGIC_IP, 70000 & 0xFFFF)


def _tsmp(src="100.64.0.2", dst="100.64.0.1"):
    payload = b"\x64" + bytes(32) + bytes(12)    # a disco-key advertisement-shaped body
    hdr = ip.build_v4(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
                      99, len(payload))
    return hdr + payload


def test_tsmp_packets_pass_the_filter_and_are_counted_and_dropped_by_the_stack():
    f = InboundFilter(match=lambda *a: False)        # a filter that allows nothing
    pkt = _tsmp()
    assert f.filter([pkt]) == [pkt] and f.counters["filter_dropped"] == 0
    st = Stack(["100.64.0.1"], mtu=1280, now=NOW)
    st.receive_packet(pkt, NOW)
    st.receive_packet(_tsmp(src="100.64.0.9"), NOW)
    st.receive_packet(_tsmp()[:30], NOW)             # a truncated one: a bad header
    assert st.counters["tsmp_dropped"] == 2 and st.counters["ip_bad_header"] == 1
    assert st.counters["ip_unknown_protocol"] == 0
