import itertools

from hypothesis import given, settings, strategies as st

from tsproxy.magicsock import paths
from tsproxy.magicsock.paths import PeerPaths, better_addr


def counter_rng():
    c = itertools.count()
    return lambda n: next(c).to_bytes(n, "big")


def prove(p, addr, now, latency=0.01):
    """Answer every outstanding ping to addr after `latency`."""
    pings = p.take_pings()
    matched = False
    for a, txid in pings:
        if a == addr:
            matched |= p.on_pong(txid, a, now + latency)
    return matched


def test_derp_until_a_pong_proves_the_direct_path():
    p = PeerPaths(home_derp=900, endpoints=[("10.0.0.2", 41641)], rng=counter_rng())
    udp, region = p.send_plan(0.0)
    assert (udp, region) == (None, 900)              # nothing proven: DERP carries it
    pings = p.take_pings()
    assert [a for a, _ in pings] == [("10.0.0.2", 41641)]
    assert p.take_call_me_maybe() is True            # and the peer is asked to ping us
    assert p.on_pong(pings[0][1], ("10.0.0.2", 41641), 0.02)
    assert p.send_plan(0.03) == (("10.0.0.2", 41641), 0)   # trusted: UDP only
    assert p.best_latency == 0.02


def test_trust_expires_then_both_paths_until_re_proven():
    p = PeerPaths(home_derp=900, endpoints=[("10.0.0.2", 1)], rng=counter_rng())
    p.send_plan(0.0)
    prove(p, ("10.0.0.2", 1), 0.0)
    t = paths.TRUST_UDP_ADDR_DURATION + 1
    udp, region = p.send_plan(t)
    assert udp == ("10.0.0.2", 1) and region == 900   # untrusted best: send both ways
    # a pong re-establishes exclusive UDP
    assert prove(p, ("10.0.0.2", 1), t)
    assert p.send_plan(t + 0.1) == (("10.0.0.2", 1), 0)


def test_heartbeat_keeps_the_path_and_lost_pongs_fall_back_to_derp():
    p = PeerPaths(home_derp=7, endpoints=[("192.0.2.1", 5)], rng=counter_rng())
    now = 0.0
    p.send_plan(now)
    prove(p, ("192.0.2.1", 5), now)
    # traffic keeps flowing with heartbeats answered: never leaves UDP
    for _ in range(10):
        now = p.next_deadline()
        p.handle_timer(now)
        assert prove(p, ("192.0.2.1", 5), now)
        assert p.send_plan(now + 0.05) == (("192.0.2.1", 5), 0)
    # the direct path goes dark: pongs stop, trust runs out, the best is dropped
    for _ in range(20):
        now = p.next_deadline()
        p.handle_timer(now)
        p.take_pings()
        p.send_plan(now)
    assert p.best is None and p.counters["ping_timeouts"] > 0
    assert p.send_plan(now) == (None, 7)


def test_heartbeats_stop_when_idle():
    p = PeerPaths(home_derp=1, endpoints=[("10.1.1.1", 2)], rng=counter_rng())
    p.send_plan(0.0)
    prove(p, ("10.1.1.1", 2), 0.0)
    now = 0.0
    while (d := p.next_deadline()) is not None and d < 200:
        now = d
        p.handle_timer(now)
        prove(p, ("10.1.1.1", 2), now)
    assert p.next_heartbeat is None and now < paths.SESSION_ACTIVE_TIMEOUT + 10


def test_call_me_maybe_resets_timers_and_ignores_link_local():
    p = PeerPaths(home_derp=1, rng=counter_rng())
    p.on_call_me_maybe([("10.2.0.1", 9), ("fe80::1", 9), ("bogus", 1)], 100.0)
    assert [a for a, _ in p.take_pings()] == [("10.2.0.1", 9)]
    assert p.take_call_me_maybe() is False           # answering a CMM sends no CMM back
    p.on_call_me_maybe([("10.2.0.1", 9)], 101.0)      # within 5 s, but CMM forces a new ping
    assert [a for a, _ in p.take_pings()] == [("10.2.0.1", 9)]


def test_unknown_or_misdirected_pongs_are_counted_not_trusted():
    p = PeerPaths(home_derp=1, endpoints=[("10.0.0.2", 1)], rng=counter_rng())
    p.send_plan(0)
    (addr, txid), = p.take_pings()
    assert not p.on_pong(b"x" * 12, addr, 0.1)
    assert not p.on_pong(txid, ("10.9.9.9", 1), 0.1)
    assert p.best is None and p.counters["pongs_unknown"] == 2


def test_netmap_endpoints_replace_old_ones():
    p = PeerPaths(endpoints=[("10.0.0.1", 1), ("10.0.0.2", 2)])
    p.on_ping_from(("203.0.113.5", 7), 0)
    p.set_endpoints([("10.0.0.2", 2), ("10.0.0.3", 3)])
    assert set(p.candidates) == {("10.0.0.2", 2), ("10.0.0.3", 3), ("203.0.113.5", 7)}


def test_better_addr_rules():
    assert better_addr(("10.0.0.1", 1), 0.05, None, None)
    assert better_addr(("1.2.3.4", 1), 0.010, ("5.6.7.8", 1), 0.050)   # much faster
    assert not better_addr(("1.2.3.4", 1), 0.0499, ("5.6.7.8", 1), 0.050)  # hysteresis
    assert better_addr(("10.0.0.1", 1), 0.050, ("1.2.3.4", 1), 0.050)     # private bonus
    assert better_addr(("127.0.0.1", 1), 0.050, ("10.0.0.1", 1), 0.040)       # loopback bonus wins


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "timer", "pong", "cmm", "ping"]),
                          st.floats(0, 20)), max_size=60))
def test_random_event_sequences_keep_invariants(events):
    p = PeerPaths(home_derp=3, endpoints=[("10.0.0.1", 1), ("10.0.0.2", 2)], rng=counter_rng())
    now = 0.0
    for kind, dt in events:
        now += dt
        if kind == "send":
            udp, region = p.send_plan(now)
            assert udp is not None or region == 3
            if region == 0:
                assert udp == p.best and now <= p.trust_until
        elif kind == "timer":
            d = p.next_deadline()
            if d is not None and d <= now:
                p.handle_timer(now)
        elif kind == "pong":
            for a, txid in p.take_pings():
                p.on_pong(txid, a, now)
        elif kind == "cmm":
            p.on_call_me_maybe([("10.0.0.3", 3)], now)
        else:
            p.on_ping_from(("10.0.0.4", 4), now)
        assert len(p.pings) <= paths.MAX_OUTSTANDING_PINGS
        assert len(p.candidates) <= paths.MAX_CANDIDATES
