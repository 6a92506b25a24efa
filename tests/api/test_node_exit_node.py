"""tsproxy.Node(exit_node=...) and set_exit_node()/set_accept_routes() on the loopback test
tailnet, with the control server's set_exit_node/set_routes approving routes (issue #13).

A tsproxy node cannot forward to the internet, so these show the routing side: which peer
WireGuard routes 0.0.0.0/0 and subnets to, what status says, and that every state of an exit
node that cannot carry traffic (not an exit node, cleared, offline) refuses a destination
outside the tailnet with the reason instead of dialing it from the host.  The real exit node
(tailscaled carrying a page) is tests/interop/test_tailscaled_routes.py."""

from __future__ import annotations

import asyncio

import pytest

from tsproxy.errors import HostUnreachable, NotAllowed
from tests.waiting import until

OUTSIDE = "203.0.113.9"          # TEST-NET-3: never dialed (the node's policy is refuse)


def exit_status(node) -> dict:
    return (node.status().get("routing") or {}).get("exit_node") or {}


def wg_routes(node, peer: str) -> list:
    return next((p["routes"] for p in node.status()["peers"] if p["name"] == peer), [])


async def test_exit_node_selection_routes_and_fails_closed(tailnet, tailnet_node):
    b = await tailnet_node("exit-b")
    a = await tailnet_node("exit-a", exit_node="exit-b")
    assert a.exit_node == "exit-b"
    await until(lambda: wg_routes(a, "exit-b"), "exit-b in a's netmap", 30)
    # b offers no /0 yet: the selection is unusable and outside destinations fail with why
    assert "exit-b is not an exit node" in exit_status(a)["problem"]
    with pytest.raises(HostUnreachable, match="is outside the tailnet and exit-b is not an exit node"):
        await a.open_connection(OUTSIDE, 80)
    with pytest.raises(HostUnreachable, match="exit-b is not an exit node"):
        await a.open_connection("example.com", 80)
    b_id = (await asyncio.to_thread(tailnet.node, "exit-b")).id
    await asyncio.to_thread(tailnet.call, tailnet.control.set_exit_node, b_id)
    await until(lambda: exit_status(a).get("usable"), "exit-b usable", 30)
    assert {"0.0.0.0/0", "::/0"} <= set(wg_routes(a, "exit-b"))
    assert exit_status(a)["addresses"] == b.addresses
    # the tailnet itself is unaffected
    async def hello(reader, writer):
        writer.write(b"hi")
        await writer.drain()
        writer.close()
    async with await b.start_server(hello, 7100):
        r, w = await a.open_connection("exit-b", 7100)
        assert await r.read() == b"hi"
        w.close()
    # cleared at runtime: WireGuard drops the /0 at once and the policy (refuse) applies
    st = a.set_exit_node(None)
    assert st["exit_node"] is None and a.exit_node is None
    assert "0.0.0.0/0" not in wg_routes(a, "exit-b")
    with pytest.raises(NotAllowed, match="--non-tailnet is refuse"):
        await a.open_connection(OUTSIDE, 80)
    st = a.set_exit_node(b.addresses[0])                        # by address this time
    assert st["exit_node"]["usable"] and st["exit_node"]["name"] == "exit-b"
    # a subnet route: only with accept_routes, changed at runtime too
    await asyncio.to_thread(tailnet.call, tailnet.control.set_routes, b_id,
                            ["198.51.100.0/24", "0.0.0.0/0", "::/0"])
    await until(lambda: "198.51.100.0/24" in next(p["allowed_ips"] for p in a.status()["peers"]
                                                  if p["name"] == "exit-b"), "subnet in netmap", 30)
    assert "198.51.100.0/24" not in wg_routes(a, "exit-b")
    st = a.set_accept_routes(True)
    assert st["accept_routes"] and st["subnets"] == ["198.51.100.0/24 via exit-b"]
    assert "198.51.100.0/24" in wg_routes(a, "exit-b")
    a.set_accept_routes(False)
    assert "198.51.100.0/24" not in wg_routes(a, "exit-b")
    # the exit node goes away: fail closed with the reason, never the host
    await b.aclose()
    await until(lambda: "offline" in (exit_status(a).get("problem") or ""), "exit-b offline", 30)
    assert "0.0.0.0/0" not in wg_routes(a, "exit-b")
    with pytest.raises(HostUnreachable, match="exit node exit-b is offline"):
        await a.open_connection(OUTSIDE, 80)
    c = a.status()["counters"]
    assert c["dialer.dial_direct"] == 0 and c["dialer.host_resolve"] == 0
    assert c["dialer.dial_exit_unavailable"] >= 3


async def test_bad_exit_node_arguments():
    import tsproxy
    with pytest.raises(TypeError):
        tsproxy.Node(control_url="http://127.0.0.1:1", exit_node=5)
    from tsproxy.errors import ConfigError
    with pytest.raises(ConfigError, match="not a node name or IP address"):
        tsproxy.Node(control_url="http://127.0.0.1:1", exit_node="a b")
    with pytest.raises(TypeError, match="cannot be combined"):
        tsproxy.Node(wg_config="[Interface]\n", exit_node="x")
