"""DERP as a real fleet behaves (issue 16 defect 4), MagicConn on loopback with test relays:
a region whose first node is down, a DERP map that moves a region at runtime, PeerGone ending a
reply route (else a DERP-only peer in another region is black-holed once idle), the home region
re-chosen from RegionScore, HTTPS latency when STUN is blocked, STUN to a node named by DNS."""

import copy
import socket

import pytest

from tests.integration.test_magicsock import Node, transfer
from tests.waiting import until
from tsproxy.control import messages as msg
from tsproxy.testing.derp_server import TestDerpServer, derp_map

pytestmark = [pytest.mark.timeout(120)]


def dmap(obj: dict) -> msg.DERPMap:
    regions, home_params, _ = msg.parse_derp_map(obj)
    return msg.DERPMap(regions=regions, home_params=home_params)


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                               # nothing listens there: connection refused
    return port


@pytest.fixture
async def servers():
    started = []

    async def make(**kw):
        s = TestDerpServer(tls=True, **kw)
        await s.start()
        started.append(s)
        return s
    nodes = []

    async def node(ip, m):
        n = Node(ip)
        await n.start(m)
        nodes.append(n)
        return n
    yield make, node
    for n in nodes:
        await n.close()
    for s in started:
        await s.stop()


def peer(a: Node, b: Node, nid: int, home: int):
    """Tell a about b (DERP-only: no endpoints), b's home region `home`."""
    nb = b.node(nid)
    nb.home_derp = home
    a.magic.set_peers([nb])
    if nb.key in a.device.peers:
        a.device.update_peer(nb.key, endpoint=a.magic.endpoint_for(nb))
    else:
        a.device.add_peer(nb.key, allowed_ips=nb.allowed_ips, endpoint=a.magic.endpoint_for(nb))


async def test_region_with_first_node_down_uses_the_next(servers):
    make, node = servers
    srv = await make(stun_port=0)
    region = srv.derp_map_region()
    down = dict(region["Nodes"][0], Name="900down", DERPPort=dead_port(), STUNPort=-1)
    region["Nodes"] = [down, dict(region["Nodes"][0], Name="900b")]
    m = dmap({"Regions": {"900": region}})
    a, b = await node("100.64.0.1", m), await node("100.64.0.2", m)
    await until(lambda: a.homes and b.homes, "both have a home region", 20)
    peer(a, b, 2, 900)
    peer(b, a, 1, 900)
    await transfer(a, b, 200_000)
    assert a.magic.derps[900].conn.counters["node_dial_failures"] >= 1
    assert a.magic.derps[900].conn.node_name == "900b"
    assert srv.ideal_nodes and set(srv.ideal_nodes) == {"900down"}


async def test_region_moved_in_the_derp_map_is_followed_on_reconnect(servers):
    make, node = servers
    old = await make(stun_port=0)
    new = await make(stun_port=0)
    m1 = dmap(derp_map(old))
    a, b = await node("100.64.0.1", m1), await node("100.64.0.2", m1)
    await until(lambda: a.homes and b.homes, "both have a home region", 20)
    peer(a, b, 2, 900)
    peer(b, a, 1, 900)
    await transfer(a, b, 100_000)
    m2 = dmap(derp_map(new))                 # same region id 900, now served by `new`
    a.magic.set_derp_map(m2)
    b.magic.set_derp_map(m2)
    await old.stop()                          # the old node goes away: clients reconnect
    await until(lambda: len(new.clients) == 2, "both clients on the new node", 20)
    await transfer(a, b, 100_000)


async def test_peer_gone_ends_the_reply_route_so_an_idle_peer_is_not_black_holed(
        servers, monkeypatch):
    """A homes on 900, B on 901 (each measures only its own region).  A reaches B on 901; B
    replies there.  A's 901 connection idles out; 901 tells B that A is gone, so when B next
    talks to A it dials A's home 900 instead of sending into 901 where A no longer is."""
    import tsproxy.magicsock.aio as magic_mod
    monkeypatch.setattr(magic_mod, "DERP_IDLE_CLOSE", 1.0)
    make, node = servers
    r900, r901 = await make(stun_port=0, region_id=900), await make(stun_port=0, region_id=901)
    full = derp_map(r900, r901)
    for_a, for_b = copy.deepcopy(full), copy.deepcopy(full)
    for_a["Regions"]["901"]["Nodes"][0]["STUNPort"] = -1
    for_b["Regions"]["900"]["Nodes"][0]["STUNPort"] = -1
    a, b = await node("100.64.0.1", dmap(for_a)), await node("100.64.0.2", dmap(for_b))
    await until(lambda: a.homes == [900] and b.homes == [901], "homes 900 / 901", 10)
    peer(a, b, 2, 901)
    peer(b, a, 1, 900)
    await transfer(a, b, 100_000)
    assert 901 in a.magic.derps and 900 not in b.magic.derps
    await until(lambda: 901 not in a.magic.derps, "A's idle 901 connection closed", 15)
    await until(lambda: r901.counters["peer_gone_sent"] >= 1, "901 sends PeerGone(A) to B", 10)
    dropped = r901.counters["packets_dropped"]
    await transfer(b, a, 100_000)             # B -> A now goes through A's home region
    # nothing went into 901, where A no longer is (before the fix B's packets were dropped
    # there until A happened to reopen 901, e.g. for a WireGuard keepalive)
    assert r901.counters["packets_dropped"] == dropped
    assert b.magic.counters.get("derp_route_dropped", 0) >= 1
    assert 900 in b.magic.derps and r900.counters["packets_forwarded"] > 0


async def test_home_region_rechosen_when_the_map_scores_change(servers):
    make, node = servers
    r900, r901 = await make(stun_port=0, region_id=900), await make(stun_port=0, region_id=901)
    base = derp_map(r900, r901)
    base["HomeParams"] = {"RegionScore": {"901": 1000.0}}    # 901 scored far worse
    a = await node("100.64.0.1", dmap(base))
    await until(lambda: a.homes == [900], "home 900", 10)
    await until(lambda: any(c.preferred for c in r900.clients.values()), "900 preferred", 10)
    base["HomeParams"] = {"RegionScore": {"900": 1000.0}}
    a.magic.set_derp_map(dmap(base))
    await until(lambda: a.homes == [900, 901], "home moved to 901", 10)
    await until(lambda: any(c.preferred for c in r901.clients.values()), "901 preferred", 10)
    await until(lambda: not any(c.preferred for c in r900.clients.values()), "900 not", 10)
    assert a.magic.counters["home_changes"] == 2


async def test_https_latency_chooses_home_when_stun_is_blocked(servers):
    make, node = servers
    r900, r901 = await make(stun_port=None, region_id=900), await make(stun_port=None, region_id=901)
    m = derp_map(r900, r901)
    m["HomeParams"] = {"RegionScore": {"900": 1000.0}}
    a = await node("100.64.0.1", dmap(m))
    await until(lambda: a.homes, "a home region", 10)
    assert a.homes == [901]                   # measured over HTTPS, scored: not just "lowest id"
    assert r900.counters["latency_checks"] >= 1 and r901.counters["latency_checks"] >= 1
    assert a.magic.counters["https_latency_probes"] >= 2


async def test_stun_to_a_node_named_only_by_dns(servers):
    make, node = servers
    srv = await make(stun_port=0)
    m = derp_map(srv)
    n0 = m["Regions"]["900"]["Nodes"][0]
    n0["IPv4"], n0["IPv6"], n0["HostName"] = "", "", "localhost"   # Headscale's embedded DERP
    a = await node("100.64.0.1", dmap(m))
    await until(lambda: a.homes == [900], "home 900", 10)
    await until(lambda: srv.counters["stun_requests"] >= 1, "STUN to localhost", 10)
    assert 900 in a.magic.region_latency and a.magic.counters["https_latency_probes"] == 0
    await until(lambda: len(srv.clients) == 1, "DERP to localhost", 10)
