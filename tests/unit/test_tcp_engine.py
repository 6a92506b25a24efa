"""TcpConnection driven directly (no Stack): two connections wired back to back through a
segment decoder, so each test controls exactly which segment arrives in which state."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from tsproxy.netstack import tcp as T
from tsproxy.netstack.wire import tcp as W

_HDR = struct.Struct("!HHIIHHHH")
A_IP, B_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
LEGAL = {T.CLOSED, T.SYN_SENT, T.SYN_RECEIVED, T.ESTABLISHED, T.FIN_WAIT_1, T.FIN_WAIT_2,
         T.CLOSE_WAIT, T.CLOSING, T.LAST_ACK, T.TIME_WAIT}


def decode(pkt):
    ih = (pkt[0] & 15) * 4
    _, _, seq, ack, offflags, win, _, _ = _HDR.unpack_from(pkt, ih)
    hl = (offflags >> 12) * 4
    return seq, ack, offflags & 0x1FF, win, bytes(pkt[ih + 20:ih + hl]), bytes(pkt[ih + hl:])


class Pair:
    """a (active, port 1000) <-> b (port 80); `wire` holds decoded segments in flight."""

    def __init__(self, iss_a=1000, iss_b=5000, a_kw=None, b_kw=None, mss=1000):
        self.out_a, self.out_b = [], []
        self.a = T.TcpConnection(self.out_a, W.Packetizer(A_IP, B_IP, 1000, 80), now=0.0,
                                 iss=iss_a, mss=mss, msl=1.0, **(a_kw or {}))
        self.b = T.TcpConnection(self.out_b, W.Packetizer(B_IP, A_IP, 80, 1000), now=0.0,
                                 iss=iss_b, mss=mss, msl=1.0, **(b_kw or {}))

    def take(self, side):
        out = self.out_a if side == "a" else self.out_b
        segs = [decode(p) for p in out]
        out.clear()
        return segs

    def feed(self, side, segs, now):
        conn = self.b if side == "a" else self.a        # segments *from* side go to the other
        for s in segs:
            conn.receive_segment(*s, now)

    def pump(self, now, drop=lambda side, seg: False):
        """Exchange until quiet; returns every segment delivered as (side, seg)."""
        log = []
        for _ in range(10_000):
            moved = False
            for side in ("a", "b"):
                for s in self.take(side):
                    moved = True
                    if not drop(side, s):
                        log.append((side, s))
                        self.feed(side, [s], now)
            if not moved:
                return log
        raise AssertionError("no quiescence")

    def established(self, now=0.0):
        self.b_listen()
        self.a.connect(now)
        self.pump(now)
        assert self.a.state == T.ESTABLISHED and self.b.state == T.ESTABLISHED
        return self

    def b_listen(self):
        self._listening = True

    def pump_syn(self, now):
        """Deliver a's SYN to b as a listener would (accept_syn)."""
        (seq, ack, flags, win, opts, payload), = self.take("a")
        assert flags == W.SYN
        self.b.accept_syn(seq, win, opts, now)


def connect(pair, now=0.0):
    pair.a.connect(now)
    pair.pump_syn(now)
    pair.pump(now)
    assert pair.a.state == T.ESTABLISHED and pair.b.state == T.ESTABLISHED
    return pair


def run(pair, cond, now, limit=600.0, drop=lambda side, seg: False, each=None):
    end = now + limit
    idle = 0
    while not cond():
        pair.pump(now, drop)
        if each is not None:
            each(now)
            pair.pump(now, drop)
        if cond():
            break
        ds = [d for d in (pair.a.next_deadline(), pair.b.next_deadline()) if d is not None]
        if not ds:
            idle += 1
            if idle > 3:
                raise AssertionError("stuck: no timers")
            continue                                 # let `each` (the app) run again
        idle = 0
        now = max(now, min(ds))
        if now > end:
            raise AssertionError("not done in time")
        for c in (pair.a, pair.b):
            d = c.next_deadline()
            if d is not None and d <= now:
                c.handle_timer(now)
    return now


# ------------------------------------------------------------------ handshake and options

def test_handshake_negotiates_mss_sack_and_window_scaling():
    p = Pair(mss=1400, b_kw={"wscale": 9})
    p.a.connect(0.0)
    (syn,) = p.take("a")
    opts = W.parse_options(syn[4])
    assert syn[2] == W.SYN and opts == {"mss": 1400, "sack_perm": True, "wscale": T.DEFAULT_WSCALE}
    p.b.accept_syn(*[syn[0], syn[3], syn[4]], 0.0)
    (synack,) = p.take("b")
    assert synack[2] == W.SYN | W.ACK and synack[1] == (1000 + 1)
    assert W.parse_options(synack[4])["wscale"] == 9
    p.feed("b", [synack], 0.0)
    p.pump(0.0)
    assert p.a.snd_wscale == 9 and p.a.rcv_wscale == T.DEFAULT_WSCALE
    assert p.b.snd_wscale == T.DEFAULT_WSCALE and p.b.rcv_wscale == 9
    assert p.a.sack_ok and p.b.sack_ok
    # the 4 MiB buffer is advertised through the scale factor, far above 65535
    assert p.b.snd_wnd > 1_000_000
    assert p.a.snd_wnd == 65535                     # a SYN-ACK's window is never scaled ...
    p.b.send(b"!", 0.1)
    p.pump(0.1)
    assert p.a.snd_wnd > 1_000_000                  # ... the next segment's is


def test_peer_without_window_scaling_or_sack_disables_both_sides():
    p = connect(Pair(a_kw={"wscale": None, "sack": False}))
    assert p.a.snd_wscale == p.a.rcv_wscale == p.b.snd_wscale == p.b.rcv_wscale == 0
    assert not p.a.sack_ok and not p.b.sack_ok
    assert p.b.snd_wnd <= 65535 and p.a.snd_wnd <= 65535
    # out-of-order data gets an immediate ACK, but without SACK blocks
    p.a.send(b"x" * 3000, 1.0)
    segs = p.take("a")
    assert len(segs) == 3
    p.feed("a", [segs[2]], 1.0)
    (ack,) = p.take("b")
    assert ack[1] == p.a.iss + 1 and ack[4] == b""


def test_peer_mss_is_respected_and_default_is_536():
    p = Pair(mss=1400)
    p.a.connect(0.0)
    p.take("a")
    p.b.accept_syn(77, 1000, b"", 0.0)          # SYN without options
    assert p.b.mss == 536 and not p.b.sack_ok and p.b.rcv_wscale == 0
    p2 = Pair(mss=1400)
    p2.a.connect(0.0)
    p2.take("a")
    p2.b.accept_syn(77, 1000, W.syn_options(600, None, False), 0.0)
    assert p2.b.mss == 600


def test_simultaneous_open():
    p = Pair()
    p.a.connect(0.0)
    p.b.connect(0.0)                                # b is active too (same 4-tuple)
    (syn_a,), (syn_b,) = p.take("a"), p.take("b")
    p.feed("a", [syn_a], 0.0)
    p.feed("b", [syn_b], 0.0)
    assert p.a.state == T.SYN_RECEIVED and p.b.state == T.SYN_RECEIVED
    p.pump(0.0)
    assert p.a.state == T.ESTABLISHED and p.b.state == T.ESTABLISHED
    p.a.send(b"hello", 0.1)
    p.pump(0.1)
    assert p.b.recv(100, 0.1) == b"hello"


def test_lost_syn_ack_is_retransmitted_and_connection_completes():
    p = Pair()
    p.a.connect(0.0)
    p.pump_syn(0.0)
    p.take("b")                                     # SYN-ACK lost
    now = run(p, lambda: p.a.state == T.ESTABLISHED and p.b.state == T.ESTABLISHED, 0.0, limit=10)
    assert 0.9 < now < 3.1                          # one RTO (1 s initial), maybe a second


# ------------------------------------------------------------------ sequence numbers

@pytest.mark.timeout(60)
def test_transfer_across_sequence_wraparound_with_loss():
    p = connect(Pair(iss_a=0xFFFFFFFF - 20_000, iss_b=0xFFFFFF00))
    data = bytes(range(256)) * 800                  # 204,800 bytes: wraps a's sequence space
    back = bytes(reversed(data))[:100_000]
    got_b, got_a, sent = bytearray(), bytearray(), [0, 0]
    n = [0]

    def each(now):
        if sent[0] < len(data):
            sent[0] += p.a.send(data[sent[0]:], now)
        if sent[1] < len(back):
            sent[1] += p.b.send(back[sent[1]:], now)
        got_b.extend(p.b.recv(1 << 20, now))
        got_a.extend(p.a.recv(1 << 20, now))

    def drop(side, seg):
        n[0] += 1
        return n[0] % 17 == 0                       # deterministic ~6% loss

    run(p, lambda: len(got_b) == len(data) and len(got_a) == len(back), 0.0, drop=drop, each=each)
    assert bytes(got_b) == data and bytes(got_a) == back
    assert p.a.snd_una > 0xFFFFFFFF                 # really crossed the wrap
    assert p.a.counters.get("tcp_retransmit", 0) > 0


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(-2**31 + 1, 2**31 - 1))
def test_unwrap_is_modular_and_nearest(ref, delta):
    got = T.unwrap(ref, (ref + delta) & T.M32)
    assert got == ref + delta
    assert got & T.M32 == (ref + delta) & T.M32


# ------------------------------------------------------------------ ACK generation

def test_delayed_ack_every_second_segment_or_40ms():
    p = connect(Pair())
    p.a.send(b"a" * 1000, 1.0)
    p.feed("a", p.take("a"), 1.0)
    assert p.take("b") == []                        # one segment: ACK delayed
    assert p.b.next_deadline() == pytest.approx(1.0 + T.DELACK)
    p.b.handle_timer(1.0 + T.DELACK)
    (ack,) = p.take("b")
    assert ack[1] == (p.a.iss + 1 + 1000) & T.M32
    p.a.send(b"b" * 2000, 2.0)
    segs = p.take("a")
    assert len(segs) == 2
    p.feed("a", segs, 2.0)
    (ack,) = p.take("b")                            # second full segment: ACK at once
    assert ack[1] == (p.a.iss + 1 + 3000) & T.M32


def test_out_of_order_segment_gets_immediate_ack_with_sack_block():
    p = connect(Pair())
    p.a.send(b"z" * 4000, 1.0)
    s1, s2, s3, s4 = p.take("a")
    p.feed("a", [s1, s3], 1.0)
    acks = p.take("b")
    assert acks, "out-of-order data must be acked at once"
    seq, ack, flags, win, opts, _ = acks[-1]
    assert ack == s2[0]
    assert W.parse_options(opts)["sack"] == [(s3[0], s3[0] + 1000)]
    p.feed("a", [s2], 1.0)                          # fills the hole: cumulative ACK at once
    (fill,) = p.take("b")
    assert fill[1] == s3[0] + 1000 and fill[4] == b""
    assert p.b.recv(10_000, 1.0) == b"z" * 3000


# ------------------------------------------------------------------ loss recovery / cc

def test_three_dupacks_trigger_fast_retransmit_and_halve_cwnd():
    p = connect(Pair(a_kw={"sack": False}))
    p.a.send(b"q" * 10_000, 1.0)
    segs = p.take("a")
    assert len(segs) == 10                          # initial window: 10 segments
    flight = p.a.snd_max - p.a.snd_una
    p.feed("a", segs[1:], 1.0)                      # first one lost
    dupacks = p.take("b")
    assert len(dupacks) >= 3 and all(d[1] == segs[0][0] for d in dupacks)
    p.feed("b", dupacks, 1.01)
    rtx = p.take("a")
    assert rtx[0][0] == segs[0][0] and rtx[0][5] == segs[0][5]     # the lost bytes again
    assert p.a.recovery == "fast" and p.a.ssthresh == flight // 2 and p.a.cwnd <= flight // 2 + 1000
    p.feed("a", rtx[:1], 1.02)
    p.feed("b", p.take("b"), 1.03)
    assert p.a.recovery is None and p.a.snd_una == p.a.snd_max
    assert p.b.recv(20_000, 1.1) == b"q" * 10_000


def test_slow_start_grows_cwnd_by_acked_bytes_then_rto_collapses_it():
    p = connect(Pair())
    p.a.send(b"s" * 200_000, 1.0)
    assert p.a.cwnd == 10 * 1000 and p.a.ssthresh == 1 << 40
    first = p.take("a")
    assert len(first) == 10                         # IW10
    p.feed("a", first, 1.05)
    acks = p.take("b")
    assert len(acks) == 5                           # one ACK per two full segments
    p.feed("b", acks, 1.1)
    assert p.a.cwnd == 20_000                       # +min(acked, 2*SMSS) per ACK: doubles per RTT
    second = p.take("a")
    assert sum(len(s[5]) for s in second) == 20_000
    p.feed("a", second, 1.15)
    p.feed("b", p.take("b"), 1.2)
    assert p.a.cwnd == 40_000
    # now every segment from a is lost: RTO, cwnd = 1 MSS, ssthresh = flight/2
    flight = p.a.snd_max - p.a.snd_una
    deadline = p.a.next_deadline()
    p.take("a")
    p.a.handle_timer(deadline)
    assert p.a.cwnd == p.a.mss and p.a.ssthresh == max(flight // 2, 2 * p.a.mss)
    (rtx,) = p.take("a")
    assert rtx[0] == p.a.snd_una & T.M32
    assert p.a.rto == pytest.approx(min(2 * max(T.RTO_MIN, p.a.rto / 2), T.RTO_MAX))


def test_rto_uses_200ms_floor_and_karn_skips_retransmitted_samples():
    p = connect(Pair())
    for i in range(20):
        t = 1.0 + i * 0.01
        p.a.send(b"k" * 1000, t)
        p.feed("a", p.take("a"), t + 0.001)
        p.b.handle_timer(t + 0.001 + T.DELACK)
        p.feed("b", p.take("b"), t + 0.002 + T.DELACK)
    assert p.a.srtt == pytest.approx(0.002 + T.DELACK, abs=0.005)
    assert p.a.rto == T.RTO_MIN                     # tiny RTT, 200 ms floor
    # a retransmitted segment's ACK must not produce an RTT sample (Karn)
    p.a.send(b"k" * 1000, 2.0)
    p.take("a")
    p.a.handle_timer(p.a.next_deadline())
    (rtx,) = p.take("a")
    srtt = p.a.srtt
    p.feed("a", [rtx], 9.0)
    p.b.handle_timer(9.0 + T.DELACK)
    p.feed("b", p.take("b"), 9.0 + T.DELACK)
    assert p.a.srtt == srtt


# ------------------------------------------------------------------ windows and probes

def test_zero_window_probe_is_answered_even_if_the_window_update_is_lost():
    p = connect(Pair(b_kw={"rcv_cap": 8000, "wscale": None}))
    p.a.send(b"w" * 20_000, 1.0)
    p.pump(1.0)
    assert p.a.snd_wnd == 0 and p.b.readable_bytes() == 8000
    # the reader drains, but the window update it triggers is lost
    assert p.b.recv(8000, 1.5) == b"w" * 8000
    assert p.take("b")                              # the update existed ...
    assert p.a.snd_wnd == 0                         # ... and never arrived
    got = bytearray(b"w" * 8000)
    now = run(p, lambda: len(got) == 20_000, 1.5,
              each=lambda now: got.extend(p.b.recv(1 << 20, now)), limit=60)
    assert got == b"w" * 20_000
    assert p.a.counters["tcp_zero_window_probe"] >= 1
    assert now < 1.5 + 5.0


def test_probe_below_rcv_nxt_elicits_an_ack():
    """RFC 9293 3.10.7.4: an unacceptable segment (keepalive/persist probe at RCV.NXT-1) is
    answered with an ACK carrying the current window."""
    p = connect(Pair())
    p.b.receive_segment((p.b.rcv_nxt - 1) & T.M32, p.b.snd_nxt & T.M32, W.ACK, 1000, b"", b"", 1.0)
    (ack,) = p.take("b")
    assert ack[2] == W.ACK and ack[1] == p.b.rcv_nxt & T.M32 and ack[3] > 0


def test_receive_buffer_bounds_what_is_accepted():
    p = connect(Pair(b_kw={"rcv_cap": 5000, "wscale": None}))
    assert p.a.snd_wnd == 5000
    p.a.send(b"r" * 9000, 1.0)
    segs = p.take("a")
    assert sum(len(s[5]) for s in segs) == 5000     # sender respects the window
    # a misbehaving sender pushing past the window: the excess is dropped and counted
    seq = (p.a.iss + 1 + 5000) & T.M32
    p.feed("a", segs, 1.0)
    p.b.receive_segment(seq, p.b.snd_nxt & T.M32, W.ACK, 1000, b"", b"x" * 1000, 1.0)
    assert p.b.readable_bytes() == 5000 and p.b.ooo_bytes == 0


def test_send_accepts_only_free_buffer_space():
    p = connect(Pair(a_kw={"snd_cap": 10_000}))
    assert p.a.send(b"1" * 25_000, 1.0) == 10_000
    assert p.a.send(b"2", 1.0) == 0 and p.a.send_space() == 0
    p.pump(1.0)
    p.b.handle_timer(1.0 + T.DELACK)
    p.pump(1.0 + T.DELACK)
    assert p.a.send_space() == 10_000


# ------------------------------------------------------------------ keepalive

def test_keepalive_is_off_by_default():
    p = connect(Pair())
    assert p.a.next_deadline() is None and p.b.next_deadline() is None


def test_keepalive_is_armed_when_the_connection_opens_on_both_sides():
    p = Pair(a_kw={"keepalive": 10.0}, b_kw={"keepalive": 20.0})
    p.a.connect(0.0)
    p.pump_syn(0.0)
    p.feed("b", p.take("b"), 0.25)
    p.feed("a", p.take("a"), 0.5)
    assert p.a.next_deadline() == pytest.approx(10.25) and p.b.next_deadline() == pytest.approx(20.5)


def test_segments_without_ack_and_unacceptable_segments_are_dropped_and_counted():
    p = connect(Pair())
    b = p.b
    b.receive_segment(b.rcv_nxt & T.M32, 0, W.PSH, 1000, b"", b"data", 1.0)
    assert b.counters["tcp_rx_no_ack"] == 1 and b.readable_bytes() == 0
    b.receive_segment((b.rcv_nxt + 2**31 - 1) & T.M32, b.snd_nxt & T.M32, W.ACK, 1000, b"", b"x", 1.0)
    assert b.counters["tcp_rx_unacceptable"] == 1 and b.readable_bytes() == 0


def test_keepalive_probes_keep_a_live_peer_and_detect_a_dead_one():
    p = connect(Pair(a_kw={"keepalive": 10.0}))
    p.b.send(b"hi", 0.5)
    p.pump(0.5)                                     # any received segment arms the timer
    p.a.handle_timer(0.5 + T.DELACK)                # (flush the delayed ACK for "hi")
    p.pump(0.5 + T.DELACK)
    assert p.a.next_deadline() == pytest.approx(10.5)
    now = 0.5
    for _ in range(5):                              # live peer: probes answered, stays up
        now = p.a.next_deadline()
        p.a.handle_timer(now)
        log = p.pump(now)
        assert any(side == "a" for side, _ in log) and any(side == "b" for side, _ in log)
    assert p.a.state == T.ESTABLISHED and p.a.keepalive_probes == 0
    # dead peer: unanswered probes, then error "timeout"
    while p.a.state != T.CLOSED:
        now = p.a.next_deadline()
        assert now is not None
        p.a.handle_timer(now)
        p.take("a")
    assert p.a.error == "timeout" and p.a.events[-1] == (T.EV_CLOSED, None)


# ------------------------------------------------------------------ close, RST, TIME-WAIT

def test_half_close_lets_data_flow_the_other_way():
    p = connect(Pair())
    p.a.shutdown_write(1.0)
    p.pump(1.0)
    assert p.a.state == T.FIN_WAIT_2 and p.b.state == T.CLOSE_WAIT and p.b.eof
    assert p.a.send(b"nope", 1.0) == 0
    p.b.send(b"still talking" * 1000, 1.1)
    p.pump(1.1)
    assert p.a.recv(1 << 20, 1.1) == b"still talking" * 1000
    p.b.close(1.2)
    p.pump(1.2)
    assert p.b.state == T.CLOSED and p.a.state == T.TIME_WAIT


def test_time_wait_reacks_retransmitted_fin_and_lasts_2msl():
    p = connect(Pair())
    p.a.close(1.0)
    p.pump(1.0)
    p.b.close(1.1)
    (fin,) = p.take("b")
    p.feed("b", [fin], 1.1)
    p.take("a")                                     # the last ACK is lost
    assert p.a.state == T.TIME_WAIT and p.b.state == T.LAST_ACK
    p.feed("b", [fin], 1.5)                         # b retransmits its FIN
    (ack,) = p.take("a")
    assert ack[2] == W.ACK and ack[1] == (fin[0] + 1) & T.M32
    p.feed("a", [ack], 1.5)
    assert p.b.state == T.CLOSED and p.b.error is None
    assert p.a.next_deadline() == pytest.approx(1.1 + 2 * 1.0)     # msl=1.0, not restarted
    p.a.handle_timer(3.0)
    assert p.a.state == T.TIME_WAIT
    p.a.handle_timer(3.1)
    assert p.a.state == T.CLOSED


def test_simultaneous_close_goes_through_closing():
    p = connect(Pair())
    p.a.close(1.0)
    p.b.close(1.0)
    (fa,), (fb,) = p.take("a"), p.take("b")
    p.feed("a", [fa], 1.0)
    p.feed("b", [fb], 1.0)
    assert p.a.state == T.CLOSING and p.b.state == T.CLOSING
    p.pump(1.0)
    assert p.a.state == T.TIME_WAIT and p.b.state == T.TIME_WAIT


def _drive_to(state):
    """A Pair whose `a` is in `state`; returns (pair, conn)."""
    p = Pair()
    if state == T.SYN_SENT:
        p.a.connect(0.0)
        p.take("a")
        return p, p.a
    if state == T.SYN_RECEIVED:
        p.a.connect(0.0)
        p.pump_syn(0.0)
        p.take("b")
        return p, p.b
    connect(p)
    if state == T.ESTABLISHED:
        return p, p.a
    if state == T.CLOSE_WAIT:
        p.b.close(1.0)
        p.pump(1.0)
        return p, p.a
    if state == T.LAST_ACK:
        p.b.close(1.0)
        p.pump(1.0)
        p.a.close(1.0)
        p.take("a")
        return p, p.a
    p.a.close(1.0)
    if state == T.FIN_WAIT_1:
        p.take("a")
        return p, p.a
    if state == T.CLOSING:
        p.b.close(1.0)
        _, fb = p.take("a"), p.take("b")
        p.feed("b", fb, 1.0)
        p.take("a")
        return p, p.a
    p.pump(1.0)
    if state == T.FIN_WAIT_2:
        return p, p.a
    p.b.close(1.0)
    p.pump(1.0)
    assert state == T.TIME_WAIT
    return p, p.a


ALL_STATES = [T.SYN_SENT, T.SYN_RECEIVED, T.ESTABLISHED, T.FIN_WAIT_1, T.FIN_WAIT_2, T.CLOSE_WAIT,
              T.CLOSING, T.LAST_ACK, T.TIME_WAIT]
SYNCHRONIZED_STATES = [s for s in ALL_STATES if s not in (T.SYN_SENT, T.SYN_RECEIVED)]
RST_RESULT = {T.SYN_SENT: "refused", T.SYN_RECEIVED: "refused", T.ESTABLISHED: "reset",
              T.FIN_WAIT_1: "reset", T.FIN_WAIT_2: "reset", T.CLOSE_WAIT: "reset",
              T.CLOSING: None, T.LAST_ACK: None, T.TIME_WAIT: None}


@pytest.mark.parametrize("state", ALL_STATES)
def test_rst_in_every_state(state):
    p, c = _drive_to(state)
    assert c.state == state
    if state == T.SYN_SENT:
        # RST must carry an acceptable ACK in SYN-SENT; a bare RST is ignored
        c.receive_segment(0, 0, W.RST, 0, b"", b"", 2.0)
        assert c.state == T.SYN_SENT
        c.receive_segment(0, (c.iss + 1) & T.M32, W.RST | W.ACK, 0, b"", b"", 2.0)
    else:
        # blind RST: in window but not exact -> challenge ACK, connection unharmed
        c.receive_segment((c.rcv_nxt + 100) & T.M32, 0, W.RST, 0, b"", b"", 2.0)
        assert c.state == state
        out = [decode(x) for x in c.out]
        c.out.clear()
        assert out and out[-1][2] & W.ACK and not out[-1][2] & W.RST
        assert out[-1][1] == c.rcv_nxt & T.M32
        # out of window -> silently dropped
        c.receive_segment((c.rcv_nxt + 2**30) & T.M32, 0, W.RST, 0, b"", b"", 2.0)
        assert c.state == state
        c.receive_segment(c.rcv_nxt & T.M32, 0, W.RST, 0, b"", b"", 2.0)
    assert c.state == T.CLOSED and c.error == RST_RESULT[state]
    assert c.next_deadline() is None
    assert c.events[-1] == (T.EV_CLOSED, None)


@pytest.mark.parametrize("state", SYNCHRONIZED_STATES)
def test_syn_in_synchronized_state_gets_challenge_ack(state):
    """RFC 5961 4.2: a SYN in a synchronized state is answered with a challenge ACK only."""
    p, c = _drive_to(state)
    c.receive_segment((c.rcv_nxt + 10) & T.M32, 0, W.SYN, 1000, b"", b"", 2.0)
    assert c.state == state
    out = [decode(x) for x in c.out]
    assert out and out[-1][2] == W.ACK and out[-1][1] == c.rcv_nxt & T.M32


def test_their_syn_again_in_syn_received_resends_our_syn_ack():
    """SYN_RECEIVED is not synchronized: a retransmitted SYN (seq == IRS) means our SYN-ACK
    was lost, so it is sent again; no challenge ACK."""
    p, c = _drive_to(T.SYN_RECEIVED)
    c.receive_segment(c.irs, 0, W.SYN, 1000, b"", b"", 2.0)
    assert c.state == T.SYN_RECEIVED
    out = [decode(x) for x in c.out]
    assert out and out[-1][2] == W.SYN | W.ACK and out[-1][1] == (c.irs + 1) & T.M32
    assert c.counters.get("tcp_challenge_ack", 0) == 0


def test_abort_sends_rst_and_peer_sees_reset():
    p = connect(Pair())
    p.a.abort(1.0)
    assert p.a.state == T.CLOSED and p.a.error is None
    p.pump(1.0)
    assert p.b.state == T.CLOSED and p.b.error == "reset"


def test_icmp_unreachable_fails_a_connect_but_only_marks_an_established_connection():
    p = Pair()
    p.a.connect(0.0)
    p.a.icmp_error("unreachable", 0.1)
    assert p.a.state == T.CLOSED and p.a.error == "unreachable"
    q = connect(Pair())
    q.a.icmp_error("unreachable", 1.0)
    assert q.a.state == T.ESTABLISHED


def test_isn_helper_is_keyed_and_advances_with_time():
    key = (A_IP, 1000, B_IP, 80)
    i1 = T.initial_sequence_number(b"s" * 16, key, 100.0)
    assert T.initial_sequence_number(b"s" * 16, key, 100.0) == i1
    assert T.initial_sequence_number(b"t" * 16, key, 100.0) != i1
    assert T.initial_sequence_number(b"s" * 16, (A_IP, 1001, B_IP, 80), 100.0) != i1
    assert (T.initial_sequence_number(b"s" * 16, key, 101.0) - i1) & T.M32 == 250_000
    assert 0 <= i1 <= T.M32


# ------------------------------------------------------------------ property: never raise

segment = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0x1FF),
                    st.integers(0, 65535), st.binary(max_size=44), st.binary(max_size=2000))


@pytest.mark.parametrize("state", ALL_STATES)
@settings(max_examples=60, deadline=None)
@given(segs=st.lists(st.tuples(st.booleans(), segment), max_size=25))
def test_random_segments_in_each_state_never_raise(state, segs):
    p, c = _drive_to(state)
    for i, (near, (seq, ack, flags, win, opts, payload)) in enumerate(segs):
        if near:
            seq = (c.rcv_nxt + seq % 3000 - 1000) & T.M32
            ack = (c.snd_una + ack % 3000 - 1000) & T.M32
        now = 2.0 + i
        c.receive_segment(seq, ack, flags, win, opts, payload, now)
        d = c.next_deadline()
        if d is not None and d <= now + 0.5:
            c.handle_timer(now + 0.5)
        assert c.state in LEGAL
        assert c.snd_una <= c.snd_max
        assert len(c.rcv_buf) + c.ooo_bytes <= c.rcv_cap
        for x in c.out:
            decode(x)
        c.out.clear()


def test_fin_lost_with_the_data_is_resent_in_rto_recovery_without_a_second_timeout():
    p = connect(Pair())
    p.a.send(b"f" * 3000, 1.0)
    p.a.shutdown_write(1.0)
    lost = p.take("a")
    assert lost[-1][2] & W.FIN and p.a.state == T.FIN_WAIT_1
    t = p.a.next_deadline()
    p.a.handle_timer(t)                             # RTO: first segment again
    assert p.a.counters["tcp_rto"] == 1
    for i in range(6):                              # a few clean round trips, no timer fires
        p.pump(t + 0.01 * (i + 1))
        for c in (p.a, p.b):
            if c.delack_at is not None:
                c.handle_timer(c.delack_at)
    assert p.b.state == T.CLOSE_WAIT and p.b.recv(10_000, 2.0) == b"f" * 3000
    assert p.a.state == T.FIN_WAIT_2 and p.a.counters["tcp_rto"] == 1


def test_out_of_order_queue_is_bounded_in_segments_and_runs_coalesce():
    p = connect(Pair(b_kw={"rcv_cap": 64 * 256, "wscale": None}))
    b = p.b
    base = b.rcv_nxt
    ack = b.snd_nxt & T.M32
    for k in range(1, 200):                         # 1-byte islands, one every other byte
        b.receive_segment((base + 2 * k) & T.M32, ack, W.ACK, 1000, b"", b"i", 1.0)
    assert len(b.ooo) == b.ooo_max == 64
    assert b.ooo_bytes == 64 and b.counters["tcp_ooo_queue_full"] == 199 - 64
    b.ooo.clear(), b.ooo_starts.clear()
    b.ooo_bytes = 0
    for k in range(1, 100):                         # a contiguous run behind one hole: one entry
        b.receive_segment((base + 10 * k) & T.M32, ack, W.ACK, 1000, b"", b"0123456789", 1.0)
    assert len(b.ooo) == 1 and b.ooo_bytes == 990
    b.receive_segment(base & T.M32, ack, W.ACK, 1000, b"", b"abcdefghij", 1.0)
    assert b.recv(1 << 20, 1.0) == b"abcdefghij" + b"0123456789" * 99 and not b.ooo


def test_sender_sack_scoreboard_is_bounded():
    p = connect(Pair())
    a = p.a
    a.send(b"s" * 10_000, 1.0)
    p.take("a")
    una = a.snd_una
    for k in range(0, 4999, 4):                     # 4 blocks per ACK, every other byte
        blocks = [((una + 2 * (k + m) + 1) & T.M32, (una + 2 * (k + m) + 2) & T.M32) for m in range(4)]
        a.receive_segment(a.rcv_nxt & T.M32, una & T.M32, W.ACK, a.snd_wnd >> a.snd_wscale,
                          W.sack_option(blocks), b"", 1.01)
    assert len(a.sacked) == T.MAX_SACKED_RANGES
    assert a.counters["tcp_sack_scoreboard_full"] > 0
    assert a.sacked_bytes == T.MAX_SACKED_RANGES


def test_receiver_sws_avoidance_small_reads_send_no_window_update():
    p = connect(Pair(b_kw={"rcv_cap": 20_000, "wscale": None}))
    p.a.send(b"v" * 30_000, 1.0)
    p.pump(1.0)
    assert p.a.snd_wnd == 0
    assert p.b.recv(500, 1.1) == b"v" * 500
    assert p.take("b") == []                        # 500 bytes of window is not worth a segment
    assert p.b.recv(1500, 1.2) == b"v" * 1500
    (upd,) = p.take("b")                            # 2 MSS opened: window update
    assert upd[2] == W.ACK and upd[3] == 2000


def test_rto_resends_a_short_segment_short_and_the_transfer_recovers():
    """Regression: the RTO used to resend a full MSS from SND.UNA although only a short
    (window-limited) segment was outstanding; the peer then acked beyond SND.MAX and every
    later ACK was ignored until the connection timed out."""
    p = connect(Pair(b_kw={"rcv_cap": 640, "wscale": None}))
    p.a.send(b"t" * 5000, 1.0)
    (short,) = p.take("a")
    assert len(short[5]) == 640
    p.a.handle_timer(p.a.next_deadline())
    (rtx,) = p.take("a")
    assert rtx[0] == short[0] and len(rtx[5]) == 640 and p.a.snd_max - p.a.snd_una == 640
    got = bytearray()
    run(p, lambda: len(got) == 5000, 3.0, each=lambda now: got.extend(p.b.recv(1 << 20, now)), limit=60)
    assert got == b"t" * 5000 and p.a.state == T.ESTABLISHED
