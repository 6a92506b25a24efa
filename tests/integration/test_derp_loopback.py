import asyncio

import pytest

from tsproxy.derp import wire
from tsproxy.derp.aio import DerpConnection
from tsproxy.disco import stun
from tsproxy.disco.aio import measure_region_latency
from tsproxy.keys import NodePrivate
from tsproxy.testing.derp_server import TestDerpServer
from tests.waiting import until

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


class Node:
    def __init__(self, target, **kw):
        self.key = NodePrivate.generate()
        self.pub = self.key.public().raw
        self.got: asyncio.Queue = asyncio.Queue()
        self.events: asyncio.Queue = asyncio.Queue()
        self.conn = DerpConnection(target, self.key, on_packet=lambda s, d: self.got.put_nowait((s, d)),
                                   on_event=self.events.put_nowait, **kw)
        self.task = asyncio.create_task(self.conn.run())

    async def next_event(self, kind):
        while True:
            ev = await asyncio.wait_for(self.events.get(), 10)
            if ev[0] == kind:
                return ev

    async def stop(self):
        await self.conn.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _pair_exchange(srv, target_of):
    a, b = Node(target_of(srv)), Node(target_of(srv))
    try:
        await asyncio.wait_for(asyncio.gather(a.conn.connected.wait(), b.conn.connected.wait()), 10)
        assert {k for k, _ in srv.seen_client_infos} >= {a.pub, b.pub}
        assert dict(srv.seen_client_infos)[a.pub] == {"version": 2, "CanAckPings": True}
        a.conn.send(b.pub, b"hello b")
        assert await asyncio.wait_for(b.got.get(), 10) == (a.pub, b"hello b")
        big = bytes(range(256)) * 256
        b.conn.send(a.pub, big)
        assert await asyncio.wait_for(a.got.get(), 10) == (b.pub, big)
        await a.stop()
        ev = await b.next_event("peer_gone")
        assert ev == ("peer_gone", a.pub, 0)
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("tls", [False, True])
async def test_two_clients_exchange_and_peer_gone(tls):
    srv = TestDerpServer(tls=tls)
    await srv.start()
    try:
        if tls:
            await _pair_exchange(srv, lambda s: s.derp_map_region()["Nodes"][0])
        else:
            await _pair_exchange(srv, lambda s: s.url)
    finally:
        await srv.stop()


async def test_tls_pinning_and_verification():
    srv = TestDerpServer(tls=True)
    await srv.start()
    try:
        node = dict(srv.derp_map_region()["Nodes"][0], InsecureForTests=False,
                    CertName="sha256-raw:" + srv.cert_sha256)
        a = Node(node)
        await asyncio.wait_for(a.conn.connected.wait(), 10)
        await a.stop()
        bad = dict(node, CertName="sha256-raw:" + "00" * 32)
        b = Node(bad)
        await until(lambda: b.conn.counters["protocol_errors"] >= 2, "pin mismatch, twice")
        assert not b.conn.connected.is_set() and b.conn.counters["connects"] == 0
        await b.stop()
        strict = dict(node, CertName="")  # system CAs: a self-signed cert must be refused
        c = Node(strict)
        # refused once, then retried only at the slow verification-failure pace
        await until(lambda: c.conn.counters["tls_verify_failed"] >= 1, "refused TLS handshake")
        assert not c.conn.connected.is_set() and c.conn.counters["connects"] == 0
        assert c.conn.last_error == (f"DERP server 127.0.0.1:{srv.port}: certificate verify "
                                     "failed: self-signed certificate")
        await c.stop()
    finally:
        await srv.stop()


async def test_server_restart_and_close_client_reconnect():
    srv = TestDerpServer()
    await srv.start()
    a, b = Node(srv.url), Node(srv.url)
    try:
        await asyncio.wait_for(asyncio.gather(a.conn.connected.wait(), b.conn.connected.wait()), 10)
        srv.restart()
        await until(lambda: a.conn.counters["connects"] == 2 and b.conn.counters["connects"] == 2
                    and a.conn.connected.is_set() and b.conn.connected.is_set(), "both reconnected")
        await until(lambda: a.pub in srv.clients and b.pub in srv.clients, "server knows both")
        a.conn.send(b.pub, b"after restart")
        assert await asyncio.wait_for(b.got.get(), 10) == (a.pub, b"after restart")
        assert srv.close_client(b.pub)
        await until(lambda: b.conn.counters["connects"] == 3 and b.conn.connected.is_set(),
                    "b reconnected after close")
    finally:
        await a.stop()
        await b.stop()
        await srv.stop()


async def test_keepalive_ping_and_not_here():
    srv = TestDerpServer(keepalive=0.2)
    await srv.start()
    a = Node(srv.url)
    try:
        await asyncio.wait_for(a.conn.connected.wait(), 10)
        await until(lambda: a.conn._client.counters["keepalives"] >= 2, "two keepalives")
        client = a.conn._client
        client.send_ping(b"pingpong")
        a.conn._writer.write(client.data_to_send())
        assert await a.next_event("pong") == ("pong", b"pingpong")
        disco = b"TS\xf0\x9f\x92\xac" + bytes(70)
        a.conn.send(b"Z" * 32, disco)
        assert await a.next_event("peer_gone") == ("peer_gone", b"Z" * 32, 1)
    finally:
        await a.stop()
        await srv.stop()


async def test_http_endpoints_and_bad_client():
    srv = TestDerpServer()
    await srv.start()
    try:
        for req, want in [(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200"),
                          (b"POST /derp/latency-check HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 405"),
                          (b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 426")]:
            r, w = await asyncio.open_connection(srv.host, srv.port)
            w.write(req)
            assert (await r.read(100)).startswith(want)
            w.close()
        r, w = await asyncio.open_connection(srv.host, srv.port)
        w.write(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        assert b"101" in head and b"Derp-Public-Key: " + srv.public.hex().encode() in head
        assert await r.readexactly(45) == wire.build_server_key(srv.public)
        w.write(wire.build_frame(wire.CLIENT_INFO, b"k" * 32 + b"n" * 24 + b"garbage-box-garbage"))
        assert await asyncio.wait_for(r.read(10), 5) == b""
        assert srv.counters["bad_clients"] == 1
        w.close()
    finally:
        await srv.stop()


async def test_malformed_server_frame_client_reconnects():
    """A server that sends an oversized frame: the client drops that connection and dials again."""
    hits = []

    async def evil(reader, writer):
        hits.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + b"\x05\xff\xff\xff\xff")
        await writer.drain()
        try:
            await reader.read(100)
        finally:
            writer.close()

    server = await asyncio.start_server(evil, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    a = Node(f"http://127.0.0.1:{port}/derp")
    try:
        await until(lambda: len(hits) >= 2 and a.conn.counters["protocol_errors"] >= 1,
                    "a reconnect after the bad frame")
        assert a.conn.counters["connects"] >= 1
    finally:
        await a.stop()
        server.close()


async def test_stun_responder_and_latency_helper():
    srv = TestDerpServer(stun_port=0)
    await srv.start()
    try:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        class P(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                fut.set_result(data)

        tr, _ = await loop.create_datagram_endpoint(P, remote_addr=srv.stun_addr)
        txid = b"q" * 12
        tr.sendto(stun.build_request(txid))
        resp = await asyncio.wait_for(fut, 5)
        assert stun.parse_response(resp) == (txid, tr.get_extra_info("sockname")[:2])
        tr.close()
        lat, addr = await measure_region_latency(srv.derp_map_region())
        assert lat is not None and 0 <= lat < 1 and addr[0] == "127.0.0.1"
        region = srv.derp_map_region()
        assert region["Nodes"][0]["STUNPort"] == srv.stun_addr[1]
        assert region["Nodes"][0]["DERPPort"] == srv.port and region["RegionID"] == 900
    finally:
        await srv.stop()


async def test_two_regions_map_and_cross_region_isolation():
    from tsproxy.testing.derp_server import derp_map
    r1, r2 = TestDerpServer(tls=True, region_id=900), TestDerpServer(tls=True, region_id=901, stun_port=None)
    await r1.start()
    await r2.start()
    try:
        m = derp_map(r1, r2)
        assert set(m["Regions"]) == {"900", "901"}
        n2 = m["Regions"]["901"]["Nodes"][0]
        assert n2 == {"Name": "901a", "RegionID": 901, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                      "IPv6": "none", "STUNPort": -1, "DERPPort": r2.port, "InsecureForTests": True,
                      "STUNTestIP": "127.0.0.1"}
        a = Node(m["Regions"]["900"]["Nodes"][0], preferred=True)
        b = Node(n2)
        await asyncio.wait_for(asyncio.gather(a.conn.connected.wait(), b.conn.connected.wait()), 10)
        assert a.pub in r1.clients and r1.clients[a.pub].preferred
        assert b.pub in r2.clients and not r2.clients[b.pub].preferred
        a.conn.send(b.pub, b"TS\xf0\x9f\x92\xac" + bytes(70))  # b lives in another region
        assert await a.next_event("peer_gone") == ("peer_gone", b.pub, 1)
        await a.stop()
        await b.stop()
    finally:
        await r1.stop()
        await r2.stop()


async def test_send_queue_is_bounded_and_flushed_on_connect():
    from tsproxy.derp.aio import MAX_SEND_QUEUE
    srv = TestDerpServer()
    await srv.start()
    b = Node(srv.url)
    await asyncio.wait_for(b.conn.connected.wait(), 10)
    a_key = NodePrivate.generate()
    a = DerpConnection(srv.url, a_key, on_packet=lambda s, d: None)
    try:
        for i in range(MAX_SEND_QUEUE):
            assert a.send(b.pub, i.to_bytes(4, "big"))
        assert not a.send(b.pub, b"overflow") and a.counters["send_queue_dropped"] == 1
        task = asyncio.create_task(a.run())
        got = [await asyncio.wait_for(b.got.get(), 10) for _ in range(MAX_SEND_QUEUE)]
        assert [int.from_bytes(d, "big") for _, d in got] == list(range(MAX_SEND_QUEUE))
        assert all(s == a_key.public().raw for s, _ in got)
    finally:
        await a.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await b.stop()
        await srv.stop()


async def test_server_survives_hostile_frames_from_one_client():
    import random as _random
    srv = TestDerpServer()
    await srv.start()
    a, b = Node(srv.url), Node(srv.url)
    rnd = _random.Random(1234)
    try:
        await asyncio.wait_for(asyncio.gather(a.conn.connected.wait(), b.conn.connected.wait()), 10)
        for round_ in range(30):
            client = a.conn._client
            if client is None or not a.conn.connected.is_set():
                await asyncio.wait_for(a.conn.connected.wait(), 10)
                continue
            t = rnd.choice([4, 7, 0x12, 0x10, 0x11, 0x0a, 0x33])
            a.conn._writer.write(wire.build_frame(t, rnd.randbytes(rnd.randrange(0, 40))))
            await asyncio.sleep(0.01)
        b2 = Node(srv.url)
        await asyncio.wait_for(b2.conn.connected.wait(), 10)
        await until(lambda: b2.pub in srv.clients, "b2 registered")
        b.conn.send(b2.pub, b"still serving")
        assert await asyncio.wait_for(b2.got.get(), 10) == (b.pub, b"still serving")
        await b2.stop()
    finally:
        await a.stop()
        await b.stop()
        await srv.stop()


async def test_mesh_frame_without_mesh_key_closes_only_that_client():
    srv = TestDerpServer()
    await srv.start()
    a, b = Node(srv.url), Node(srv.url)
    try:
        await asyncio.wait_for(asyncio.gather(a.conn.connected.wait(), b.conn.connected.wait()), 10)
        a.conn._writer.write(wire.build_frame(wire.WATCH_CONNS))
        await until(lambda: a.conn.counters["connects"] >= 2 and a.conn.connected.is_set(),
                    "a closed and reconnected")
        assert a.conn.counters["connects"] == 2 and b.conn.counters["connects"] == 1
    finally:
        await a.stop()
        await b.stop()
        await srv.stop()
