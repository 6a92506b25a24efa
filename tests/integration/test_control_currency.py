"""The control client against the test control server sending what newer control planes send
(docs/protocol-notes.md): unknown node attributes, c2n debug paths, ping types we cannot run.
Each is answered or ignored and counted; the client stays Running."""

from __future__ import annotations

import asyncio
import json

import pytest

from tsproxy.control import messages as msg
from tsproxy.control.aio import ControlClient
from tsproxy.daemon.state import StateStore

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
async def server():
    from tsproxy.testing.control import TestControlServer
    srv = TestControlServer("127.0.0.1", derp_map={"Regions": {}})
    await srv.start()
    yield srv
    await srv.stop()


async def _until(cond, what, timeout=20.0):
    async with asyncio.timeout(timeout):
        while not (v := cond()):
            await asyncio.sleep(0.02)
    return v


async def test_unknown_attrs_c2n_and_unsupported_pings_are_counted(server, tmp_path):
    c = ControlClient(server.url, StateStore(str(tmp_path / "c")), hostname="cur",
                      auth_key=server.create_auth_key().key)
    task = asyncio.create_task(c.run())
    try:
        await _until(lambda: c.state == "Running", "login")
        nid = server.node("cur").id
        assert server.node("cur").cap == msg.CAPABILITY_VERSION
        server.set_node_attr(nid, "default-auto-update", [True])       # 131: known, no-op
        server.set_node_attr(nid, "some-attr-from-the-future", [{"v": 2}])
        await _until(lambda: "some-attr-from-the-future" in c.netmap.self_node.cap_map,
                     "attributes in the netmap")
        assert c.counters["node_attrs_unknown"] == 1
        server.set_node_attr(nid, "another-future-attr")
        await _until(lambda: c.counters["node_attrs_unknown"] == 2, "second unknown attr")

        def c2n(path: bytes) -> str:
            return server.send_ping(nid, types="c2n",
                                    payload=b"GET " + path + b" HTTP/1.1\r\nHost: n\r\n\r\n")
        pid = c2n(b"/debug/health")
        ans = await _until(lambda: server.pings.get(pid), "/debug/health answered")
        head, _, body = ans["body"].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == {"Warnings": {}}
        pid = c2n(b"/debug/tka/log")
        ans = await _until(lambda: server.pings.get(pid), "/debug/tka/log answered")
        assert ans["body"].startswith(b"HTTP/1.1 404 ")
        pid = c2n(b"/debug/netmap")
        ans = await _until(lambda: server.pings.get(pid), "/debug/netmap answered")
        assert ans["body"].startswith(b"HTTP/1.1 501 ")
        assert c.counters["c2n_answered"] == 1 and c.counters["c2n_not_handled"] == 2
        server.send_ping(nid, types="disco")
        await _until(lambda: c.counters["pings_unsupported"] == 1, "disco ping counted")
        assert c.state == "Running" and c.last_error == ""
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
