"""The control client against the test control server sending what newer control planes send
(docs/protocol-notes.md): unknown node attributes, c2n debug paths, ping types we cannot run.
Each is answered or ignored and counted; the client stays Running.  And the server's primary
routes as a client sees them: one primary per subnet, failover when it goes offline."""

from __future__ import annotations

import asyncio
import json

import pytest

from tsproxy.control import messages as msg
from tsproxy.control.aio import ControlClient, ControlURL, NoiseH2, fetch_server_key
from tsproxy.daemon.state import StateStore
from tsproxy.keys import DiscoPrivate, MachinePrivate, NodePrivate
from tests.waiting import until

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
async def server():
    from tsproxy.testing.control import TestControlServer
    srv = TestControlServer("127.0.0.1", derp_map={"Regions": {}})
    await srv.start()
    yield srv
    await srv.stop()


async def test_unknown_attrs_c2n_and_unsupported_pings_are_counted(server, tmp_path):
    c = ControlClient(server.url, StateStore(str(tmp_path / "c")), hostname="cur",
                      auth_key=server.create_auth_key().key)
    task = asyncio.create_task(c.run())
    try:
        await until(lambda: c.state == "Running", "login")
        nid = server.node("cur").id
        assert server.node("cur").cap == msg.CAPABILITY_VERSION
        server.set_node_attr(nid, "default-auto-update", [True])       # 131: known, no-op
        server.set_node_attr(nid, "some-attr-from-the-future", [{"v": 2}])
        await until(lambda: "some-attr-from-the-future" in c.netmap.self_node.cap_map,
                    "attributes in the netmap")
        assert c.counters["node_attrs_unknown"] == 1
        server.set_node_attr(nid, "another-future-attr")
        await until(lambda: c.counters["node_attrs_unknown"] == 2, "second unknown attr")

        def c2n(path: bytes) -> str:
            return server.send_ping(nid, types="c2n",
                                    payload=b"GET " + path + b" HTTP/1.1\r\nHost: n\r\n\r\n")
        pid = c2n(b"/debug/health")
        ans = await until(lambda: server.pings.get(pid), "/debug/health answered")
        head, _, body = ans["body"].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == {"Warnings": {}}
        pid = c2n(b"/debug/tka/log")
        ans = await until(lambda: server.pings.get(pid), "/debug/tka/log answered")
        assert ans["body"].startswith(b"HTTP/1.1 404 ")
        pid = c2n(b"/debug/netmap")
        ans = await until(lambda: server.pings.get(pid), "/debug/netmap answered")
        assert ans["body"].startswith(b"HTTP/1.1 501 ")
        assert c.counters["c2n_answered"] == 1 and c.counters["c2n_not_handled"] == 2
        server.send_ping(nid, types="disco")
        await until(lambda: c.counters["pings_unsupported"] == 1, "disco ping counted")
        assert c.state == "Running" and c.last_error == ""
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _Router:
    """A bare client that registers advertising routes and holds a map stream open."""

    def __init__(self, server, name, routes):
        self.server, self.name, self.routes = server, name, routes
        self.mk, self.nk = MachinePrivate.generate(), NodePrivate.generate()
        self.conn = self.task = None

    async def start(self):
        url = ControlURL(self.server.url)
        self.conn = await NoiseH2.connect(url, self.mk, await fetch_server_key(url))
        hi = {**msg.hostinfo(self.name), "RoutableIPs": list(self.routes)}
        r = await self.conn.request("/machine/register", msg.build_register_request(
            node_key=self.nk.public(), old_node_key=None, hostinfo=hi,
            auth_key=self.server.create_auth_key().key))
        assert r.status == 200 and json.loads(await r.read_all(1 << 16))["MachineAuthorized"]
        r = await self.conn.request("/machine/map", msg.build_map_request(
            node_key=self.nk.public(), disco_key=DiscoPrivate.generate().public(),
            hostinfo=hi, endpoints=[]))
        assert r.status == 200

        async def drain():
            while await r.read_chunk():
                pass
        self.task = asyncio.create_task(drain())

    async def stop(self):
        self.conn.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_primary_route_fails_over_to_the_next_router_on_the_client(server, tmp_path):
    subnet = "198.51.100.0/24"
    server.auto_approve_routes = True
    r1, r2 = _Router(server, "r1", [subnet]), _Router(server, "r2", [subnet])
    c = ControlClient(server.url, StateStore(str(tmp_path / "obs")), hostname="obs",
                      auth_key=server.create_auth_key().key)
    task = asyncio.create_task(c.run())
    try:
        await r1.start()
        await r2.start()
        await until(lambda: c.state == "Running", "observer running")

        def primaries():
            nm = c.netmap
            if nm is None:
                return {}
            return {p.hostname: [str(x) for x in p.primary_routes] for p in nm.peers.values()}
        await until(lambda: primaries() == {"r1": [subnet], "r2": []}, "r1 primary")
        n1 = server.node("r1")
        assert server.primary_routes() == {subnet: n1.id}
        await r1.stop()                                   # the primary goes offline
        await until(lambda: primaries().get("r2") == [subnet] and not primaries().get("r1"),
                    "r2 takes over")
        peer = next(p for p in c.netmap.peers.values() if p.hostname == "r2")
        assert subnet in [str(x) for x in peer.allowed_ips]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for r in (r1, r2):
            if r.task is not None:
                await r.stop()
