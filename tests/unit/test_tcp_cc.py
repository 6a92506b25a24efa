"""Congestion controllers (tsproxy/netstack/tcp_cc.py) alone and inside a connection."""

from types import SimpleNamespace

import pytest

from tsproxy.netstack.tcp_cc import Cubic, NewReno

from tests.unit.test_tcp_engine import Pair, connect, run


def conn(cwnd, flight, mss=1000, ssthresh=1 << 40):
    return SimpleNamespace(mss=mss, cwnd=cwnd, ssthresh=ssthresh, snd_una=0, snd_max=flight)


def test_newreno_slow_start_avoidance_and_reductions():
    cc, c = NewReno(), conn(10_000, 10_000)
    for _ in range(5):
        cc.on_ack(c, 2000, 0.0)
    assert c.cwnd == 20_000                          # +min(acked, 2 MSS) per ACK
    cc.on_ack(c, 10_000, 0.0)
    assert c.cwnd == 22_000                          # L = 2 caps one stretch ACK
    c.snd_max = 22_000
    cc.on_congestion(c, 0.0)
    assert c.ssthresh == c.cwnd == 11_000
    for _ in range(11):                              # one cwnd's worth of ACKs: +1 MSS
        cc.on_ack(c, 1000, 0.0)
    assert c.cwnd == 12_000
    cc.on_rto(c, 0.0)
    assert c.cwnd == 1000 and c.ssthresh == 11_000


def test_cubic_reduces_by_beta_and_regrows_concave_then_convex():
    cc, c = Cubic(), conn(1_000_000, 1_000_000)
    cc.on_congestion(c, 0.0)
    assert c.cwnd == c.ssthresh == 700_000 and cc.w_max == 1000
    k = (300 / Cubic.C) ** (1 / 3)                   # ~9.1 s back to W_max
    rtt, t, seen = 0.05, 0.0, {}
    while t < 2 * k:
        t += rtt
        c.snd_max = c.cwnd
        cc.on_ack(c, c.cwnd, t)                      # one cwnd acknowledged per RTT
        seen[round(t / rtt)] = c.cwnd
    at = lambda s: seen[round(s / rtt)]
    assert abs(at(k) - 1_000_000) < 20_000           # plateau at the old maximum after K
    assert at(k / 2) - at(0.1) > at(k) - at(k / 2)   # concave: fast first, slow near W_max
    assert at(2 * k) - at(1.5 * k) > at(1.5 * k) - at(k)   # convex probing beyond W_max
    assert at(2 * k) > 1_100_000


def test_cubic_reno_friendly_region_dominates_small_windows_at_short_rtt():
    cc, c = Cubic(), conn(100_000, 100_000)
    cc.on_congestion(c, 0.0)
    t = 0.0
    for _ in range(84):                              # ~K seconds at 50 ms RTT
        t += 0.05
        cc.on_ack(c, c.cwnd, t)
    # W_est grows 3(1-b)/(1+b) ~ 0.53 segment per RTT: 70 + 84 * 0.53 ~ 114 segments
    assert 110_000 < c.cwnd < 118_000


def test_cubic_fast_convergence_lowers_w_max_on_a_falling_plateau():
    cc, c = Cubic(), conn(100_000, 100_000)
    cc.on_congestion(c, 0.0)
    c.cwnd = 80_000
    c.snd_max = 80_000
    cc.on_congestion(c, 1.0)
    assert cc.w_max == pytest.approx(80 * (1 + Cubic.BETA) / 2)
    assert c.cwnd == 56_000


def test_cubic_rto_collapses_to_one_segment():
    cc, c = Cubic(), conn(50_000, 50_000)
    cc.on_rto(c, 0.0)
    assert c.cwnd == 1000 and c.ssthresh == 35_000


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cc", [NewReno, Cubic])
def test_transfer_with_each_controller_over_loss(cc):
    p = connect(Pair(a_kw={"cc": cc()}, b_kw={"cc": cc()}))
    data = bytes(range(251)) * 4000                  # ~1 MB
    got, sent, n = bytearray(), [0], [0]

    def each(now):
        if sent[0] < len(data):
            sent[0] += p.a.send(data[sent[0]:], now)
        got.extend(p.b.recv(1 << 20, now))

    def drop(side, seg):
        n[0] += 1
        return n[0] % 29 == 0

    run(p, lambda: len(got) == len(data), 0.0, drop=drop, each=each)
    assert bytes(got) == data
    assert p.a.cc.name == cc.name and p.a.counters["tcp_fast_recovery"] > 0
    assert p.a.ssthresh < 1 << 40
