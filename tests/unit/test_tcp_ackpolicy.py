"""When the netstack sends ACKs and window updates (sans-IO, two stacks, packets moved by
hand): one ACK per input batch of in-order data, one per two segments without batching,
no window update for a reader that keeps up, SACK-carrying ACKs for out-of-order data
coalesced per batch (duplicate ACKs kept without SACK), and loss-recovery details."""

from tests.netstack_pair import established_pair
from tsproxy.netstack import tcp as T
from tsproxy.netstack.stack import Stack
from tsproxy.netstack.wire import tcp as W

A, B = "10.0.0.1", "10.0.0.2"
MSS = 1380


def established(**kw):
    """a connected to b; returns (a, b, ca, cb) with nothing in flight."""
    return established_pair(kw, kw)


def segments_from(stack, conn, n):
    """n full data segments from conn (one flush of its stack)."""
    conn.send(bytes(n * MSS), 0.0)
    stack.poke(conn)
    out = stack.packets_to_send()
    data = [p for p in out if len(p) > 40]
    assert len(data) >= n
    return data[:n]


def tcp_fields(pkt):
    sport, dport, seq, ack, offflags, window, _, _ = W.unpack_header(pkt, 20)
    hl = (offflags >> 12) * 4
    return {"ack": ack, "flags": offflags & 0x1FF, "window": window,
            "options": W.parse_options(bytes(pkt[40:20 + hl])), "len": len(pkt) - 20 - hl}


def test_a_batch_of_in_order_data_costs_one_ack():
    a, b, ca, cb = established()
    segs = segments_from(b, cb, 8)
    a.receive_packets(segs, 0.01)
    acks = a.packets_to_send()
    assert len(acks) == 1
    assert tcp_fields(acks[0])["ack"] == (ca.rcv_nxt & T.M32)


def test_without_batching_every_second_segment_is_acked():
    a, b, ca, cb = established()
    segs = segments_from(b, cb, 8)
    acks = []
    for s in segs:
        a.receive_packet(s, 0.01)
        acks += a.packets_to_send()
    assert len(acks) == 4


def test_an_odd_segment_waits_for_the_delayed_ack_timer():
    a, b, ca, cb = established()
    a.receive_packets(segments_from(b, cb, 1), 0.01)
    assert a.packets_to_send() == []
    assert ca.delack_at == 0.01 + T.DELACK
    a.handle_timer(0.01 + T.DELACK)
    assert len(a.packets_to_send()) == 1


def stream(a, b, ca, cb, rounds, now, read=True):
    """b streams to a for `rounds` batches: each batch b's flushed data reaches a at once,
    a's ACK goes back; a's application reads after each batch when `read`.  Yields what a
    sent in reply to each read (after the batch's ACK)."""
    cb.send(bytes(8 << 20), now)
    b.poke(cb)
    for _ in range(rounds):
        data = [p for p in b.packets_to_send() if len(p) > 40]
        a.receive_packets(data, now)
        for p in a.packets_to_send():
            b.receive_packet(p, now)
        if read:
            assert ca.recv(1 << 30, now)
            a.poke(ca)
            yield a.packets_to_send()
        else:
            yield []
        now += 0.001


def test_a_reader_that_keeps_up_costs_no_window_updates():
    a, b, ca, cb = established()
    replies = list(stream(a, b, ca, cb, 30, 0.01))
    assert ca.rcv_nxt - ca.irs > 100 * MSS            # it did stream
    assert all(r == [] for r in replies)             # reading sent nothing


def test_a_reader_that_fell_behind_gets_a_window_update_when_it_catches_up():
    a, b, ca, cb = established(rcv_buf=64 * 1024)
    for _ in stream(a, b, ca, cb, 30, 0.01, read=False):
        pass
    assert ca.rcv_adv - ca.rcv_nxt < 16 * 1024       # the window all but closed
    assert ca.recv(1 << 30, 0.1)
    a.poke(ca)
    out = a.packets_to_send()
    assert len(out) == 1
    f = tcp_fields(out[0])
    assert f["len"] == 0 and (f["window"] << ca.rcv_wscale) > 32 * 1024


def test_out_of_order_segments_in_a_batch_share_one_sack_ack():
    a, b, ca, cb = established()
    segs = segments_from(b, cb, 6)
    a.receive_packets(segs[1:], 0.01)                # the first one was lost
    out = a.packets_to_send()
    assert len(out) == 1
    f = tcp_fields(out[0])
    (left, right), = f["options"]["sack"]
    assert right - left == 5 * MSS
    a.receive_packets(segs[:1], 0.02)                # the hole is filled: acked at once
    out = a.packets_to_send()
    assert len(out) == 1 and tcp_fields(out[0])["ack"] == (ca.rcv_nxt & T.M32)
    assert ca.rcv_nxt - ca.irs - 1 == 6 * MSS


def test_without_sack_each_out_of_order_segment_is_a_duplicate_ack():
    a = Stack([A], mtu=1420, now=0.0)
    b = Stack([B], mtu=1420, now=0.0)
    b.tcp_listen(80)
    ca = a.tcp_connect(B, 80, 0.0, sack=False)
    for _ in range(4):
        for p in a.packets_to_send():
            b.receive_packet(p, 0.0)
        for p in b.packets_to_send():
            a.receive_packet(p, 0.0)
    cb = next(c for c in b.conns.values() if c.passive)
    assert not ca.sack_ok
    segs = segments_from(b, cb, 5)
    a.receive_packets(segs[1:], 0.01)
    out = a.packets_to_send()
    assert len(out) == 4 and {tcp_fields(p)["ack"] for p in out} == {ca.rcv_nxt & T.M32}


def test_new_data_acked_after_a_timeout_drops_the_backoff():
    a, b, ca, cb = established()
    cb._rtt_sample(0.01)
    base = cb.rto
    segments_from(b, cb, 2)                          # lost
    cb.handle_timer(cb.rto_at)                       # RTO: backoff doubles
    assert cb.rto == 2 * base
    for p in b.packets_to_send():                    # the retransmission arrives
        a.receive_packet(p, 1.0)
    a.handle_timer(1.0 + T.DELACK)                   # (one segment: a delayed ACK)
    for p in a.packets_to_send():
        b.receive_packet(p, 1.0)
    assert cb.rto == base and cb.retries == 0
