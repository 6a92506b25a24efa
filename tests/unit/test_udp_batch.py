"""tsproxy.aio.UdpBatchSocket: GSO on send and GRO on receive over real loopback sockets, the
plain path (forced), how runs are grouped into one UDP_SEGMENT send, and the fallback when the
kernel refuses GSO."""

import errno
import os
import socket
import struct
import sys

import pytest

from tsproxy import aio
from tsproxy.aio import UdpBatchSocket, bind_udp

pytestmark = pytest.mark.timeout(30)
LINUX = sys.platform.startswith("linux")


def _drain(rx: UdpBatchSocket, want: int) -> list:
    import select
    got = []
    while len(got) < want:
        r, _, _ = select.select([rx.fileno()], [], [], 5.0)
        assert r, f"only {len(got)} of {want} datagrams arrived"
        got += [(bytes(d), a) for d, a in rx.recv_batch(4096)]
    return got


def _burst(n=20, size=1200):
    return [os.urandom(size) for _ in range(n)] + [os.urandom(size // 3)]


@pytest.mark.parametrize("gro", [True, False])
@pytest.mark.parametrize("gso", [True, False])
def test_datagrams_arrive_whole_and_in_order(gso, gro):
    tx = UdpBatchSocket(bind_udp("127.0.0.1", 0), gso=gso)
    rx = UdpBatchSocket(bind_udp("127.0.0.1", 0), gro=gro)
    try:
        if LINUX:
            assert tx.gso is gso and rx.gro is gro     # Linux >= 5.0 has both
        dst = ("127.0.0.1", rx.port)
        data = _burst()
        assert tx.send_batch([(d, dst) for d in data]) == len(data)
        got = _drain(rx, len(data))
        assert [d for d, _ in got] == data
        assert {a for _, a in got} == {("127.0.0.1", tx.port)}
        assert tx.counters["tx_datagrams"] == len(data)
        assert (tx.counters["tx_gso_sends"] >= 1) is (gso and LINUX)
        assert rx.counters["rx_datagrams"] == len(data)
        if gso and gro and LINUX:                   # loopback keeps the GSO buffer whole
            assert rx.counters["rx_gro_buffers"] >= 1
        if not gro:
            assert rx.counters["rx_gro_buffers"] == 0
    finally:
        tx.close()
        rx.close()


def test_dual_stack_socket_segments_to_an_ipv4_peer():
    tx = UdpBatchSocket(bind_udp(None, 0))          # AF_INET6, v4-mapped destinations
    rx = UdpBatchSocket(bind_udp("127.0.0.1", 0))
    try:
        data = _burst(8, 1000)
        assert tx.send_batch([(d, ("127.0.0.1", rx.port)) for d in data]) == len(data)
        got = _drain(rx, len(data))
        assert [d for d, _ in got] == data and got[0][1] == ("127.0.0.1", tx.port)
        if LINUX:
            assert tx.counters["tx_gso_sends"] == 1 and tx.gso
    finally:
        tx.close()
        rx.close()


def test_gro_slices_are_views_of_one_copy():
    tx = UdpBatchSocket(bind_udp("127.0.0.1", 0))
    rx = UdpBatchSocket(bind_udp("127.0.0.1", 0))
    try:
        if not (tx.gso and rx.gro):
            pytest.fail("this kernel lacks UDP GSO/GRO")
        dst = ("127.0.0.1", rx.port)
        data = [bytes([i]) * 1000 for i in range(10)]
        tx.send_batch([(d, dst) for d in data])
        import select
        select.select([rx.fileno()], [], [], 5.0)
        batch = rx.recv_batch(100)
        assert [bytes(d) for d, _ in batch] == data
        views = [d for d, _ in batch if isinstance(d, memoryview)]
        assert len(views) == 10 and len({id(v.obj) for v in views}) == 1
    finally:
        tx.close()
        rx.close()


class FakeSock:
    """Records what UdpBatchSocket asks of the kernel."""
    family = socket.AF_INET

    def __init__(self, fail_gso=None, recv=()):
        self.calls = []
        self.opts = []
        self.fail_gso = fail_gso
        self.recv = list(recv)

    def setsockopt(self, *a):
        self.opts.append(a)

    def getsockopt(self, *a):
        return 0

    def sendmsg(self, bufs, anc, flags, addr):
        if self.fail_gso is not None:
            raise OSError(self.fail_gso, os.strerror(self.fail_gso))
        (level, kind, seg), = anc
        assert (level, kind) == (aio.SOL_UDP, aio.UDP_SEGMENT)
        self.calls.append(("gso", [bytes(b) for b in bufs], struct.unpack("=H", seg)[0], addr))

    def sendto(self, data, addr):
        self.calls.append(("plain", bytes(data), addr))

    def recvmsg_into(self, bufs, ancsize):
        if not self.recv:
            raise BlockingIOError
        data, anc, addr = self.recv.pop(0)
        bufs[0][:len(data)] = data
        self.calls.append(("recvmsg", len(data)))
        return len(data), anc, 0, addr

    def recvfrom_into(self, buf):
        if not self.recv:
            raise BlockingIOError
        data, anc, addr = self.recv.pop(0)
        assert not anc, "a coalesced buffer read without its segment size"
        buf[:len(data)] = data
        self.calls.append(("recvfrom", len(data)))
        return len(data), addr


def test_runs_split_on_address_size_and_segment_limit():
    s = UdpBatchSocket(FakeSock())
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 2)
    out = ([(b"x" * 100, a)] * 3 + [(b"y" * 40, a)]      # one run, ended by the shorter one
           + [(b"z" * 100, a)]                             # after a short one: its own send
           + [(b"w" * 100, b)] * 2                         # another address: a new run
           + [(b"v" * 200, b)]                             # larger: cannot join the run
           + [(b"u" * 10, a)] * (aio.GSO_MAX_SEGMENTS + 1))
    assert s.send_batch(out) == len(out)
    kinds = [(c[0], len(c[1]) if c[0] == "gso" else 1) for c in s.sock.calls]
    assert kinds == [("gso", 4), ("plain", 1), ("gso", 2), ("plain", 1),
                     ("gso", aio.GSO_MAX_SEGMENTS), ("plain", 1)]
    first = s.sock.calls[0]
    assert first[2] == 100 and first[3] == a and first[1][-1] == b"y" * 40
    assert s.counters["tx_gso_sends"] == 3 and s.counters["tx_datagrams"] == len(out)


@pytest.mark.parametrize("err", [errno.EIO, errno.EINVAL])
def test_refused_gso_falls_back_to_plain_for_good(err):
    s = UdpBatchSocket(FakeSock(fail_gso=err))
    a = ("10.0.0.1", 1)
    out = [(bytes([i]) * 50, a) for i in range(5)]
    assert s.send_batch(out) == 5
    assert [c[0] for c in s.sock.calls] == ["plain"] * 5
    assert [c[1] for c in s.sock.calls] == [d for d, _ in out]
    assert s.gso is False and s.counters["gso_disabled"] == 1
    s.sock.calls.clear()
    assert s.send_batch(out) == 5 and [c[0] for c in s.sock.calls] == ["plain"] * 5


def test_gro_cmsg_splits_the_buffer_and_plain_buffers_pass_whole():
    seg = struct.pack("=i", 100)
    big = b"".join(bytes([i]) * 100 for i in range(7)) + b"end"
    src = ("10.0.0.9", 9)
    sock = FakeSock(recv=[(big, [(aio.SOL_UDP, aio.UDP_GRO, seg)], src),
                          (b"single", [], src),
                          (b"q" * 100, [(aio.SOL_UDP, aio.UDP_GRO, seg)], src)])   # one segment
    s = UdpBatchSocket(sock)
    got = s.recv_batch(100)
    assert [bytes(d) for d, _ in got] == [bytes([i]) * 100 for i in range(7)] + [b"end", b"single",
                                                                                  b"q" * 100]
    assert all(a == src for _, a in got)
    assert s.counters["rx_gro_buffers"] == 1 and s.counters["rx_datagrams"] == 10


def test_recv_limit_leaves_the_rest_for_the_next_call():
    src = ("10.0.0.9", 9)
    s = UdpBatchSocket(FakeSock(recv=[(b"%d" % i, [], src) for i in range(5)]))
    assert len(s.recv_batch(3)) == 3 and len(s.recv_batch(3)) == 2 and s.recv_batch(3) == []


def test_gro_pauses_where_nothing_coalesces_and_drains_before_switching(monkeypatch):
    monkeypatch.setattr(aio, "GRO_IDLE_LIMIT", 10)
    monkeypatch.setattr(aio, "GRO_RETRY_AFTER", 30)
    src = ("10.0.0.9", 9)
    seg = [(aio.SOL_UDP, aio.UDP_GRO, struct.pack("=i", 4))]
    sock = FakeSock(recv=[(b"p%03d" % i, [], src) for i in range(10)])
    s = UdpBatchSocket(sock)
    assert s.gro and len(s.recv_batch(100)) == 10
    assert not s.gro and s.counters["gro_paused"] == 1      # nothing coalesced: paused
    assert sock.opts[-1] == (aio.SOL_UDP, aio.UDP_GRO, 0)
    # a buffer coalesced before the pause is still split (recvmsg until the queue is dry) ...
    sock.recv = [(b"aaaabbbb", seg, src)]
    sock.calls.clear()
    assert [bytes(d) for d, _ in s.recv_batch(100)] == [b"aaaa", b"bbbb"]
    assert [c[0] for c in sock.calls] == ["recvmsg"]
    # ... then plain recvfrom; after GRO_RETRY_AFTER datagrams GRO is tried again
    sock.recv = [(b"q%03d" % i, [], src) for i in range(30)]
    sock.calls.clear()
    assert len(s.recv_batch(100)) == 30
    assert {c[0] for c in sock.calls} == {"recvfrom"}
    assert s.gro and sock.opts[-1] == (aio.SOL_UDP, aio.UDP_GRO, 1)


def test_gro_stays_on_while_buffers_coalesce(monkeypatch):
    monkeypatch.setattr(aio, "GRO_IDLE_LIMIT", 4)
    src = ("10.0.0.9", 9)
    seg = [(aio.SOL_UDP, aio.UDP_GRO, struct.pack("=i", 2))]
    sock = FakeSock(recv=[(b"xxyy", seg, src)] * 20)
    s = UdpBatchSocket(sock)
    assert len(s.recv_batch(1000)) == 40 and s.gro and s.counters["gro_paused"] == 0
