"""Node-key rotation reaches DERP (issue 16 defect 2): after the control server expires tsp-b's
key and tsp-b re-registers with a new one, tsp-b's DERP connection must come back under the new
key.  UDP between the two daemons is dropped, so DERP is the only path; the relay admits only
current node keys, as Headscale >= 0.27 (`verify_clients`) does."""

import asyncio
import time

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status, socks_curl, start_page_server
from tsproxy.derp.aio import DerpConnection
from tsproxy.keys import NodePrivate
from tsproxy.testing import impair
from tsproxy.testing.derp_server import TestDerpServer, current_node_keys

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture
def web():
    srv = start_page_server()
    yield srv.server_address[1]
    srv.shutdown()


@pytest.fixture
def tailnet():
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host="127.0.0.1") as net:
        net.derps[0].verify_client = current_node_keys(net.control)
        yield net


def _keys_on_relay(tailnet):
    return tailnet.call(lambda: {"nodekey:" + k.hex() for k in tailnet.derps[0].clients})


def test_rotated_node_key_keeps_derp_only_traffic_flowing(tailnet, web, tmp_path):
    common = ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
              "--non-tailnet", "refuse"]
    b = Daemon(str(tmp_path / "b"), [*common, "--hostname", "tsp-b", "--listen", "off",
                                      "--reverse", f"8080:127.0.0.1:{web}"])
    a_port = free_port()
    a = Daemon(str(tmp_path / "a"), [*common, "--hostname", "tsp-a",
                                      "--listen", f"127.0.0.1:{a_port}"])
    try:
        b.start(timeout=60)
        a.start(timeout=60)
        impair.drop_udp_between(a.status()["magicsock"]["port"], b.status()["magicsock"]["port"])
        eventually(lambda: peer_status(a, "tsp-b"), 30, "tsp-b in tsp-a's netmap")
        r = eventually(lambda: (lambda r: r if r.returncode == 0 else None)(
            socks_curl(a_port, "http://tsp-b:8080/")), 60, "tsp-b reachable over DERP")
        assert r.stdout == "hello from tsp-b\n"
        assert peer_status(a, "tsp-b")["path"] == "derp 900"

        before = tailnet.node("tsp-b")
        old_key = before.node_key
        assert old_key in _keys_on_relay(tailnet)
        tailnet.call(tailnet.control.expire_node, before.id)
        after = tailnet.wait(lambda: (lambda n: n if n and n.node_key != old_key
                                      and not n.expired(time.time()) else None)(
            tailnet.control.node("tsp-b")), 60, "tsp-b re-registered with a new node key")
        # tsp-b's relay connection follows the new key; the old one is gone
        eventually(lambda: (lambda ks: after.node_key in ks and old_key not in ks)(
            _keys_on_relay(tailnet)), 30, "tsp-b on the relay under its new key")
        eventually(lambda: (lambda p: p and p["node_key"] == after.node_key)(
            peer_status(a, "tsp-b")), 30, "tsp-a sees tsp-b's new key")
        r = eventually(lambda: (lambda r: r if r.returncode == 0 else None)(
            socks_curl(a_port, "http://tsp-b:8080/bytes/200000", "-o", "/dev/null",
                       "-w", "%{size_download}")), 60, "tsp-b reachable over DERP after the rotation")
        assert r.stdout == "200000"
        assert peer_status(a, "tsp-b")["path"] == "derp 900"
        # every key the relay holds is a current one
        assert tailnet.call(lambda: all(current_node_keys(tailnet.control)(k)
                                        for k in tailnet.derps[0].clients))
    finally:
        impair.clear_udp_drop()
        a.stop()
        b.stop()


async def test_relay_with_verify_client_refuses_keys_it_does_not_admit():
    good, bad = NodePrivate.generate(), NodePrivate.generate()
    srv = TestDerpServer(tls=True, stun_port=None,
                         verify_client=lambda raw: raw == good.public().raw)
    await srv.start()
    node = srv.derp_map_region()["Nodes"][0]
    conns = [DerpConnection(node, k, on_packet=lambda s, d: None) for k in (good, bad)]
    tasks = [asyncio.create_task(c.run()) for c in conns]
    try:
        async with asyncio.timeout(10):
            await conns[0].connected.wait()
            while srv.counters["clients_refused"] < 2:      # refused, and refused on retry
                await asyncio.sleep(0.05)
        assert not conns[1].connected.is_set()
        assert set(srv.clients) == {good.public().raw}
        # rotation: the refused connection re-dials under the new, admitted key and gets in
        new = NodePrivate.generate()
        srv.verify_client = lambda raw: raw in (good.public().raw, new.public().raw)
        conns[1].set_private_key(new)
        async with asyncio.timeout(10):
            await conns[1].connected.wait()
        assert new.public().raw in srv.clients
    finally:
        for c in conns:
            await c.close()
        for t in tasks:
            t.cancel()
        await srv.stop()
