"""Two sans-IO Stacks back to back over the fault-injecting link, with a simulated clock."""

import ipaddress
import os
import random
import struct

from hypothesis import given, settings, strategies as st

from tsproxy.netstack import tcp as T
from tsproxy.netstack.stack import Stack
from tsproxy.netstack.tcp_timewait import TimeWait
from tsproxy.netstack.wire import checksum as C
from tsproxy.netstack.wire import ip
from tsproxy.netstack.wire import tcp as W
from tsproxy.testing.link import Link, run_until

A, B = "10.0.0.1", "10.0.0.2"


def pair(**kw):
    a = Stack([A, "fd00::1"], mtu=1420, now=0.0, msl=kw.pop("msl", 30.0), **kw)
    b = Stack([B, "fd00::2"], mtu=1420, now=0.0, msl=a.msl, **kw)
    return a, b


class App:
    """Sends `data` on each side and collects what arrives, like an application would."""

    def __init__(self, a, b, c, data_a=b"", data_b=b"", read_b=True, close_after=True):
        self.a, self.b, self.c = a, b, c
        self.bc = None
        self.data = {"a": data_a, "b": data_b}
        self.sent = {"a": 0, "b": 0}
        self.got = {"a": bytearray(), "b": bytearray()}
        self.read_b = read_b
        self.close_after = close_after

    def step(self, now):
        if self.bc is None:
            for conn in self.b.take_touched():
                if conn.passive and conn.state in (T.ESTABLISHED, T.CLOSE_WAIT):
                    self.bc = conn
            self.a.take_touched()
        for side, conn, stack in (("a", self.c, self.a), ("b", self.bc, self.b)):
            if conn is None or conn.state not in (T.ESTABLISHED, T.CLOSE_WAIT):
                continue
            d = self.data[side]
            if self.sent[side] < len(d):
                self.sent[side] += conn.send(memoryview(d)[self.sent[side]:self.sent[side] + 262144], now)
                stack.poke(conn)
            elif self.close_after and d and not conn.fin_queued:
                conn.shutdown_write(now)
                stack.poke(conn)
        for side, conn, stack in (("a", self.c, self.a), ("b", self.bc, self.b)):
            if conn is None or (side == "b" and not self.read_b):
                continue
            got = conn.recv(1 << 20, now)
            if got:
                self.got[side] += got
                stack.poke(conn)


def transfer(size_a, size_b, link, **kw):
    a, b = pair(**kw)
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0)
    rnd = random.Random(size_a + size_b)
    app = App(a, b, c, rnd.randbytes(size_a), rnd.randbytes(size_b))
    now = run_until([a, b], link, lambda: len(app.got["b"]) == size_a and len(app.got["a"]) == size_b,
                    now=0.0, on_step=app.step, limit=600)
    assert bytes(app.got["b"]) == app.data["a"] and bytes(app.got["a"]) == app.data["b"]
    return a, b, c, app, now


def test_20mb_both_directions_over_a_faulty_link():
    link = Link(loss=0.05, reorder=0.05, dup=0.02, corrupt=0.01, jitter=0.002, seed=42)
    a, b, c, app, now = transfer(20_000_000, 20_000_000, link)
    assert link.stats["dropped"] > 1000 and link.stats["corrupted"] > 200
    assert a.counters["tcp_bad_checksum"] + a.counters["ip_bad_checksum"] > 0      # corruption caught
    assert a.counters["tcp_retransmit"] > 0 and a.counters["tcp_fast_recovery"] > 0
    assert c.sack_ok and c.snd_wscale == T.DEFAULT_WSCALE


def test_clean_transfer_slow_start_grows_cwnd():
    a, b, c, app, now = transfer(3_000_000, 0, Link(delay=0.01))
    assert c.cwnd > 10 * c.mss * 8
    assert a.counters["tcp_retransmit"] == 0
    assert c.srtt is not None and 0.015 < c.srtt < 0.05


def test_loss_halves_the_window():
    a, b, c, app, now = transfer(3_000_000, 0, Link(delay=0.01, loss=0.02, seed=3))
    assert a.counters["tcp_fast_recovery"] > 0
    assert c.ssthresh < 1 << 40


def test_without_sack_or_window_scaling_newreno_still_recovers():
    a, b = pair()
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0, sack=False, wscale=None)
    data = os.urandom(2_000_000)
    app = App(a, b, c, data)
    run_until([a, b], Link(loss=0.03, seed=9), lambda: len(app.got["b"]) == len(data), now=0.0, on_step=app.step)
    assert bytes(app.got["b"]) == data
    assert not c.sack_ok and c.snd_wscale == 0 and app.bc.rcv_wscale == 0


def test_ipv6_connection():
    a, b = pair()
    b.tcp_listen(80)
    c = a.tcp_connect("fd00::2", 80, 0.0)
    app = App(a, b, c, b"x" * 100_000, b"y" * 50_000)
    run_until([a, b], Link(), lambda: len(app.got["b"]) == 100_000 and len(app.got["a"]) == 50_000,
              now=0.0, on_step=app.step)
    assert c.mss == 1420 - 60


def test_half_close_then_close_then_time_wait():
    a, b = pair(msl=1.0)
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0)
    app = App(a, b, c, b"request", b"", close_after=True)
    run_until([a, b], Link(), lambda: app.bc is not None and app.bc.eof and c.state == T.FIN_WAIT_2,
              now=0.0, on_step=app.step)
    assert app.bc.state == T.CLOSE_WAIT and c.state == T.FIN_WAIT_2
    # the other direction still works after our FIN
    app.bc.send(b"response after half close", 1.0)
    b.poke(app.bc)
    app.bc.close(1.0)
    b.poke(app.bc)
    run_until([a, b], Link(), lambda: c.state == T.TIME_WAIT and app.bc.state == T.CLOSED, now=1.0, on_step=app.step)
    assert bytes(app.got["a"]) == b"response after half close"
    # the stack holds the 4-tuple as a small TIME-WAIT record (tcp_timewait.py) for 2*MSL
    assert isinstance(a.conns[c.key], TimeWait) and c.next_deadline() is None
    run_until([a, b], Link(), lambda: not a.conns, now=2.0, limit=5)
    assert not a.conns and not b.conns and not a.ports_in_use[(c.key[2], c.key[3])]


def test_connect_to_closed_port_is_refused():
    a, b = pair()
    c = a.tcp_connect(B, 81, 0.0)
    run_until([a, b], Link(), lambda: c.state == T.CLOSED, now=0.0)
    assert c.error == "refused" and b.counters["tcp_rst_closed_port"] == 1
    assert any(e[0] == T.EV_ERROR and e[1] == "refused" for e in c.take_events())


def test_reset_while_established():
    a, b = pair()
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0)
    app = App(a, b, c, b"hello")
    run_until([a, b], Link(), lambda: len(app.got["b"]) == 5, now=0.0, on_step=app.step)
    app.bc.abort(1.0)
    run_until([a, b], Link(), lambda: c.state == T.CLOSED, now=1.0)
    assert c.error == "reset"


def test_blind_rst_out_of_window_is_ignored_and_in_window_gets_challenge_ack():
    a, b = pair()
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0)
    app = App(a, b, c, b"x", close_after=False)
    run_until([a, b], Link(), lambda: len(app.got["b"]) == 1, now=0.0, on_step=app.step)
    bc = app.bc
    pk = W.Packetizer(ipaddress.ip_address(A).packed, ipaddress.ip_address(B).packed, c.key[3], 80)
    b.receive_packet(bytes(pk.build(bc.rcv_nxt + 10_000_000, 0, W.RST, 0)), 1.0)   # far away
    assert bc.state == T.ESTABLISHED
    before = b.counters["tcp_challenge_ack"]
    b.receive_packet(bytes(pk.build(bc.rcv_nxt + 5, 0, W.RST, 0)), 1.0)            # in window, not exact
    assert bc.state == T.ESTABLISHED and b.counters["tcp_challenge_ack"] == before + 1
    b.receive_packet(bytes(pk.build(bc.rcv_nxt, 0, W.RST, 0)), 1.0)                # exact: accepted
    assert bc.state == T.CLOSED and bc.error == "reset"


def test_slow_reader_closes_the_window_and_persist_probes_reopen_it():
    a, b = pair(rcv_buf=64 * 1024)
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0)
    data = os.urandom(1_000_000)
    app = App(a, b, c, data, read_b=False)
    run_until([a, b], Link(), lambda: c.snd_wnd == 0 and a.counters["tcp_zero_window_probe"] >= 2,
              now=0.0, on_step=app.step, limit=60)
    assert 64 * 1024 - 128 < len(app.bc.rcv_buf) <= 64 * 1024     # the buffer, never more
    assert c.snd_max - c.snd_una <= 64 * 1024
    app.read_b = True
    run_until([a, b], Link(), lambda: len(app.got["b"]) == len(data), now=60.0, on_step=app.step, limit=600)
    assert bytes(app.got["b"]) == data


def test_send_buffer_is_bounded():
    a, b = pair(snd_buf=100_000)
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0)
    run_until([a, b], Link(), lambda: c.state == T.ESTABLISHED, now=0.0)
    assert c.send(b"z" * 300_000, 1.0) == 100_000
    assert c.send(b"more", 1.0) == 0


def test_rto_backs_off_then_times_out():
    a, b = pair()
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0)
    app = App(a, b, c, b"q" * 10_000)
    run_until([a, b], Link(), lambda: len(app.got["b"]) == 10_000, now=0.0, on_step=app.step)
    dead = Link(loss=1.0)
    c.send(b"lost forever", 1.0)
    a.poke(c)
    rtos = []
    def step(now):
        rtos.append(c.rto)
    run_until([a, b], dead, lambda: c.state == T.CLOSED, now=1.0, on_step=step, limit=4000)
    assert c.error == "timeout"
    assert max(rtos) == T.RTO_MAX and min(r for r in rtos if r > 0) < 1.0
    assert a.counters["tcp_rto"] >= T.DATA_RETRIES


def test_syn_retries_then_timeout():
    a, b = pair()
    c = a.tcp_connect(B, 80, 0.0)
    run_until([a, b], Link(loss=1.0), lambda: c.state == T.CLOSED, now=0.0, limit=1000)
    assert c.error == "timeout" and a.counters["tcp_rto"] == T.SYN_RETRIES + 1


def test_connect_deadline_ends_an_unanswered_open_on_the_stack_timer():
    a, b = pair()
    c = a.tcp_connect(B, 80, 0.0, timeout=2.5)
    assert a.next_deadline() == 1.0                  # the first SYN retransmission comes first
    end = run_until([a, b], Link(loss=1.0), lambda: c.state == T.CLOSED, now=0.0, limit=100)
    assert end == 2.5 and c.error == "dial_timeout" and a.counters["tcp_rto"] == 1
    assert any(e == (T.EV_ERROR, "dial_timeout") for e in c.take_events())
    assert not a.conns and a.next_deadline() is None


def test_connect_deadline_is_dropped_once_established():
    a, b = pair()
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0, timeout=5.0)
    run_until([a, b], Link(), lambda: c.state == T.ESTABLISHED, now=0.0)
    assert c.connect_by is None
    assert c.next_deadline() is None or c.next_deadline() < 5.0 or c.rto_at is not None


def test_connect_deadline_in_simultaneous_open_resets_the_peer():
    a, _ = pair()
    c = a.tcp_connect(B, 80, 0.0, timeout=3.0)
    a.packets_to_send()
    # the peer's own SYN to our port crosses ours: SYN_RECEIVED, then nothing more
    syn = W.Packetizer(ipaddress.ip_address(B).packed, ipaddress.ip_address(A).packed,
                       80, c.key[3]).build(5000, 0, W.SYN, 65535)
    a.receive_packet(syn, 0.5)
    assert c.state == T.SYN_RECEIVED
    a.packets_to_send()
    a.handle_timer(3.0)
    assert c.state == T.CLOSED and c.error == "dial_timeout"
    out = [W.unpack_header(p, ip.parse(p)[4]) for p in a.packets_to_send()]
    assert any(h[4] & W.RST for h in out)


def test_listener_backlog_bounds_half_open_connections():
    a, b = pair()
    b.tcp_listen(80, backlog=4)
    for i in range(10):
        a.tcp_connect(B, 80, 0.0)
    for p in a.packets_to_send():
        b.receive_packet(p, 0.0)
    assert len(b.conns) == 4 and b.counters["tcp_backlog_drop"] == 6


def test_icmp_echo_and_udp_port_unreachable():
    a, b = pair()
    echo = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"
    echo = echo[:2] + C.checksum(echo).to_bytes(2, "big") + echo[4:]
    src, dst = ipaddress.ip_address(A).packed, ipaddress.ip_address(B).packed
    b.receive_packet(ip.build_v4(src, dst, 1, len(echo)) + echo, 0.0)
    (reply,) = b.packets_to_send()
    r = ip.parse(reply)
    assert r[1] == dst and r[2] == src and reply[r[4]] == 0 and C.checksum(reply[r[4]:]) == 0
    # UDP to a closed port: ICMP port unreachable, which the sender's socket reports as refused
    sock = a.udp_bind()
    sock.sendto(b"hi", (B, 9999))
    for p in a.packets_to_send():
        b.receive_packet(p, 0.0)
    for p in b.packets_to_send():
        a.receive_packet(p, 0.0)
    assert sock.error == "refused"


def test_udp_round_trip_v4_v6():
    a, b = pair()
    sb = b.udp_bind(53)
    sa = a.udp_bind()
    for dst in (B, "fd00::2"):
        sa.sendto(b"q" * 300, (dst, 53))
        for p in a.packets_to_send():
            b.receive_packet(p, 0.0)
        data, addr = sb.recvfrom()
        assert data == b"q" * 300 and addr[1] == sa.port
        sb.sendto(b"answer", addr)
        for p in b.packets_to_send():
            a.receive_packet(p, 0.0)
        assert sa.recvfrom() == (b"answer", (dst, 53))


def test_ephemeral_ports_do_not_collide():
    a, b = pair()
    ports = {a.tcp_connect(B, 80, 0.0).key[3] for _ in range(2000)}
    assert len(ports) == 2000 and all(49152 <= p <= 65535 for p in ports)


def test_ephemeral_ports_go_round_and_skip_ports_in_use():
    a, _ = pair()
    a._next_port = 16383                             # the last port of the range
    first = a.tcp_connect(B, 80, 0.0).key[3]
    assert first == 65535
    a.udp_bind(49152)                                # the next one is taken by UDP
    assert a.tcp_connect(B, 80, 0.0).key[3] == 49153
    ports = [a.tcp_connect(B, 80, 0.0).key[3] for _ in range(3)]
    assert ports == [49154, 49155, 49156]
    # the same port again only for another destination, never for a live 4-tuple
    a._next_port = 1
    assert a.tcp_connect(B, 81, 0.0).key[3] == 49153
    assert a.tcp_connect(B, 80, 0.0).key[3] == 49157


def test_isn_is_keyed_and_advances_with_time():
    a, _ = pair()
    k = (b"\x01" * 4, 1, b"\x02" * 4, 2)
    assert a._isn(k, 0.0) != a._isn((b"\x01" * 4, 1, b"\x02" * 4, 3), 0.0)
    assert (a._isn(k, 1.0) - a._isn(k, 0.0)) % 2**32 == 250000


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=120))
def test_checksum_matches_rfc1071(data):
    assert C.checksum(data) == C.reference_checksum(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**40), st.integers(-2**31 + 1, 2**31 - 1))
def test_unwrap_inverts_wraparound(ref, delta):
    v = ref + delta
    if v >= 0:
        assert T.unwrap(ref, v & 0xFFFFFFFF) == v


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0x1FF),
                          st.integers(0, 65535), st.binary(max_size=40), st.binary(max_size=3000)),
                max_size=30))
def test_random_segments_never_raise(segments):
    a, b = pair()
    b.tcp_listen(80)
    c = a.tcp_connect(B, 80, 0.0)
    run_until([a, b], Link(), lambda: c.state == T.ESTABLISHED, now=0.0)
    legal = {T.CLOSED, T.SYN_SENT, T.SYN_RECEIVED, T.ESTABLISHED, T.FIN_WAIT_1, T.FIN_WAIT_2,
             T.CLOSE_WAIT, T.CLOSING, T.LAST_ACK, T.TIME_WAIT}
    for i, (seq, ack, flags, win, opts, payload) in enumerate(segments):
        if i % 3 == 0:   # sometimes near the real sequence numbers
            seq, ack = (c.rcv_nxt + seq % 5000) & T.M32, (c.snd_una + ack % 5000) & T.M32
        c.receive_segment(seq, ack, flags, win, opts, payload, 1.0 + i)
        assert c.state in legal
    a.handle_timer(10_000.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_packets_into_the_stack_are_counted(data):
    a, _ = pair()
    a.receive_packet(data, 0.0)
    a.receive_packet(b"\x45" + data, 0.0)
    a.receive_packet(b"\x60" + data, 0.0)
    assert sum(a.counters.values()) >= 1


def test_syn_to_a_host_with_a_known_rtt_is_retransmitted_after_that_rto_not_1_s():
    """A lost SYN-ACK (the soak saw them dropped in a busy peer's TUN queue) cost every new
    connection the 1 s initial RTO; a host whose RTT an earlier connection measured gets its
    SYN retransmitted after that connection's RTO (floored at RTO_MIN) instead."""
    a, b = pair()
    b.tcp_listen(80)
    first = a.tcp_connect(B, 80, 0.0)
    assert first.rto == T.RTO_INITIAL                      # nothing known about B yet
    app = App(a, b, first, b"q" * 5000, b"r" * 5000)
    run_until([a, b], Link(), lambda: first.key not in a.conns, now=0.0, on_step=app.step, limit=600)
    srtt, rttvar = a.rtt_cache[ipaddress.ip_address(B).packed]
    assert srtt == first.srtt and 0 < srtt < 0.1

    second = a.tcp_connect(B, 80, 100.0)
    assert second.rto == max(srtt + 4 * rttvar, T.RTO_MIN) < T.RTO_INITIAL
    a.packets_to_send()                                    # the first SYN is lost
    a.handle_timer(100.0 + second.rto)
    again = a.packets_to_send()
    assert len(again) == 1 and a.counters["tcp_rto_syn"] == 1
    for p in again:
        b.receive_packet(p, 100.0 + second.rto)
    for p in b.packets_to_send():
        a.receive_packet(p, 100.0 + second.rto)
    assert second.state == T.ESTABLISHED
    assert a.tcp_connect("10.0.0.3", 80, 100.0).rto == T.RTO_INITIAL   # another host: 1 s


def test_rtt_cache_is_bounded():
    from tsproxy.netstack import stack as S
    a, _ = pair()
    for i in range(S.RTT_CACHE_HOSTS + 10):
        c = a.tcp_connect(f"10.1.{i // 250}.{i % 250 + 1}", 80, 0.0)
        c.srtt, c.rttvar = 0.01, 0.005
        c.abort(0.0)
        a.poke(c)
    assert len(a.rtt_cache) == S.RTT_CACHE_HOSTS
    assert ipaddress.ip_address("10.1.0.1").packed not in a.rtt_cache       # the oldest went
