"""Netmap shapes of the test control server's Headscale profile (registry + mapper, no
sockets): both DERP forms, its self CapMap, a new disco key as a full node rather than a
patch, endpoints still patched, `Ephemeral` and OldNodeKey ignored."""

from __future__ import annotations

from tsproxy.testing.control import headscale
from tsproxy.testing.control.mapper import StreamView, node_json
from tsproxy.testing.control.registry import Registry

NOW = 1_760_000_000.0


def hs_registry() -> Registry:
    reg = Registry()
    reg.headscale = True
    reg.renew_expired = False
    reg.honour_old_node_key = False
    reg.request_ephemeral = False
    return reg


def key(i: int) -> str:
    return "nodekey:" + f"{i:02x}" * 32


def register(reg, i, **extra):
    ak = reg.create_auth_key(reusable=True)
    res = reg.register({"NodeKey": key(i), "Auth": {"AuthKey": ak.key},
                        "Hostinfo": {"Hostname": f"n{i}"}, **extra}, f"mkey:{i:064x}", NOW)
    assert res.body.get("MachineAuthorized"), res.body
    n = reg.by_node_key(key(i))
    reg.set_online(n, True, NOW)
    return n


def test_both_derp_forms_and_the_self_capmap():
    reg = hs_registry()
    a = register(reg, 1)
    reg.update_from_map_request(a, {"Hostinfo": {"Hostname": "n1",
                                                 "NetInfo": {"PreferredDERP": 999}}})
    j = node_json(a, reg)
    assert j["HomeDERP"] == 999 and j["DERP"] == "127.3.3.40:999"
    me = node_json(a, reg, self_view=True)
    assert set(me["CapMap"]) == {"https://tailscale.com/cap/is-admin",
                                 "https://tailscale.com/cap/ssh"}


def test_new_disco_key_is_a_full_node_endpoints_a_patch():
    reg = hs_registry()
    a, b = register(reg, 1), register(reg, 2)
    view = StreamView(b.id)
    view.full(reg, derp_map={}, packet_filter=[], dns={}, now=NOW)
    reg.update_from_map_request(a, {"DiscoKey": "discokey:" + "ab" * 32})
    d = view.delta(reg, derp_map={}, packet_filter=[], dns={}, now=NOW)
    assert [p["ID"] for p in d["PeersChanged"]] == [a.id] and "PeersChangedPatch" not in d
    reg.update_from_map_request(a, {"Endpoints": ["192.0.2.1:41641"]})
    d = view.delta(reg, derp_map={}, packet_filter=[], dns={}, now=NOW)
    assert d["PeersChangedPatch"] == [{"NodeID": a.id, "Endpoints": ["192.0.2.1:41641"]}]


def test_ephemeral_request_and_old_node_key_are_ignored():
    reg = hs_registry()
    a = register(reg, 1, Ephemeral=True)
    assert not a.ephemeral                       # only the auth key makes a node ephemeral
    reg.expire_node(a.id, NOW)
    res = reg.register({"NodeKey": key(9), "OldNodeKey": key(1),
                        "Hostinfo": {"Hostname": "n1"}}, f"mkey:{1:064x}", NOW + 1)
    assert res.body.get("AuthURL")               # a fresh login, not a re-key
    assert reg.by_node_key(key(9)) is None


def test_embedded_region_styles():
    r = headscale.embedded_region(host="10.0.0.1", port=8443, stun_port=3478, style="headscale")
    n = r["Nodes"][0]
    assert (r["RegionID"], r["RegionCode"]) == (999, "headscale")
    assert (n["HostName"], n["DERPPort"], n["IPv4"], n["STUNPort"]) == ("headscale", 0, "", 3478)
    n = headscale.embedded_region(host="10.0.0.1", port=8443, stun_port=None,
                                  style="server_url")["Nodes"][0]
    assert (n["HostName"], n["DERPPort"], n["STUNPort"]) == ("10.0.0.1", 8443, -1)
