"""The receive budget shared by a stack's TCP connections (tcp_budget.py), sans-IO: the
arithmetic of shares, floors and waiters, and whole stacks whose many connections must
stay within one budget while every transfer completes byte-exact."""

import random

import pytest

from tsproxy.netstack import tcp as T
from tsproxy.netstack.stack import Stack
from tsproxy.netstack.tcp_budget import ReceiveBudget
from tsproxy.testing.link import Link, run_until


class Conn:
    """Stands in for a connection: the budget only keeps `budget_held` on it."""


def members(b, n):
    cs = [Conn() for _ in range(n)]
    for c in cs:
        b.attach(c)
    return cs


def test_share_divides_the_total_but_never_below_the_floor():
    b = ReceiveBudget(100_000, floor=4_000)
    members(b, 4)
    assert b.share() == 25_000
    members(b, 96)
    assert b.members == 100 and b.share() == 4_000


def test_grant_is_bounded_by_share_then_by_what_is_left():
    b = ReceiveBudget(100_000, floor=1_000)
    x, y = members(b, 2)
    assert b.grant(x, 0, 80_000) == 50_000              # its share
    b.set_held(x, 50_000)
    assert b.grant(x, 50_000, 10_000) == 0              # at its share: no more
    assert b.waiting() == 0                             # ...and not a waiter: its own reads free it
    assert b.grant(y, 0, 30_000) == 30_000
    b.set_held(y, 30_000)
    assert b.available() == 20_000


def test_spent_budget_queues_waiters_and_hands_them_back_in_order():
    b = ReceiveBudget(30_000, floor=1_000)
    a, c, d = members(b, 3)
    b.set_held(a, 10_000)
    b.set_held(c, 10_000)
    b.set_held(d, 10_000)
    assert b.available() == 0
    # all hold their share; shares shrink when more join, so d2 and d3 find nothing left
    d2, d3 = members(b, 2)
    assert b.grant(d2, 0, 5_000) == 1_000               # the floor, never a closed window
    b.set_held(d2, 1_000)
    assert b.grant(d3, 0, 5_000) == 1_000
    b.set_held(d3, 1_000)
    assert b.grant(d2, 1_000, 4_000) == 0 and b.waiting() == 2
    assert b.take_ready() == []                         # nothing returned yet
    b.set_held(a, 0)                                    # a's application read everything
    assert b.take_ready() == [d2, d3]                   # queued by their first short grants
    assert b.waiting() == 0


def test_waiters_are_served_oldest_first():
    b = ReceiveBudget(10_000, floor=0)
    full, w1, w2 = members(b, 3)
    b.set_held(full, 10_000)
    assert b.grant(w1, 0, 100) == 0 and b.grant(w2, 0, 100) == 0
    assert b.grant(w1, 0, 100) == 0 and b.waiting() == 2     # queued once
    b.set_held(full, 9_000)
    assert b.take_ready() == [w1, w2]
    assert b.wakeups == 2


def test_detach_returns_everything_and_forgets_the_waiter():
    b = ReceiveBudget(10_000, floor=0)
    x, y = members(b, 2)
    b.set_held(x, 10_000)
    assert b.grant(y, 0, 100) == 0 and b.waiting() == 1
    b.detach(y)
    b.detach(x)
    assert b.used == 0 and b.members == 0 and b.waiting() == 0
    assert b.take_ready() == []
    b.set_held(x, 5)                                    # late calls on a closed one: ignored
    b.detach(x)
    assert b.used == 0 and b.members == 0


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError):
        ReceiveBudget(0)
    with pytest.raises(ValueError):
        ReceiveBudget(10, floor=-1)


# ---------------------------------------------------------------- whole stacks

def many_downloads(n, size, total, *, loss=0.0, read_every=1, seed=1, floor=2048):
    """n connections from stack a, each downloading `size` bytes served by stack b; a's
    receive budget is `total`.  Returns (a, conns, max_used, max_invited, now)."""
    a = Stack(["10.0.0.1"], mtu=1420, now=0.0, rcv_budget=total)
    a.budget.floor = floor
    b = Stack(["10.0.0.2"], mtu=1420, now=0.0, rcv_budget=None)
    b.tcp_listen(80)
    rnd = random.Random(seed)
    data = rnd.randbytes(size)
    conns = [a.tcp_connect("10.0.0.2", 80, 0.0) for _ in range(n)]
    got = {c: bytearray() for c in conns}
    served = {}
    st = {"max_used": 0, "max_invited": 0, "steps": 0}

    def step(now):
        for conn in b.take_touched():
            if conn.passive and conn.state == T.ESTABLISHED and conn not in served:
                served[conn] = 0
        a.take_touched()
        for conn, off in list(served.items()):
            if off < size:
                k = conn.send(memoryview(data)[off:off + 65536], now)
                served[conn] = off + k
                if served[conn] == size:
                    conn.shutdown_write(now)
                b.poke(conn)
        st["steps"] += 1
        if st["steps"] % read_every == 0:
            for c in conns:
                d = c.recv(1 << 20, now)
                if d:
                    got[c] += d
                    a.poke(c)
        invited = sum(max(0, c.rcv_adv - c.rcv_nxt) + len(c.rcv_buf) for c in conns
                      if c.state in (T.ESTABLISHED,))
        st["max_invited"] = max(st["max_invited"], invited)
        st["max_used"] = max(st["max_used"], a.budget.used)

    link = Link(delay=0.002, loss=loss, seed=seed)
    now = run_until([a, b], link, lambda: all(len(got[c]) == size for c in conns),
                    now=0.0, on_step=step, limit=600)
    for c in conns:
        assert bytes(got[c]) == data
    return a, conns, st["max_used"], st["max_invited"], now


def test_many_connections_stay_within_one_budget_and_all_complete():
    total, n = 128 * 1024, 40
    a, conns, max_used, max_invited, _ = many_downloads(n, 60_000, total)
    bound = total + n * a.budget.floor                  # floors are the only overdraft
    assert max_used <= bound
    assert max_invited <= bound
    assert a.budget.wakeups > 0                         # waiters were handed room back
    assert a.counters["tcp_zero_window_drop"] == 0      # the budget never closed a window
    assert a.counters["tcp_rx_beyond_window"] == 0


def test_without_the_budget_the_same_load_invites_far_more():
    # the control for the test above: the bound there is the budget's doing
    _, _, _, max_invited, _ = many_downloads(40, 60_000, 1 << 40)
    assert max_invited > 4 * (128 * 1024 + 40 * 2048)


def test_a_slow_reader_under_a_small_budget_still_completes_without_loss():
    a, conns, max_used, _, _ = many_downloads(12, 100_000, 48 * 1024, loss=0.01, read_every=7,
                                              seed=3)
    assert max_used <= 48 * 1024 + 12 * a.budget.floor


def test_budget_is_returned_when_connections_close():
    a, conns, _, _, now = many_downloads(8, 20_000, 64 * 1024)
    for c in conns:
        c.close(now)
        a.poke(c)
    assert all(c.state in (T.CLOSED, T.TIME_WAIT, T.LAST_ACK) for c in conns)
    b = a.budget
    assert b.used == sum(c.budget_held or 0 for c in conns if c.budget_held is not None)


def test_without_a_budget_windows_are_the_buffers():
    a = Stack(["10.0.0.1"], mtu=1420, now=0.0, rcv_budget=None)
    c = a.tcp_connect("10.0.0.2", 80, 0.0)
    assert a.budget is None and c.budget is None


# ---------------------------------------------------------------- the send quota

def test_send_quota_bounds_new_data_per_flush_and_resumes_parked_senders():
    burst, n, size = 6, 5, 80_000
    a = Stack(["10.0.0.1"], mtu=1420, now=0.0, tx_burst=burst)
    b = Stack(["10.0.0.2"], mtu=1420, now=0.0, tx_burst=None)
    b.tcp_listen(80)
    conns = [a.tcp_connect("10.0.0.2", 80, 0.0) for _ in range(n)]
    rnd = random.Random(5)
    data = {c: rnd.randbytes(size) for c in conns}
    sent = {c: 0 for c in conns}
    got = {}
    per_flush = []
    flush = a.packets_to_send

    def counted():
        out = flush()
        per_flush.append(sum(1 for p in out if len(p) > 40))   # segments that carry data
        return out
    a.packets_to_send = counted

    def step(now):
        for conn in b.take_touched():
            if conn.passive:
                got.setdefault(conn, bytearray())
        a.take_touched()
        for c in conns:
            if c.state == T.ESTABLISHED and sent[c] < size:
                sent[c] += c.send(memoryview(data[c])[sent[c]:], now)
                a.poke(c)
        for conn, buf in got.items():
            d = conn.recv(1 << 20, now)
            if d:
                buf += d
                b.poke(conn)

    run_until([a, b], Link(delay=0.002, seed=2), lambda: len(got) == n and all(
        len(v) == size for v in got.values()), now=0.0, on_step=step, limit=600)
    assert sorted(bytes(v) for v in got.values()) == sorted(data.values())
    assert max(per_flush) <= burst                      # no retransmissions on this link
    assert a.tx_gate.parks > 0                          # the quota did hold senders back


def test_send_quota_refuses_a_nonsense_burst():
    from tsproxy.netstack.tcp_budget import SendQuota
    with pytest.raises(ValueError):
        SendQuota(0)
