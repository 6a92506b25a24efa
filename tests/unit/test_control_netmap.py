"""MapResponse decoding (zstd and plain), every delta kind, netmap products, packet filter."""

from __future__ import annotations

import ipaddress
import json

import pytest
import zstandard

from tsproxy.control import messages as msg
from tsproxy.control.filter import PacketFilter
from tsproxy.control.netmap import MapSession, diff_peers
from tsproxy.errors import RemoteProtocolError
from tsproxy.keys import DiscoPrivate, NodePrivate

pytestmark = pytest.mark.timeout(30)

NOW = 1_760_000_000.0
K = [NodePrivate(bytes([i]) * 32).public() for i in range(1, 8)]
D = [DiscoPrivate(bytes([i + 50]) * 32).public() for i in range(1, 8)]
CT = "2025-10-09T08:53:20Z"             # == NOW


def node(i, name, ip, **extra):
    n = {"ID": i, "StableID": f"n{i}", "Name": f"{name}.tail1.ts.net.", "User": 1,
         "Key": K[i].text(), "KeyExpiry": "0001-01-01T00:00:00Z", "DiscoKey": D[i].text(),
         "Addresses": [f"100.64.0.{ip}/32", f"fd7a:115c:a1e0::{ip}/128"], "HomeDERP": 900,
         "MachineAuthorized": True}
    n.update(extra)
    return n


FULL = {
    "Node": node(1, "self", 1, AllowedIPs=None),
    "DERPMap": {"Regions": {"900": {"RegionID": 900, "RegionCode": "test", "Nodes": [
        {"Name": "900a", "RegionID": 900, "HostName": "headscale", "DERPPort": 0,
         "STUNPort": -1}]}}},
    "Peers": [node(2, "alpha", 2), node(3, "beta", 3, Endpoints=["198.51.100.9:41641",
                                                                 "[2001:db8::1]:41641"])],
    "DNSConfig": {"Domains": ["tail1.ts.net"], "Proxied": True,
                  "Resolvers": [{"Addr": "1.1.1.1"}],
                  "Routes": {"corp.example.": [{"Addr": "100.64.0.3"}]},
                  "ExtraRecords": [{"Name": "db.tail1.ts.net.", "Value": "100.64.0.3"},
                                   {"Name": "bad", "Value": "nope"}]},
    "Domain": "tail1.ts.net",
    "PacketFilter": [{"SrcIPs": ["100.64.0.2"], "DstPorts": [
        {"IP": "*", "Ports": {"First": 22, "Last": 22}}]}],
    "UserProfiles": [{"ID": 1, "LoginName": "t@example.com"}],
    "ControlTime": CT,
}


def decode(obj, compressed=True):
    dec = msg.MapStreamDecoder(compressed=compressed)
    frames = dec.feed(msg.encode_map_message(obj, compressed=compressed))
    assert len(frames) == 1
    return msg.parse_map_response(frames[0])


@pytest.fixture
def session():
    s = MapSession()
    nm = s.apply(decode(FULL), NOW)
    return s, nm


def test_stream_framing_zstd_and_plain_dribbled():
    for compressed in (True, False):
        dec = msg.MapStreamDecoder(compressed=compressed)
        raw = b"".join(msg.encode_map_message(o, compressed=compressed)
                       for o in ({"KeepAlive": True}, FULL, {"KeepAlive": True}))
        out = []
        for i in range(0, len(raw), 3):
            out += dec.feed(raw[i:i + 3])
        assert out[0] == {"KeepAlive": True} and out[2] == {"KeepAlive": True}
        assert out[1]["Peers"][0]["ID"] == 2
    # the length prefix is little-endian
    framed = msg.encode_map_message({"KeepAlive": True}, compressed=False)
    assert framed[:4] == len(b'{"KeepAlive":true}').to_bytes(4, "little")


def test_stream_framing_errors():
    dec = msg.MapStreamDecoder()
    with pytest.raises(RemoteProtocolError, match="zstd"):
        dec.feed(b"\x05\x00\x00\x00hello")
    dec = msg.MapStreamDecoder(max_message=100)
    with pytest.raises(RemoteProtocolError, match="limit"):
        dec.feed((1000).to_bytes(4, "little"))
    # a zstd bomb: small frame, large content
    bomb = zstandard.ZstdCompressor().compress(b'{"a":"' + b"x" * 5000 + b'"}')
    dec = msg.MapStreamDecoder(max_message=1000)
    with pytest.raises(RemoteProtocolError, match="limit"):
        dec.feed(len(bomb).to_bytes(4, "little") + bomb)
    dec = msg.MapStreamDecoder(compressed=False)
    with pytest.raises(RemoteProtocolError):
        dec.feed(msg.encode_map_message([1], compressed=False)[:0] + b"\x03\x00\x00\x00[1]")


def test_full_map(session):
    s, nm = session
    assert nm.self_node.key == K[1] and nm.self_node.machine_authorized
    assert [str(a) for a in nm.addresses] == ["100.64.0.1", "fd7a:115c:a1e0::1"]
    assert nm.self_node.allowed_ips == nm.self_node.addresses     # null AllowedIPs
    assert sorted(nm.peers) == [2, 3]
    assert nm.peers[3].endpoints == [("198.51.100.9", 41641), ("2001:db8::1", 41641)]
    assert set(nm.wireguard_peers()) == {K[2], K[3]}
    assert nm.derp_map.regions[900].nodes[0].host_name == "headscale"
    msg.fix_embedded_derp(nm.derp_map, "ctl.example.com", 8080)
    assert (nm.derp_map.regions[900].nodes[0].host_name,
            nm.derp_map.regions[900].nodes[0].derp_port) == ("ctl.example.com", 8080)
    assert nm.magicdns_suffix == "tail1.ts.net"
    assert nm.resolve("alpha") == [ipaddress.ip_address("100.64.0.2"),
                                   ipaddress.ip_address("fd7a:115c:a1e0::2")]
    assert nm.resolve("ALPHA.tail1.ts.net.")[0] == ipaddress.ip_address("100.64.0.2")
    assert nm.resolve("self")[0] == ipaddress.ip_address("100.64.0.1")
    assert nm.resolve("db.tail1.ts.net") == [ipaddress.ip_address("100.64.0.3")]
    assert nm.resolve("bad") == []
    assert nm.split_dns_routes() == {"corp.example": ["100.64.0.3"]}
    assert nm.dns.resolvers == ["1.1.1.1"] and nm.dns.proxied
    assert nm.packet_filter.match("100.64.0.2", "100.64.0.1", 6, 22)
    assert not nm.packet_filter.match("100.64.0.3", "100.64.0.1", 6, 22)
    assert nm.user_profiles[1]["LoginName"] == "t@example.com"


def test_first_message_must_have_node():
    s = MapSession()
    assert s.apply(decode({"KeepAlive": True}), NOW) is None      # keep-alives may precede
    bad = dict(FULL)
    del bad["Node"]
    with pytest.raises(RemoteProtocolError, match="lacked Node"):
        s.apply(decode(bad), NOW)


def test_peers_full_replace_ignores_deltas(session):
    s, _ = session
    nm = s.apply(decode({"Peers": [node(4, "gamma", 4)], "PeersRemoved": [4],
                         "PeersChanged": [node(5, "delta", 5)]}), NOW)
    assert sorted(nm.peers) == [4]
    # empty Peers is "unchanged"
    nm = s.apply(decode({"Peers": []}), NOW)
    assert sorted(nm.peers) == [4]


def test_peers_changed_removed_and_diff(session):
    s, nm0 = session
    moved = node(3, "beta", 3, AllowedIPs=["100.64.0.3/32", "10.0.0.0/24"])
    nm = s.apply(decode({"PeersChanged": [node(4, "gamma", 4), moved], "PeersRemoved": [2]}),
                 NOW)
    assert sorted(nm.peers) == [3, 4]
    assert [str(p) for p in nm.peers[3].allowed_ips] == ["100.64.0.3/32", "10.0.0.0/24"]
    d = diff_peers(nm0, nm)
    assert [n.id for n in d.added] == [4] and [n.id for n in d.changed] == [3]
    assert d.removed == [K[2]]
    assert diff_peers(nm, nm).added == [] and diff_peers(nm, nm).changed == []
    assert diff_peers(None, nm).removed == [] and len(diff_peers(None, nm).added) == 2


def test_patch_online_seen(session):
    s, _ = session
    nm = s.apply(decode({
        "PeersChangedPatch": [{"NodeID": 2, "DERPRegion": 901, "Endpoints": ["192.0.2.1:1"],
                               "DiscoKey": D[6].text(), "Online": True},
                              {"NodeID": 99, "DERPRegion": 5}],
        "OnlineChange": {"3": True},
        "PeerSeenChange": {"2": True, "3": False}}), NOW + 10)
    p2, p3 = nm.peers[2], nm.peers[3]
    assert (p2.home_derp, p2.endpoints, p2.disco_key, p2.online) == \
        (901, [("192.0.2.1", 1)], D[6], True)
    assert p3.online is True and p3.last_seen is None
    assert p2.last_seen == pytest.approx(NOW + 10)
    assert 99 not in nm.peers
    # patch applies after OnlineChange in the same message
    nm = s.apply(decode({"OnlineChange": {"2": True},
                         "PeersChangedPatch": [{"NodeID": 2, "Online": False}]}), NOW)
    assert nm.peers[2].online is False


def test_expired_and_unreachable_peers_dropped_from_wireguard(session):
    s, _ = session
    nm = s.apply(decode({"PeersChanged": [
        node(2, "alpha", 2, KeyExpiry="2025-10-09T08:53:19Z"),          # 1 s before ControlTime
        node(4, "nodisco", 4, DiscoKey=None, HomeDERP=0),
        node(5, "legacy", 5, HomeDERP=0, DERP="127.3.3.40:902", DiscoKey=None)]}), NOW)
    assert nm.peers[2].expired and nm.peers[2].endpoints == []
    assert set(nm.wireguard_peers()) == {K[3], K[5]}
    assert nm.peers[5].home_derp == 902
    assert nm.resolve("alpha") == []                    # expired peers leave MagicDNS too
    # clock skew: expiry is judged on control time, not the local clock
    s2 = MapSession()
    full = dict(FULL, Peers=[node(2, "a", 2, KeyExpiry="2025-10-09T09:00:00Z")])
    nm2 = s2.apply(decode(full), NOW + 3600)             # local clock 1 h ahead
    assert not nm2.peers[2].expired


def test_patch_renews_an_expired_peer_with_a_new_key(session):
    """Key renewal as a patch: new Key plus KeyExpiry back to the zero time ("never")."""
    s, _ = session
    nm = s.apply(decode({"PeersChangedPatch": [
        {"NodeID": 2, "KeyExpiry": "2025-10-09T08:53:19Z"}]}), NOW)
    assert nm.peers[2].expired and K[2] not in nm.wireguard_peers()
    nm = s.apply(decode({"PeersChangedPatch": [
        {"NodeID": 2, "Key": K[6].text(), "KeyExpiry": "0001-01-01T00:00:00Z"}]}), NOW)
    assert not nm.peers[2].expired and nm.peers[2].key == K[6]
    assert K[6] in nm.wireguard_peers() and nm.resolve("alpha")
    nm = s.apply(decode({"PeersChangedPatch": [{"NodeID": 2, "Online": True}]}), NOW)
    assert not nm.peers[2].expired                      # absent KeyExpiry: unchanged


def test_derp_dns_filter_deltas(session):
    s, _ = session
    nm = s.apply(decode({"DERPMap": {"HomeParams": {"RegionScore": {"900": 0.5}}}}), NOW)
    assert 900 in nm.derp_map.regions and nm.derp_map.home_params
    nm = s.apply(decode({"DERPMap": {"Regions": {"901": {"RegionID": 901, "Nodes": []},
                                                 "900": None}}}), NOW)
    assert list(nm.derp_map.regions) == [901]
    nm = s.apply(decode({"PacketFilters": {"zz": [{"SrcIPs": ["*"], "DstPorts": [
        {"IP": "100.64.0.1", "Ports": {"First": 80, "Last": 80}}]}]}}), NOW)
    assert nm.packet_filter.match("1.2.3.4", "100.64.0.1", 6, 80)
    assert nm.packet_filter.match("100.64.0.2", "100.64.0.1", 6, 22)        # base kept
    nm = s.apply(decode({"PacketFilters": {"*": None, "x": [{"SrcIPs": ["*"], "DstPorts": [
        {"IP": "*", "Ports": {"First": 443, "Last": 443}}]}]}}), NOW)
    assert not nm.packet_filter.match("100.64.0.2", "100.64.0.1", 6, 22)
    assert nm.packet_filter.match("100.64.0.2", "100.64.0.1", 17, 443)
    nm = s.apply(decode({"PacketFilter": []}), NOW)
    assert nm.filter_rules[0]["DstPorts"][0]["Ports"]["First"] == 443      # x kept, base empty
    nm = s.apply(decode({"DNSConfig": {"Routes": {"a.example": None}}, "Domain": ""}), NOW)
    assert nm.split_dns_routes() == {"a.example": []} and nm.domain == "tail1.ts.net"


@pytest.mark.parametrize("bad", [
    {"Node": {"ID": 0}},
    {"Node": dict(node(1, "s", 1), Key="nodekey:xyz")},
    {"Node": dict(node(1, "s", 1), Addresses=["999.1.1.1/32"])},
    {"Node": dict(node(1, "s", 1), KeyExpiry="yesterday")},
    {"Node": node(1, "s", 1), "Peers": [dict(node(2, "p", 2), Endpoints=["1.2.3.4"])]},
    {"Node": node(1, "s", 1), "PeersRemoved": "2"},
    {"Node": node(1, "s", 1), "PeersChangedPatch": [{"DERPRegion": 1}]},
    {"Node": node(1, "s", 1), "OnlineChange": {"x": True}},
    {"Node": node(1, "s", 1), "DERPMap": {"Regions": {"abc": {}}}},
    {"Node": node(1, "s", 1), "PacketFilter": ["rule"]},
])
def test_malformed_messages_rejected_without_changing_state(session, bad):
    s, nm_before = session
    with pytest.raises(RemoteProtocolError):
        s.apply(decode(bad), NOW)
    assert sorted(s.netmap(NOW).peers) == sorted(nm_before.peers)
    assert s.self_node.key == K[1]


def test_packet_filter_matcher():
    f = PacketFilter([
        {"SrcIPs": ["100.64.0.0/24", "10.0.0.5-10.0.0.9", "cap:foo", "garbage"],
         "DstPorts": [{"IP": "100.64.0.1", "Ports": {"First": 1000, "Last": 2000}},
                      {"IP": "fd7a:115c:a1e0::/48", "Ports": {"First": 53, "Last": 53}}],
         "IPProto": [6]},
        {"SrcIPs": ["*"], "DstPorts": [{"IP": "100.64.0.1", "Ports": {"First": 0, "Last": 0}}]},
        {"SrcIPs": ["100.64.0.9"], "DstPorts": [{"IP": "100.64.0.1", "Bits": 24,
                                                "Ports": {"First": 7, "Last": 7}}],
         "IPProto": [17]},
        "not a rule",
    ])
    assert f.counters["filter_bad_entries"] == 2 and len(f) == 3
    assert f.match("100.64.0.77", "100.64.0.1", 6, 1500)
    assert not f.match("100.64.0.77", "100.64.0.1", 17, 1500)          # proto limited
    assert not f.match("100.64.0.77", "100.64.0.1", 6, 2001)
    assert not f.match("100.64.1.77", "100.64.0.1", 6, 1500)
    assert f.match("10.0.0.7", "100.64.0.1", 6, 1000)
    assert not f.match("10.0.0.10", "100.64.0.1", 6, 1000)
    assert not f.match("fd7a:115c:a1e0::77", "fd7a:115c:a1e0::1", 6, 53)  # src not listed
    assert f.match("8.8.8.8", "100.64.0.1", 1)                          # ICMP: no ports
    assert not f.match("8.8.8.8", "100.64.0.2", 1)
    assert f.match("100.64.0.9", "100.64.0.200", 17, 7)                 # Bits widens IP
    assert not PacketFilter([]).match("1.1.1.1", "100.64.0.1", 6, 80)


def test_register_and_map_request_shapes():
    node_key, old = K[1], K[2]
    hi = msg.hostinfo("myhost", tags=["tag:a"], preferred_derp=900)
    body = json.loads(msg.build_register_request(node_key=node_key, old_node_key=None,
                                                 hostinfo=hi, auth_key="tskey-secret",
                                                 ephemeral=True))
    assert body["Version"] == msg.CAPABILITY_VERSION and body["NodeKey"] == node_key.text()
    assert body["OldNodeKey"] == "nodekey:" + "0" * 64
    assert body["Auth"] == {"AuthKey": "tskey-secret"} and body["Ephemeral"] is True
    assert body["Expiry"] == "0001-01-01T00:00:00Z"
    assert body["Hostinfo"]["RequestTags"] == ["tag:a"]
    assert body["Hostinfo"]["NetInfo"]["PreferredDERP"] == 900
    out = json.loads(msg.build_register_request(node_key=node_key, old_node_key=old, hostinfo=hi,
                                                expiry=msg.LOGOUT_EXPIRY))
    assert out["OldNodeKey"] == old.text() and "Auth" not in out
    assert msg.parse_time(out["Expiry"]) == 123
    mr = json.loads(msg.build_map_request(node_key=node_key, disco_key=D[1], hostinfo=hi,
                                          endpoints=[("192.0.2.1", 41641, 2), ("::1", 5, 1)],
                                          stream=False))
    assert mr["Compress"] == "zstd" and mr["Stream"] is False and mr["OmitPeers"] is True
    assert mr["Endpoints"] == ["192.0.2.1:41641", "[::1]:5"] and mr["EndpointTypes"] == [2, 1]
    assert mr["DiscoKey"] == D[1].text()
    rr = msg.parse_register_response(json.dumps(
        {"User": {"ID": 3}, "Login": {"LoginName": "u@x"}, "MachineAuthorized": True,
         "AuthURL": "", "NodeKeyExpired": False}).encode())
    assert rr.machine_authorized and rr.user_id == 3 and rr.login_name == "u@x"
    with pytest.raises(RemoteProtocolError):
        msg.parse_register_response(b"<html>")
