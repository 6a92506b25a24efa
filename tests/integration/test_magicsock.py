"""MagicConn on loopback, without the daemon: two nodes (WgDevice + netstack + MagicConn each)
and a TLS test DERP relay with STUN.  Without endpoints the nodes talk through DERP only; given
each other's UDP address, disco proves the direct path; when that address stops answering
they fall back to DERP; bad disco boxes and junk are counted, not fatal."""

import asyncio
import hashlib
import ipaddress
import os
import socket

import pytest

from tsproxy.control import messages as msg
from tsproxy.keys import DiscoPrivate, NodePrivate
from tsproxy.magicsock.aio import MagicConn
from tsproxy.netstack.aio import NetstackRuntime
from tsproxy.netstack.stack import Stack
from tsproxy.testing.derp_server import TestDerpServer, derp_map
from tsproxy.wg.device import WgDevice
from tests.waiting import until

pytestmark = [pytest.mark.timeout(90)]


class Node:
    def __init__(self, ip: str):
        self.ip = ip
        self.key, self.disco = NodePrivate.generate(), DiscoPrivate.generate()
        self.homes: list = []

    async def start(self, dmap):
        loop = asyncio.get_running_loop()
        self.device = WgDevice(self.key, now=loop.time(), mtu=1280)
        self.magic = await MagicConn.create(self.device, node_private=self.key,
                                            disco_private=self.disco, host="127.0.0.1",
                                            on_packets=lambda p: self.net.deliver(p),
                                            on_home_derp=self.homes.append)
        self.net = NetstackRuntime(Stack([self.ip], mtu=1280, now=loop.time(),
                                         verify_checksums=False), self.magic.send_packets)
        self.magic.set_derp_map(dmap)

    def node(self, nid, endpoints=()):
        return msg.Node(id=nid, key=self.key.public(), disco_key=self.disco.public(),
                        addresses=[ipaddress.ip_network(self.ip + "/32")],
                        allowed_ips=[ipaddress.ip_network(self.ip + "/32")],
                        endpoints=list(endpoints), home_derp=900)

    def know(self, other: "Node", endpoints=()):
        n = other.node(2, endpoints)
        self.magic.set_peers([n])
        if n.key in self.device.peers:
            self.device.update_peer(n.key, endpoint=self.magic.endpoint_for(n))
        else:
            self.device.add_peer(n.key, allowed_ips=n.allowed_ips,
                                 endpoint=self.magic.endpoint_for(n))

    def path(self, other: "Node"):
        key = other.key.public().text()
        return next(p["path"] for p in self.magic.peer_status() if p["node_key"] == key)

    async def close(self):
        await self.net.aclose()
        await self.magic.aclose()


@pytest.fixture
async def pair():
    srv = TestDerpServer(tls=True, stun_port=0)
    await srv.start()
    regions, _, _ = msg.parse_derp_map(derp_map(srv))
    dmap = msg.DERPMap(regions=regions)
    a, b = Node("100.64.0.1"), Node("100.64.0.2")
    await a.start(dmap)
    await b.start(dmap)
    async with asyncio.timeout(10):
        while not (a.homes and b.homes):
            await asyncio.sleep(0.02)
    yield a, b, srv
    await a.close()
    await b.close()
    await srv.stop()


async def transfer(a: Node, b: Node, size: int) -> bytes:
    """b serves `size` random bytes on tunnel port 80; a reads them all."""
    data = os.urandom(size)

    async def serve(reader, writer):
        writer.write(data)
        await writer.drain()
        writer.close()
    if 80 not in b.net.servers:
        await b.net.start_server(80, serve)
    else:
        b.net.servers[80] = serve
    stream, _ = await a.net.open_connection(b.ip, 80, timeout=20)
    got = bytearray()
    while chunk := await stream.read(65536):
        got += chunk
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    return bytes(got)


async def wait_path(a, b, prefix, timeout=20):
    async with asyncio.timeout(timeout):
        while not a.path(b).startswith(prefix):
            await asyncio.sleep(0.05)


async def test_derp_only_then_direct_then_fallback(pair):
    a, b, srv = pair
    assert a.homes == [900] and a.magic.status()["home_derp"] == 900
    assert 900 in a.magic.region_latency                # measured by STUN from our socket
    a.know(b)
    b.know(a)
    await transfer(a, b, 1_000_000)                      # no endpoints: DERP carries it
    assert a.path(b) == "derp 900" and b.path(a) == "derp 900"
    assert a.magic.counters["tx_derp"] > 100 and a.magic.counters["rx_derp"] > 100
    assert srv.counters["packets_forwarded"] > 200

    # endpoints known: disco pings, pongs prove the direct path, data moves off the relay
    a.know(b, [("127.0.0.1", b.magic.port)])
    b.know(a, [("127.0.0.1", a.magic.port)])
    async with asyncio.timeout(20):
        while not a.path(b).startswith("direct"):
            await transfer(a, b, 20_000)
    relayed = srv.counters["packets_forwarded"]
    await transfer(a, b, 2_000_000)
    assert a.path(b) == f"direct 127.0.0.1:{b.magic.port}"
    assert srv.counters["packets_forwarded"] - relayed < 50        # pings/heartbeats at most
    assert a.magic.counters["disco_ping_tx"] > 0 and b.magic.counters["disco_ping_rx"] > 0

    # the direct path dies: b stops reading UDP, and a is pointed at a dead port; pings time
    # out, DERP again (b's real port would otherwise be rediscovered before the dead one times out)
    b.magic.loop.remove_reader(b.magic.sock.fileno())
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    try:
        ep = a.magic.endpoint_for(b.node(2))
        ep.paths.best = ("127.0.0.1", dead.getsockname()[1])
        ep.paths.trust_until = 0.0
        await transfer(a, b, 500_000)                    # sent via DERP + the dead address
        await wait_path(a, b, "derp", timeout=15)
        await transfer(a, b, 500_000)
    finally:
        dead.close()


async def test_bad_disco_and_junk_are_counted(pair):
    a, b, _ = pair
    a.know(b)
    b.know(a)
    magic = b"TS\xf0\x9f\x92\xac"
    d, m = a.magic.codec.counters, a.magic.counters
    seen = lambda: (d["disco_unknown_sender"], d["disco_bad_box"], m["rx_wg_unknown_source"])  # noqa: E731
    base = seen()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # 1,200 datagrams in batches of 100; the loop reads each batch before the next is sent
        # (all sent at once from this same loop would overflow the socket buffer)
        for batch in range(12):
            for i in range(batch * 25, batch * 25 + 25):
                s.sendto(magic + os.urandom(100), ("127.0.0.1", a.magic.port))   # unknown sender
                # a known sender's key with a box that does not open
                s.sendto(magic + b.disco.public().raw + os.urandom(24 + 40), ("127.0.0.1", a.magic.port))
                s.sendto(bytes([4, 0, 0, 0]) + os.urandom(60), ("127.0.0.1", a.magic.port))
                s.sendto(os.urandom(i % 50 + 1), ("127.0.0.1", a.magic.port))
            n = batch * 25 + 25         # non-disco datagrams from an unknown address: 2 per round
            await until(lambda: all(x - y >= want for x, y, want in zip(seen(), base, (n, n, 2 * n))),
                        f"batch {batch} counted")
        assert tuple(x - y for x, y in zip(seen(), base)) == (300, 300, 600)
        await transfer(a, b, 300_000)                    # the tunnel still works
        # call-me-maybe over UDP is never trusted
        pkt = b.magic.codec.seal(a.disco.public().raw,
                                 bytes([3, 0]) + bytes(16) + b"\x00\x01")
        s.sendto(pkt, ("127.0.0.1", a.magic.port))
        await until(lambda: m["disco_cmm_udp_ignored"] >= 1, "call-me-maybe over UDP counted")
        assert m["disco_cmm_udp_ignored"] == 1
    finally:
        s.close()


async def test_peer_home_region_dialed_on_demand_and_closed_when_idle(monkeypatch):
    """A's home is region 900 (the only one answering STUN); B lives on 901.  A opens 901 only
    to reach B, and closes it once idle; its home connection stays."""
    import tsproxy.magicsock.aio as magic_mod
    monkeypatch.setattr(magic_mod, "DERP_IDLE_CLOSE", 1.0)
    r900 = TestDerpServer(tls=True, stun_port=0, region_id=900)
    r901 = TestDerpServer(tls=True, stun_port=None, region_id=901)
    await r900.start()
    await r901.start()
    both, _, _ = msg.parse_derp_map(derp_map(r900, r901))
    only901, _, _ = msg.parse_derp_map(derp_map(r901))
    a, b = Node("100.64.0.1"), Node("100.64.0.2")
    try:
        await a.start(msg.DERPMap(regions=both))
        await b.start(msg.DERPMap(regions=only901))
        async with asyncio.timeout(10):
            while not (a.homes and b.homes):
                await asyncio.sleep(0.02)
        assert (a.homes, b.homes) == ([900], [901])
        assert set(a.magic.derps) == {900}
        nb = b.node(2)
        nb.home_derp = 901
        a.magic.set_peers([nb])
        a.device.add_peer(nb.key, allowed_ips=nb.allowed_ips, endpoint=a.magic.endpoint_for(nb))
        na = a.node(1)
        b.magic.set_peers([na])                       # B answers where it heard A (901)
        b.device.add_peer(na.key, allowed_ips=na.allowed_ips, endpoint=b.magic.endpoint_for(na))
        await transfer(a, b, 300_000)
        assert set(a.magic.derps) == {900, 901} and a.path(b) == "derp 901"
        assert r901.counters["packets_forwarded"] > 50
        async with asyncio.timeout(10):               # idle: the non-home region is closed
            while 901 in a.magic.derps:
                await asyncio.sleep(0.1)
        assert set(a.magic.derps) == {900}
        await transfer(a, b, 100_000)                 # and reopened on demand
    finally:
        await a.close()
        await b.close()
        await r900.stop()
        await r901.stop()
