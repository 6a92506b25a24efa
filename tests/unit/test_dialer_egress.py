"""The dialer never sends a tailnet name or address through the host (issue 12 item 2), and
`--non-tailnet refuse` refuses everything else, TCP and UDP, without resolving anything.
The host's resolver and connect are replaced by functions that fail the test if called."""

import asyncio

import pytest

from tsproxy.errors import HostUnreachable, NotAllowed
from tsproxy.proxy.aio import dialer as dialer_mod
from tsproxy.proxy.aio.dialer import Dialer


class FakeNetstack:
    def __init__(self):
        self.dialed = []

    async def open_connection(self, ip, port, *, timeout):
        self.dialed.append((ip, port))
        return "reader", "writer"


@pytest.fixture
async def no_host(monkeypatch):
    """Any host lookup or host connect fails the test."""
    calls = []

    async def host_connect(host, port, **kw):
        calls.append(("connect", host, port))
        raise AssertionError(f"host connect to {host}:{port}")

    async def host_getaddrinfo(self, host, *a, **kw):
        calls.append(("getaddrinfo", host))
        raise AssertionError(f"host lookup of {host}")

    monkeypatch.setattr(dialer_mod.asyncio, "open_connection", host_connect)
    monkeypatch.setattr(type(asyncio.get_running_loop()), "getaddrinfo", host_getaddrinfo)
    return calls


def tailnet_dialer(policy="direct", resolver=None, route_domains=()):
    return Dialer(FakeNetstack(), names={"peer": ["100.64.0.2"]},
                  tunnel_prefixes=["100.64.0.1/32", "100.64.0.2/32", "fd7a:115c:a1e0::2/128"],
                  policy=policy, dns_suffixes=["tailnet.test"], resolver=resolver,
                  route_domains=route_domains, tailnet_ranges=True)


@pytest.mark.parametrize("host,shown", [
    ("nosuch.tailnet.test", "nosuch.tailnet.test"), ("NoSuch.Tailnet.Test.", "nosuch.tailnet.test"),
    ("tailnet.test", "tailnet.test"), ("100.64.0.99", "100.64.0.99"),
    ("100.127.255.254", "100.127.255.254"), ("fd7a:115c:a1e0::99", "fd7a:115c:a1e0::99"),
    ("[fd7a:115c:a1e0::99]", "fd7a:115c:a1e0::99")])
@pytest.mark.parametrize("policy", ["direct", "refuse", "exit-node"])
async def test_tailnet_name_or_address_without_node_is_host_unreachable(no_host, host, shown, policy):
    d = tailnet_dialer(policy)
    with pytest.raises(HostUnreachable) as e:
        await d.open_connection(host, 80)
    assert str(e.value) == f"{shown}: no such node on the tailnet"
    assert no_host == [] and d.netstack.dialed == []
    assert d.counters["dial_no_such_node"] == 1
    assert d.counters["dial_direct"] == 0 and d.counters["host_resolve"] == 0


async def test_known_node_still_dials_through_the_tunnel(no_host):
    d = tailnet_dialer()
    for host in ("peer", "peer.tailnet.test", "100.64.0.2"):
        assert await d.open_connection(host, 80) == ("reader", "writer")
    assert d.netstack.dialed == [("100.64.0.2", 80)] * 3 and no_host == []


async def test_wireguard_mode_leaves_cgnat_addresses_to_the_policy(no_host):
    """Plain WireGuard mode: 100.64.x outside the AllowedIPs is not the tailnet's to claim."""
    d = Dialer(FakeNetstack(), tunnel_prefixes=["10.0.0.0/24"], policy="refuse")
    with pytest.raises(NotAllowed):
        await d.open_connection("100.64.0.99", 80)
    assert d.counters["dial_refused_policy"] == 1 and d.counters["dial_no_such_node"] == 0


async def test_split_dns_route_without_answer_never_reaches_the_host(no_host):
    asked = []

    async def resolver(name):
        asked.append(name)
        if name.endswith(".corp.test"):
            return []                         # NXDOMAIN from the route's resolver
        raise HostUnreachable(f"{name}: no split-DNS route")

    d = tailnet_dialer("direct", resolver, route_domains=["corp.test"])
    with pytest.raises(HostUnreachable) as e:
        await d.open_connection("nosuch.corp.test", 80)
    assert "split-DNS resolvers for corp.test have no address" in str(e.value)
    assert asked == ["nosuch.corp.test"] and no_host == []


async def test_split_dns_answer_outside_the_tunnel_is_dialed_as_that_address(monkeypatch):
    """The route's resolver answered 127.0.0.1: dial that literal, never ask the host again."""
    async def resolver(name):
        return ["127.0.0.1"]

    dialed = []

    async def host_connect(host, port, **kw):
        dialed.append(host)
        return "r", "w"

    monkeypatch.setattr(dialer_mod.asyncio, "open_connection", host_connect)
    d = tailnet_dialer("direct", resolver, route_domains=["corp.test"])
    assert await d.open_connection("db.corp.test", 80) == ("r", "w")
    assert dialed == ["127.0.0.1"]
    assert d.counters["dial_direct"] == 1 and d.counters["host_resolve"] == 0


@pytest.mark.parametrize("host", ["example.com", "203.0.113.7", "2001:db8::7"])
async def test_refuse_refuses_tcp_without_any_lookup(no_host, host):
    d = tailnet_dialer("refuse")
    with pytest.raises(NotAllowed) as e:
        await d.open_connection(host, 443)
    assert "--non-tailnet is refuse" in str(e.value)
    assert no_host == [] and d.counters["dial_refused_policy"] == 1


@pytest.mark.parametrize("host", ["example.com", "203.0.113.7"])
async def test_refuse_refuses_udp_without_any_lookup(no_host, host):
    d = tailnet_dialer("refuse")
    relay = await d.open_udp()
    try:
        with pytest.raises(NotAllowed) as e:
            await relay.sendto(b"x", host, 53)
        assert "--non-tailnet is refuse" in str(e.value)
    finally:
        relay.close()
    assert no_host == [] and relay._direct is None
    assert d.counters["dial_refused_policy"] == 1 and d.counters["dial_direct"] == 0


async def test_udp_to_a_tailnet_address_without_node_is_host_unreachable(no_host):
    relay = await tailnet_dialer("direct").open_udp()
    try:
        with pytest.raises(HostUnreachable):
            await relay.sendto(b"x", "100.64.0.99", 53)
    finally:
        relay.close()
    assert no_host == [] and relay._direct is None


async def test_direct_counts_host_lookups_and_dials(monkeypatch):
    dialed = []

    async def host_connect(host, port, **kw):
        dialed.append(host)
        return "r", "w"

    monkeypatch.setattr(dialer_mod.asyncio, "open_connection", host_connect)
    d = Dialer(FakeNetstack(), policy="direct")
    await d.open_connection("127.0.0.1", 80)
    assert d.counters["dial_direct"] == 1 and d.counters["host_resolve"] == 0
    await d.open_connection("localhost", 80)
    assert d.counters["dial_direct"] == 2 and d.counters["host_resolve"] == 1
    assert dialed == ["127.0.0.1", "localhost"]
