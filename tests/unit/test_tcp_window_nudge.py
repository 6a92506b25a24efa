"""A window update that reopens a window the sender could not send a full segment into is
re-sent when no data follows (tcp_recv.py), so one update lost in a congested peer's socket
costs a fraction of a second, not the sender's persist/RTO backoff; and the shared receive
budget never advertises a connection with an empty buffer less than its floor.  Sans-IO: two
stacks, packets moved (or dropped) by hand."""

from tests.netstack_pair import established_pair
from tsproxy.netstack.tcp_recv import WND_NUDGE_MAX, WND_NUDGE_TRIES
from tsproxy.netstack.wire import tcp as W

A, B = "10.0.0.1", "10.0.0.2"
MSS = 1380
SMALL = 4 * MSS                      # a's receive buffer: four segments


def established(rcv_buf=SMALL, **kw):
    return established_pair(dict(rcv_buf=rcv_buf, **kw), {})


def window_of(pkt) -> int:
    return W.unpack_header(pkt, 20)[5]


def fill_window(a, b, ca, cb, now):
    """b sends until a's window is closed; a's application has not read yet."""
    cb.send(bytes(64 * MSS), now)
    b.poke(cb)
    for _ in range(10):
        data = [p for p in b.packets_to_send() if len(p) > 40]
        if not data:
            break
        a.receive_packets(data, now)
        for p in a.packets_to_send():
            b.receive_packet(p, now)
    else:
        raise AssertionError("the window never closed")
    assert ca.rcv_adv - ca.rcv_nxt < ca.mss and ca.readable_bytes() > 0   # the sender is blocked


def advance(stack, now):
    d = stack.next_deadline()
    if d is not None and d <= now:
        stack.handle_timer(now)
    return stack.packets_to_send()


def test_a_lost_reopening_update_is_sent_again_and_the_transfer_resumes():
    a, b, ca, cb = established()
    fill_window(a, b, ca, cb, 0.0)
    assert len(ca.recv(1 << 20, 0.01)) > 0                      # the application reads...
    a.poke(ca)
    update = a.packets_to_send()
    assert update and window_of(update[-1]) << ca.rcv_wscale >= MSS   # ...and the window reopens
    # the update is lost; nothing arrives: within the nudge interval it goes out again
    assert advance(a, 0.01 + 0.05) == []
    again = advance(a, 0.01 + WND_NUDGE_MAX + 0.001)
    assert len(again) == 1 and window_of(again[0]) == window_of(update[-1])
    assert a.counters["tcp_window_update_resent"] == 1
    # this one arrives: b sends again, and the data cancels further re-sends
    b.receive_packet(again[0], 0.5)
    data = [p for p in b.packets_to_send() if len(p) > 40]
    assert data
    a.receive_packets(data, 0.5)
    a.packets_to_send()
    assert ca.wnd_nudge_at is None or ca.rcv_adv - ca.rcv_nxt < ca.mss or ca.wnd_nudges == 0
    assert a.counters["tcp_window_update_resent"] == 1


def test_re_sends_back_off_and_stop_after_a_few():
    a, b, ca, cb = established()
    fill_window(a, b, ca, cb, 0.0)
    ca.recv(1 << 20, 0.01)
    a.poke(ca)
    a.packets_to_send()                                         # lost, and so is every re-send
    times = []
    now = 0.01
    while now < 120:
        now += 0.05
        if advance(a, now):
            times.append(now)
    assert len(times) == WND_NUDGE_TRIES == a.counters["tcp_window_update_resent"]
    gaps = [t1 - t0 for t0, t1 in zip(times, times[1:])]
    assert all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:]))       # exponential backoff
    assert ca.wnd_nudge_at is None


def test_a_window_that_never_closed_needs_no_re_send():
    a, b, ca, cb = established(rcv_buf=1 << 20)
    cb.send(bytes(8 * MSS), 0.0)
    b.poke(cb)
    a.receive_packets(b.packets_to_send(), 0.0)
    ca.recv(1 << 20, 0.0)
    a.packets_to_send()                                         # the ACK, lost
    for i in range(1, 200):
        assert advance(a, i * 0.05) == []
    assert a.counters.get("tcp_window_update_resent", 0) == 0


def test_no_re_send_after_the_peer_finished():
    a, b, ca, cb = established()
    fill_window(a, b, ca, cb, 0.0)
    ca.recv(1 << 20, 0.01)
    a.poke(ca)
    a.packets_to_send()
    ca.remote_fin = ca.rcv_nxt                                  # as if their FIN came
    for i in range(1, 200):
        advance(a, 0.01 + i * 0.05)
    assert a.counters.get("tcp_window_update_resent", 0) == 0


def test_a_spent_budget_still_advertises_the_floor_to_an_empty_buffer():
    a, b, ca, cb = established(rcv_buf=1 << 20, rcv_budget=64 * 1024)
    floor = a.budget.floor
    hog = a.budget
    hog.used = hog.total                                        # others hold all of it
    cb.send(bytes(2 * MSS), 0.0)
    b.poke(cb)
    a.receive_packets(b.packets_to_send(), 0.0)
    ca.recv(1 << 20, 0.0)
    ca.ack_now = True
    a.poke(ca)
    out = a.packets_to_send()
    assert out
    assert window_of(out[-1]) << ca.rcv_wscale >= floor - (1 << ca.rcv_wscale)
    assert floor >= 2 * ca.mss                                  # never below two segments
