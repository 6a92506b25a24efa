"""control.routing.RouteTable: one decision for the dialer, WireGuard, the PAC file and status
(issue #13 items 1-3): longest prefix, PrimaryRoutes for shared subnets, the exit node's /0
only when selected and usable, fail closed otherwise, DNS through the exit node's peer API."""

from __future__ import annotations

import ipaddress

import pytest

from tsproxy.control import messages as msg
from tsproxy.control.dataplane import apply_peer_diff, apply_routes
from tsproxy.control.netmap import MapSession, diff_peers
from tsproxy.control.routing import RouteTable, assign_routes, find_exit_node
from tsproxy.errors import HostUnreachable, NotAllowed
from tsproxy.keys import DiscoPrivate, NodePrivate
from tsproxy.proxy.aio.dialer import Dialer
from tsproxy.proxy.pac import PacConfig
from tsproxy.wg.device import WgDevice

NOW = 1_760_000_000.0
K = [NodePrivate(bytes([i]) * 32).public() for i in range(1, 8)]
D = DiscoPrivate(bytes([77]) * 32).public()
EXIT = ["0.0.0.0/0", "::/0"]
SUBNET = "198.51.100.0/24"


def node(i, routes=(), primary=None, online=True, peerapi=None, **kw):
    addrs = [f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"]
    n = {"ID": i, "StableID": f"s{i}", "Name": f"n{i}.tailnet.test.", "Key": K[i].text(),
         "DiscoKey": D.text(), "Addresses": addrs, "AllowedIPs": addrs + list(routes),
         "HomeDERP": 1, "MachineAuthorized": True, "Online": online,
         "Hostinfo": {"Hostname": f"host{i}"}}
    if primary is not None:
        n["PrimaryRoutes"] = primary
    if peerapi:
        n["Hostinfo"]["Services"] = [{"Proto": "peerapi4", "Port": peerapi},
                                     {"Proto": "peerapi6", "Port": peerapi},
                                     {"Proto": "tcp", "Port": 22}]
    n.update(kw)
    return n


def netmap(*peers):
    return MapSession().apply(msg.parse_map_response({"Node": node(1), "Peers": list(peers)}), NOW)


def table(nm, exit_node=None, **kw):
    return RouteTable.from_netmap(nm, exit_node=find_exit_node(nm, exit_node), **kw)


def ip(s):
    return ipaddress.ip_address(s)


# -- prefixes --------------------------------------------------------------------------------------

def test_subnets_need_accept_routes_and_the_longest_prefix_wins():
    nm = netmap(node(2, ["10.0.0.0/16"]), node(3, ["10.0.5.0/24"]), node(4))
    off = table(nm)
    assert off.decide("10.0.5.1").kind == "direct"             # not accepted: the policy
    t = table(nm, accept_routes=True)
    assert (t.decide("10.0.5.1").kind, t.decide("10.0.5.1").peer) == ("subnet", "n3")
    assert (t.decide("10.0.9.1").kind, t.decide("10.0.9.1").peer) == ("subnet", "n2")
    assert (t.decide("100.64.0.4").kind, t.decide("100.64.0.4").peer) == ("tailnet", "n4")
    assert t.decide("100.64.0.99").kind == "refuse"             # tailnet range, no node
    assert t.status()["subnets"] == ["10.0.0.0/16 via n2", "10.0.5.0/24 via n3"]


def test_a_subnet_two_peers_advertise_belongs_to_the_primary_router():
    nm = netmap(node(2, [SUBNET], primary=[]), node(3, [SUBNET], primary=[SUBNET]))
    routes = assign_routes(nm, accept_routes=True)
    assert SUBNET not in map(str, routes[K[2]])
    assert SUBNET in map(str, routes[K[3]])
    assert table(nm, accept_routes=True).decide("198.51.100.7").peer == "n3"
    # nobody primary: the lowest node ID, once (WireGuard cannot give one prefix to two peers)
    nm = netmap(node(3, [SUBNET]), node(2, [SUBNET]))
    routes = assign_routes(nm, accept_routes=True)
    assert [SUBNET in map(str, routes[K[i]]) for i in (2, 3)] == [True, False]


def test_wireguard_follows_the_selection_without_a_new_netmap():
    nm = netmap(node(2, EXIT), node(3, EXIT + [SUBNET]))
    dev = WgDevice(NodePrivate(bytes([99]) * 32), now=NOW)
    apply_peer_diff(dev, diff_peers(None, nm), routes=assign_routes(nm))
    wg = lambda: {p["public_key"]: sorted(p["allowed_ips"]) for p in dev.peer_status()}  # noqa: E731
    assert all("0.0.0.0/0" not in r for r in wg().values())
    assert apply_routes(dev, assign_routes(nm, exit_node=find_exit_node(nm, "n3"),
                                           accept_routes=True)) == 1
    assert "0.0.0.0/0" in wg()[K[3].b64()] and "::/0" in wg()[K[3].b64()]
    assert SUBNET in wg()[K[3].b64()] and "0.0.0.0/0" not in wg()[K[2].b64()]
    assert apply_routes(dev, assign_routes(nm, exit_node=find_exit_node(nm, "100.64.0.2"))) == 2
    assert "0.0.0.0/0" in wg()[K[2].b64()] and wg()[K[3].b64()] == sorted(
        ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"])
    # an unusable exit node gets no /0: the device drops what the dialer would refuse anyway
    nm_off = netmap(node(2, EXIT, online=False))
    assert "0.0.0.0/0" not in map(str, assign_routes(nm_off, exit_node=find_exit_node(nm_off, "n2"))[K[2]])


# -- exit node -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sel", ["n2", "N2.tailnet.test.", "host2", "100.64.0.2", "fd7a:115c:a1e0::2", "s2"])
def test_exit_node_by_name_fqdn_hostname_address_or_stable_id(sel):
    ex = find_exit_node(netmap(node(2, EXIT, peerapi=41641)), sel)
    assert ex.problem is None and ex.name == "n2" and ex.v4 and ex.v6
    assert ex.doh_url == "http://100.64.0.2:41641/dns-query"


@pytest.mark.parametrize("peer,sel,problem", [
    (node(2, EXIT), "nosuch", "exit node 'nosuch' is not in the tailnet"),
    (node(2, EXIT, online=False), "n2", "exit node n2 is offline"),
    (node(2), "n2", "n2 is not an exit node"),
    (node(2, EXIT), "n1", "exit node 'n1' is this node"),
])
def test_unusable_exit_node_fails_closed_for_addresses_and_names(peer, sel, problem):
    t = table(netmap(peer), sel, policy="direct")
    assert problem in t.exit_node.problem
    for host in ("203.0.113.5", "2001:db8::5", "example.com", "10.1.2.3"):
        d = t.decide(host)
        assert d.kind == "refuse" and d.error == "unreachable" and problem in d.reason, (host, d)
    assert t.decide("100.64.0.2").kind == "tailnet"            # the tailnet itself still works
    assert t.decide("n2").kind == "tailnet"


def test_exit_node_carries_outside_addresses_and_resolves_outside_names():
    t = table(netmap(node(2, EXIT, peerapi=5000)), "n2", policy="refuse", split_dns=["corp.test"])
    assert (t.decide("203.0.113.5").kind, t.decide("203.0.113.5").peer) == ("exit", "n2")
    assert t.decide("2001:db8::5").kind == "exit"
    assert t.decide("192.168.1.1").kind == "exit"               # LAN too, unless allowed
    assert t.decide("127.0.0.1").kind == "refuse"               # loopback is never sent to it
    assert t.decide("example.com").kind == "resolve" and t.decide("example.com").via == "exit"
    assert t.decide("db.corp.test").via == "split-dns"          # split DNS first
    assert t.decide("nosuch.tailnet.test").reason.endswith("no such node on the tailnet")
    d = t.after_resolve("example.com", "exit", ["203.0.113.9"])
    assert (d.kind, d.targets) == ("exit", (ip("203.0.113.9"),))
    assert t.after_resolve("example.com", "exit", []).kind == "refuse"
    assert t.after_resolve("x.example", "exit", ["100.64.0.2"]).kind == "tailnet"


def test_allow_lan_access_leaves_lan_addresses_to_the_policy():
    t = table(netmap(node(2, EXIT)), "n2", policy="direct", allow_lan=True)
    assert t.decide("192.168.1.1").kind == "direct" and t.decide("fe80::1").kind == "direct"
    assert t.decide("203.0.113.5").kind == "exit"
    t = table(netmap(node(2, EXIT)), "n2", policy="refuse", allow_lan=True)
    assert t.decide("10.1.1.1").error == "not_allowed"


def test_exit_node_without_peer_api_refuses_names_but_carries_addresses():
    t = table(netmap(node(2, EXIT)), "n2")
    assert t.decide("203.0.113.5").kind == "exit"
    d = t.decide("example.com")
    assert d.kind == "refuse" and "offers no DNS" in d.reason


def test_v4_only_exit_node_refuses_ipv6():
    t = table(netmap(node(2, ["0.0.0.0/0"])), "n2")
    assert t.decide("203.0.113.5").kind == "exit"
    assert "no IPv6 route" in t.decide("2001:db8::1").reason


def test_doh_url_prefers_ipv4_and_needs_a_matching_family():
    n = msg.parse_node(node(2, EXIT, Hostinfo={"Services": [{"Proto": "peerapi6", "Port": 7}]}))
    from tsproxy.control.routing import peerapi_doh_url
    assert peerapi_doh_url(n, [4, 6]) == "http://[fd7a:115c:a1e0::2]:7/dns-query"
    assert peerapi_doh_url(n, [4]) == ""
    bad = msg.parse_node(node(2, Hostinfo={"Services": [{"Proto": "peerapi4", "Port": "x"},
                                                         "junk", {"Proto": "peerapi4", "Port": 70000}]}))
    assert (bad.peerapi_port(), bad.peerapi_port(ipv6=True)) == (0, 0)


# -- the dialer carries the decisions out --------------------------------------------------------

class FakeNetstack:
    def __init__(self):
        self.dialed = []

    async def open_connection(self, ip, port, *, timeout):
        self.dialed.append((ip, port))
        return "r", "w"


@pytest.fixture
def no_host(monkeypatch):
    from tsproxy.proxy.aio import dialer as dialer_mod

    async def host_connect(host, port, **kw):
        raise AssertionError(f"host connect to {host}:{port}")
    monkeypatch.setattr(dialer_mod.asyncio, "open_connection", host_connect)


async def test_dialer_resolves_through_the_exit_node_and_dials_through_the_tunnel(no_host):
    nm = netmap(node(2, EXIT, peerapi=5000))
    d = Dialer(FakeNetstack())
    asked = []

    async def doh(name):
        asked.append(name)
        return [ip("198.51.100.10")] if name == "page.example" else []
    d.resolvers["exit"] = doh
    d.set_table(table(nm, "n2", policy="direct"))
    assert await d.open_connection("page.example", 80) == ("r", "w")
    assert await d.open_connection("198.51.100.10", 443) == ("r", "w")
    assert d.netstack.dialed == [("198.51.100.10", 80), ("198.51.100.10", 443)]
    assert asked == ["page.example"]
    assert d.counters["dial_exit"] == 2 and d.counters["dial_direct"] == 0
    with pytest.raises(HostUnreachable, match="name not found"):
        await d.open_connection("nosuch.example", 80)


async def test_dialer_never_falls_back_to_the_host_when_the_exit_node_dns_fails(no_host):
    d = Dialer(FakeNetstack())

    async def doh(name):
        raise HostUnreachable("no answer within 5 s")
    d.resolvers["exit"] = doh
    d.set_table(table(netmap(node(2, EXIT, peerapi=5000)), "n2", policy="direct"))
    with pytest.raises(HostUnreachable, match="through exit node n2: no answer"):
        await d.open_connection("page.example", 80)
    d.set_table(table(netmap(node(2, EXIT, online=False)), "n2", policy="direct"))
    with pytest.raises(HostUnreachable, match="offline"):
        await d.open_connection("203.0.113.1", 80)
    relay = await d.open_udp()
    try:
        with pytest.raises(HostUnreachable, match="offline"):
            await relay.sendto(b"x", "203.0.113.1", 53)
    finally:
        relay.close()
    assert d.counters["dial_exit_unavailable"] == 2 and d.netstack.dialed == []


async def test_clearing_the_exit_node_returns_to_the_policy(no_host):
    nm = netmap(node(2, EXIT))
    d = Dialer(FakeNetstack())
    d.set_table(table(nm, None, policy="refuse"))
    with pytest.raises(NotAllowed, match="--non-tailnet is refuse"):
        await d.open_connection("203.0.113.1", 80)


# -- PAC -----------------------------------------------------------------------------------------

def test_pac_sends_everything_through_the_proxy_with_an_exit_node():
    nm = netmap(node(2, EXIT + [SUBNET]))
    plain = PacConfig.from_table(table(nm, accept_routes=True)).render("127.0.0.1", 1055)
    assert plain.rstrip().endswith('return "DIRECT";\n}') and '"198.51.100.0", "255.255.255.0"' in plain
    assert 'host == "n2"' in plain and 'dnsDomainIs(host, ".tailnet.test")' in plain
    pac = PacConfig.from_table(table(nm, "n2")).render("127.0.0.1", 1055)
    assert pac.rstrip().endswith("return P;\n}")
    assert 'isInNet(host, "127.0.0.0", "255.0.0.0")) return "DIRECT"' in pac
    assert '"192.168.0.0"' not in pac
    lan = PacConfig.from_table(table(nm, "n2", allow_lan=True)).render("127.0.0.1", 1055)
    assert 'isInNet(host, "192.168.0.0", "255.255.0.0")) return "DIRECT"' in lan
    # an unusable exit node still sends everything to the proxy, which refuses with the reason
    off = PacConfig.from_table(table(nm, "nosuch")).render("127.0.0.1", 1055)
    assert off.rstrip().endswith("return P;\n}")


def test_route_epoch_moves_only_when_routes_change():
    nm = netmap(node(2, EXIT, peerapi=5000))
    d = Dialer(FakeNetstack())
    d.set_table(table(nm, None))
    e = d.route_epoch
    d.set_table(table(nm, None))                                 # a netmap that changed nothing
    assert d.route_epoch == e
    d.set_table(table(nm, "n2"))
    assert d.route_epoch == e + 1
    d.set_table(table(netmap(node(2, EXIT, peerapi=5000, online=False)), "n2"))
    assert d.route_epoch == e + 2


async def test_pooled_upstream_from_other_routes_is_not_reused():
    from tsproxy.proxy.aio.http_server import UpstreamPool

    class W:
        closed = False

        def is_closing(self):
            return self.closed

        def close(self):
            self.closed = True

    class R:
        def at_eof(self):
            return False

    pool = UpstreamPool()
    w = W()
    pool.put(("h", 80), R(), w, bytearray(), 3)
    assert pool.take(("h", 80), 4) is None and w.closed
    pool.put(("h", 80), R(), W(), bytearray(), 4)
    assert pool.take(("h", 80), 4) is not None
