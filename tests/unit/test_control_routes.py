"""Which AllowedIPs a peer gets in WireGuard and routing (Go wgcfg/nmcfg): an exit node's /0
only when it is selected, subnet routes only with accept_routes, own addresses always."""

from __future__ import annotations

import ipaddress

from tsproxy.control import messages as msg
from tsproxy.control.dataplane import apply_peer_diff, peer_routes, tailnet_prefixes
from tsproxy.control.netmap import MapSession, diff_peers
from tsproxy.keys import DiscoPrivate, NodePrivate
from tsproxy.wg.device import WgDevice

NOW = 1_760_000_000.0
K = [NodePrivate(bytes([i]) * 32).public() for i in range(1, 6)]
D = DiscoPrivate(bytes([77]) * 32).public()
EXIT = ["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "0.0.0.0/0", "::/0"]


def node(i, allowed=None, **kw):
    n = {"ID": i, "StableID": f"s{i}", "Name": f"n{i}.t.ts.net.", "Key": K[i].text(),
         "DiscoKey": D.text(), "Addresses": [f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"],
         "HomeDERP": 1, "MachineAuthorized": True}
    if allowed is not None:
        n["AllowedIPs"] = allowed
    n.update(kw)
    return n


def parsed(obj):
    return msg.parse_node(obj)


def strs(nets):
    return [str(n) for n in nets]


def test_exit_node_default_routes_kept_out_unless_selected():
    n = parsed(node(2, EXIT))
    assert strs(peer_routes(n)) == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
    assert strs(peer_routes(n, accept_routes=True)) == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
    assert strs(peer_routes(n, exit_node="s3")) == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
    assert strs(peer_routes(n, exit_node="s2")) == EXIT
    assert strs(peer_routes(n, exit_node=2)) == EXIT
    assert strs(peer_routes(n, exit_node="")) == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]


def test_subnet_routes_need_accept_routes():
    n = parsed(node(3, ["100.64.0.3/32", "10.9.0.0/16", "100.64.0.77/32"]))
    assert strs(peer_routes(n)) == ["100.64.0.3/32"]
    # a single IP that is not one of the node's own addresses is a subnet route too (Go)
    assert strs(peer_routes(n, accept_routes=True)) == ["100.64.0.3/32", "10.9.0.0/16",
                                                         "100.64.0.77/32"]


def test_two_exit_nodes_change_nothing_for_internet_destinations():
    dev = WgDevice(NodePrivate(bytes([99]) * 32), now=NOW)
    s = MapSession()
    nm = s.apply(msg.parse_map_response({"Node": node(1), "Peers": [
        node(2, EXIT), node(3, ["100.64.0.3/32", "fd7a:115c:a1e0::3/128", "0.0.0.0/0", "::/0"])]}),
        NOW)
    apply_peer_diff(dev, diff_peers(None, nm))
    prefixes = tailnet_prefixes(nm)
    assert not any(p.prefixlen == 0 for p in prefixes)
    assert not any(ipaddress.ip_address("192.0.2.1") in p for p in prefixes if p.version == 4)
    for st in dev.peer_status():
        assert "0.0.0.0/0" not in st["allowed_ips"] and "::/0" not in st["allowed_ips"]
    # selecting one exit node routes the internet to it, and only to it
    dev = WgDevice(NodePrivate(bytes([99]) * 32), now=NOW)
    apply_peer_diff(dev, diff_peers(None, nm), exit_node="s3")
    routes = {st["public_key"]: st["allowed_ips"] for st in dev.peer_status()}
    assert "0.0.0.0/0" in routes[K[3].b64()] and "0.0.0.0/0" not in routes[K[2].b64()]
    assert any(p.prefixlen == 0 for p in tailnet_prefixes(nm, exit_node="s3"))
