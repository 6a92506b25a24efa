"""The test control server's routes, exit nodes, primary routes, capabilities and Hostinfo
services, on the registry and the netmap builder (no sockets): advertise in
Hostinfo.RoutableIPs, approve (hook or auto-approve), one primary per subnet with failover."""

from __future__ import annotations

from tsproxy.control import messages as msg
from tsproxy.testing.control.mapper import StreamView, node_json
from tsproxy.testing.control.registry import Registry

NOW = 1_760_000_000.0
EXIT = ["0.0.0.0/0", "::/0"]
SUBNET = "198.51.100.0/24"


def key(i: int) -> str:
    return "nodekey:" + f"{i:02x}" * 32


def register(reg: Registry, i: int, hostinfo: dict | None = None):
    ak = reg.create_auth_key(reusable=True)
    hi = {"Hostname": f"n{i}", **(hostinfo or {})}
    res = reg.register({"NodeKey": key(i), "Auth": {"AuthKey": ak.key}, "Hostinfo": hi},
                       f"mkey:{i:064x}", NOW)
    assert res.body["MachineAuthorized"], res.body
    n = reg.by_node_key(key(i))
    reg.set_online(n, True, NOW)
    return n


def advertise(reg: Registry, n, routes):
    return reg.update_from_map_request(n, {"Hostinfo": {"Hostname": n.hostname,
                                                        "RoutableIPs": list(routes)}})


def allowed(reg, n) -> list[str]:
    return node_json(n, reg)["AllowedIPs"]


def test_advertised_routes_wait_for_approval():
    reg = Registry()
    a = register(reg, 1)
    assert advertise(reg, a, [SUBNET, *EXIT])          # Hostinfo change: peers are told
    assert allowed(reg, a) == [f"{a.ipv4}/32", f"{a.ipv6}/128"]
    assert "PrimaryRoutes" not in node_json(a, reg)
    # peers see what it advertises in its Hostinfo all the same
    assert node_json(a, reg)["Hostinfo"]["RoutableIPs"] == [SUBNET, *EXIT]
    reg.approve_routes(a.id, [SUBNET])
    assert allowed(reg, a)[2:] == [SUBNET]
    assert node_json(a, reg)["PrimaryRoutes"] == [SUBNET]
    assert not a.is_exit_node()
    reg.approve_routes(a.id, [SUBNET, "::/0"])          # one half approves the exit node
    assert a.is_exit_node()
    assert allowed(reg, a)[2:] == [SUBNET, *EXIT]
    assert node_json(a, reg)["PrimaryRoutes"] == [SUBNET]       # /0s are never primary


def test_approval_without_advertisement_does_nothing_and_a_withdrawn_route_goes():
    reg = Registry()
    a = register(reg, 1)
    reg.approve_routes(a.id, [SUBNET, *EXIT])
    assert allowed(reg, a)[2:] == []
    advertise(reg, a, [SUBNET])
    assert allowed(reg, a)[2:] == [SUBNET]
    advertise(reg, a, [])
    assert allowed(reg, a)[2:] == [] and reg.primaries == {}


def test_half_an_exit_node_is_no_exit_node():
    reg = Registry()
    a = register(reg, 1)
    advertise(reg, a, ["0.0.0.0/0"])
    reg.approve_routes(a.id, EXIT)
    assert not a.is_exit_node() and allowed(reg, a)[2:] == []


def test_auto_approve_all_and_by_prefix():
    reg = Registry()
    reg.auto_approve_routes = True
    a = register(reg, 1, {"RoutableIPs": [SUBNET, *EXIT]})       # at registration
    assert a.is_exit_node() and allowed(reg, a)[2:] == [SUBNET, *EXIT]

    reg = Registry()
    reg.auto_approve_routes = ["198.51.0.0/16", "0.0.0.0/0"]      # a /0: exit nodes only
    b = register(reg, 1)
    advertise(reg, b, [SUBNET, "203.0.113.0/24", *EXIT])        # later, in a map request
    assert allowed(reg, b)[2:] == [SUBNET, *EXIT]
    assert b.is_exit_node()


def test_one_primary_per_subnet_and_failover_when_it_goes_offline():
    reg = Registry()
    reg.auto_approve_routes = True
    a = register(reg, 1, {"RoutableIPs": [SUBNET]})
    b = register(reg, 2, {"RoutableIPs": [SUBNET, "192.0.2.0/24"]})
    c = register(reg, 3)
    assert reg.primaries == {SUBNET: a.id, "192.0.2.0/24": b.id}
    assert node_json(a, reg)["PrimaryRoutes"] == [SUBNET]
    assert node_json(b, reg)["PrimaryRoutes"] == ["192.0.2.0/24"]
    assert SUBNET not in allowed(reg, b)                 # a secondary does not carry it

    view = StreamView(c.id)
    full = view.full(reg, derp_map={}, packet_filter=[], dns={}, now=NOW)
    peers = {p["ID"]: p for p in full["Peers"]}
    assert SUBNET in peers[a.id]["AllowedIPs"] and SUBNET not in peers[b.id]["AllowedIPs"]

    reg.set_online(a, False, NOW + 5)                    # the primary goes away: b takes over
    assert reg.primaries[SUBNET] == b.id
    d = view.delta(reg, derp_map={}, packet_filter=[], dns={}, now=NOW + 5)
    changed = {p["ID"]: p for p in d["PeersChanged"]}
    assert SUBNET in changed[b.id]["PrimaryRoutes"] and SUBNET in changed[b.id]["AllowedIPs"]
    assert SUBNET not in changed[a.id]["AllowedIPs"] and "PrimaryRoutes" not in changed[a.id]

    reg.set_online(a, True, NOW + 9)                     # back: b keeps it (no flapping)
    assert reg.primaries[SUBNET] == b.id
    # the client parses what it gets
    n = msg.parse_node(node_json(b, reg))
    assert [str(p) for p in n.primary_routes] == [SUBNET, "192.0.2.0/24"]


def test_forced_routes_still_work_without_advertisement():
    reg = Registry()
    a = register(reg, 1)
    reg.set_routes(a.id, EXIT)
    assert a.is_exit_node() and allowed(reg, a)[2:] == EXIT


def test_capabilities_and_attributes_self_and_peer_views():
    reg = Registry()
    a = register(reg, 1)
    a.attrs["only-tcp-443"] = None
    a.peer_caps["https://example.test/cap/peer"] = [{"x": 1}]
    a.capabilities = ["legacy-cap"]
    me = node_json(a, reg, self_view=True)
    assert me["CapMap"] == {"https://tailscale.com/cap/is-admin": None, "only-tcp-443": None}
    peer = node_json(a, reg)
    assert peer["CapMap"] == {"https://example.test/cap/peer": [{"x": 1}]}
    assert peer["Capabilities"] == ["legacy-cap"]
    n = msg.parse_node(peer)
    assert set(n.cap_map) == {"https://example.test/cap/peer", "legacy-cap"}


def test_hostinfo_services_pass_through_to_peers_with_peerapi_ports():
    reg = Registry()
    a = register(reg, 1)
    b = register(reg, 2)
    view = StreamView(b.id)
    view.full(reg, derp_map={}, packet_filter=[], dns={}, now=NOW)
    services = [{"Proto": "peerapi4", "Port": 41641}, {"Proto": "peerapi6", "Port": 41642},
                {"Proto": "peerapi-dns-proxy", "Port": 1}, {"Proto": "tcp", "Port": "bad"}]
    assert reg.update_from_map_request(a, {"Hostinfo": {"Hostname": "n1", "Services": services}})
    d = view.delta(reg, derp_map={}, packet_filter=[], dns={}, now=NOW)
    (p,) = d["PeersChanged"]
    assert p["Hostinfo"]["Services"] == services
    n = msg.parse_node(p)
    assert n.peerapi_port() == 41641 and n.peerapi_port(ipv6=True) == 41642
    assert ("peerapi-dns-proxy", 1) in n.services and len(n.services) == 3
    # NetInfo alone changing is not news for peers
    assert not reg.update_from_map_request(
        a, {"Hostinfo": {"Hostname": "n1", "Services": services,
                         "NetInfo": {"DERPLatency": {"900-v4": 0.01}}}})
