"""wg/aio.py over real loopback UDP sockets, and the per-peer staging/rate limits."""

import asyncio
import ipaddress
import socket
import struct
import sys

import pytest

from tsproxy.keys import NodePrivate
from tsproxy.wg import constants as C
from tsproxy.wg.aio import WgUdpTransport
from tsproxy.wg.device import WgDevice

pytestmark = pytest.mark.timeout(60)


def ip4(src, dst, payload):
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


async def _pair(host, batch=True):
    loop = asyncio.get_running_loop()
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    a, b = WgDevice(ka, now=loop.time()), WgDevice(kb, now=loop.time())
    got_a, got_b = [], []
    ta = await WgUdpTransport.create(a, host=host, on_packets=got_a.extend, gro=batch, gso=batch)
    tb = await WgUdpTransport.create(b, host=host, on_packets=got_b.extend, gro=batch, gso=batch)
    a.add_peer(kb.public(), allowed_ips=[ipaddress.ip_network("10.0.0.2/32")], endpoint=(host, tb.port))
    # b learns a's endpoint from the authenticated initiation (roaming)
    b.add_peer(ka.public(), allowed_ips=[ipaddress.ip_network("10.0.0.1/32")])
    return a, b, ta, tb, got_a, got_b


async def _wait(cond, timeout=5.0):
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("batch", [True, False], ids=["gro-gso", "plain"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_packets_cross_loopback_both_ways_in_order(host, batch):
    """Through the device loop, with UDP GRO/GSO and with the plain path forced."""
    async def main():
        a, b, ta, tb, got_a, got_b = await _pair(host, batch)
        try:
            sent = [ip4("10.0.0.1", "10.0.0.2", i.to_bytes(4, "big") * 300) for i in range(400)]
            for i in range(0, len(sent), 40):        # batches small enough for default rmem
                ta.send_packets(sent[i:i + 40])
                await _wait(lambda: len(got_b) >= i + 40)
            assert got_b == sent
            back = [ip4("10.0.0.2", "10.0.0.1", b"reply %d" % i) for i in range(20)]
            tb.send_packets(back)
            await _wait(lambda: len(got_a) == 20)
            assert got_a == back
            st = b.peer_status()[0]
            assert st["endpoint"] == (host, ta.port)
            assert ta.counters["tx_datagrams"] >= 401 and tb.counters["rx_datagrams"] >= 401
            if sys.platform.startswith("linux"):   # 40 equal datagrams a batch: one GSO send
                assert (ta.counters["tx_gso_sends"] >= 10) is batch
                assert (tb.counters["rx_gro_buffers"] >= 1) is batch
        finally:
            await ta.aclose()
            await tb.aclose()
    asyncio.run(main())


def test_garbage_datagrams_are_counted_and_the_tunnel_keeps_working():
    async def main():
        a, b, ta, tb, got_a, got_b = await _pair("127.0.0.1")
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for d in (b"", b"\x01", b"\x04" + bytes(40), b"\x01" + bytes(147), b"\xff" * 200,
                      b"\x02" + bytes(91), b"\x03" + bytes(63)):
                junk.sendto(d, ("127.0.0.1", tb.port))
            await _wait(lambda: b.counters["rx_datagrams"] >= 7)
            dropped = sum(v for k, v in b.counters.items()
                          if k.startswith(("rx_short", "rx_bad", "rx_unknown", "mac1_", "response_unexpected",
                                            "cookie_invalid")))
            assert dropped == 7
            ta.send_packets([ip4("10.0.0.1", "10.0.0.2", b"still fine")])
            await _wait(lambda: got_b)
            assert got_b == [ip4("10.0.0.1", "10.0.0.2", b"still fine")]
        finally:
            junk.close()
            await ta.aclose()
            await tb.aclose()
    asyncio.run(main())


def test_staged_queue_is_bounded_and_initiations_rate_limited():
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    a = WgDevice(ka, now=0.0)
    a.add_peer(kb.public(), allowed_ips=[ipaddress.ip_network("10.0.0.2/32")], endpoint=("192.0.2.2", 1))
    n = C.MAX_STAGED_PACKETS + 10
    for i in range(n):
        assert a.send_packet(ip4("10.0.0.1", "10.0.0.2", i.to_bytes(4, "big")), 0.0)
    out = a.datagrams_to_send()
    assert len(out) == 1 and out[0][0][0] == 1            # one initiation, nothing in clear
    assert a.peer_status()[0]["staged"] == C.MAX_STAGED_PACKETS
    assert a.counters["tx_staged_dropped"] == 10
    # retransmission is not earlier than REKEY_TIMEOUT, and never within 20 ms of the last one
    a.handle_timer(0.010)
    assert a.datagrams_to_send() == []
    dl = a.next_deadline()
    assert C.REKEY_TIMEOUT <= dl <= C.REKEY_TIMEOUT + 0.334
    a.handle_timer(dl)
    out = a.datagrams_to_send()
    assert len(out) == 1 and out[0][0][0] == 1
    a.handle_timer(dl + 0.005)
    assert a.datagrams_to_send() == []


class _FakeBind:
    """A bind with a deadline of its own and nothing on the wire."""
    port = 0

    def __init__(self, deadline):
        self.deadline, self.fired, self.sent, self.sink = deadline, [], [], None

    def open(self, sink):
        self.sink = sink

    def send(self, datagrams, now):
        self.sent += datagrams

    def after_receive(self, device, now):
        pass

    def next_deadline(self):
        return self.deadline

    def handle_timer(self, now):
        if self.deadline is not None and now >= self.deadline:
            self.fired.append(now)
            self.deadline = None

    async def aclose(self):
        pass


def test_device_loop_runs_the_bind_deadline_on_its_one_timer():
    from tsproxy.wg.aio import DeviceLoop

    async def main():
        loop = asyncio.get_running_loop()
        dev = WgDevice(NodePrivate.generate(), now=loop.time())
        bind = _FakeBind(loop.time() + 0.05)
        dl = DeviceLoop(dev, bind, deliver=lambda p: None)
        await _wait(lambda: bind.fired)
        assert len(bind.fired) == 1
        # a deadline that moves earlier later on is picked up by rearm()
        bind.deadline = loop.time() + 0.02
        dl.rearm()
        await _wait(lambda: len(bind.fired) == 2)
        # a datagram for an unknown index is dropped by the device and nothing is sent
        dl.receive([(bytes([4, 0, 0, 0]) + bytes(40), ("192.0.2.1", 1))], loop.time())
        assert dev.counters["rx_unknown_index"] == 1 and bind.sent == []
        await dl.aclose()
        assert dl.closed
    asyncio.run(main())


def test_handshake_and_data_from_memoryview_slices():
    """GRO hands the device memoryview slices of one buffer, handshakes included."""
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    a, b = WgDevice(ka, now=0.0), WgDevice(kb, now=0.0)
    A, B = ("192.0.2.1", 1), ("192.0.2.2", 2)
    a.add_peer(kb.public(), allowed_ips=[ipaddress.ip_network("10.0.0.2/32")], endpoint=B)
    b.add_peer(ka.public(), allowed_ips=[ipaddress.ip_network("10.0.0.1/32")], endpoint=A)
    pkt = ip4("10.0.0.1", "10.0.0.2", b"via views")
    a.send_packet(pkt, 0.0)
    for _ in range(3):
        buf = b"".join(d for d, _ in a.datagrams_to_send())
        views, off = [], 0
        for n in (148, 32 + 48):                  # initiation, then the staged data message
            if off < len(buf):
                views.append((memoryview(buf)[off:off + n], A))
                off += n
        b.receive_datagrams(views, 0.1)
        a.receive_datagrams([(memoryview(d), B) for d, _ in b.datagrams_to_send()], 0.1)
    assert b.take_packets() == [pkt]
    assert a.counters["handshake_completed"] == 1 and b.counters["handshake_completed"] == 1
