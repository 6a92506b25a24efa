"""TIME-WAIT records (tcp_timewait.py): what they answer, when they end, and port reuse."""

import pytest

from tsproxy.errors import NetworkUnreachable
from tsproxy.netstack import stack as S
from tsproxy.netstack import tcp as T
from tsproxy.netstack.stack import Stack
from tsproxy.netstack.tcp_timewait import ISS_GAP, REUSE_AFTER, TimeWait
from tsproxy.netstack.wire import ip
from tsproxy.netstack.wire import tcp as W

A, B = "10.0.0.1", "10.0.0.2"
MSL = 5.0


def pair():
    a = Stack([A], mtu=1420, now=0.0, msl=MSL)
    b = Stack([B], mtu=1420, now=0.0, msl=MSL)
    b.tcp_listen(80)
    return a, b


def deliver(src, dst, now, drop=False):
    """Move src's outbox to dst (or drop it); returns the packets."""
    pkts = src.packets_to_send()
    if not drop:
        dst.receive_packets(pkts, now)
    return pkts


def tcp_fields(pkt):
    _v, _src, _dst, _proto, start, _end = ip.parse(pkt, True)
    _sport, _dport, seq, ack, offflags, _window, _, _ = W.unpack_header(pkt, start)
    return seq, ack, offflags & 0x1FF


def closed_by_a(a, b, now=0.0, lose_last_ack=False):
    """A connection from a to b that a closes first; a ends in TIME-WAIT.  Returns (conn, b's
    conn, b's FIN)."""
    c = a.tcp_connect(B, 80, now)
    for _ in range(3):
        deliver(a, b, now)
        deliver(b, a, now)
    (bc,) = [k for k in b.conns.values()]
    c.close(now)
    a.poke(c)
    deliver(a, b, now)                       # a's FIN
    deliver(b, a, now)                       # its ACK
    bc.close(now)
    b.poke(bc)
    (fin,) = deliver(b, a, now)              # b's FIN: a acks it and enters TIME-WAIT
    deliver(a, b, now, drop=lose_last_ack)
    assert c.state == T.TIME_WAIT
    return c, bc, fin


def test_a_connection_entering_time_wait_becomes_a_record_that_expires_after_2msl():
    a, b = pair()
    c, bc, _ = closed_by_a(a, b)
    rec = a.conns[c.key]
    assert isinstance(rec, TimeWait) and not hasattr(rec, "__dict__")
    assert list(a.time_wait) == [rec] and a.ports_in_use[(c.key[2], c.key[3])] == 1
    assert a.time_wait_held == 1
    assert c.next_deadline() is None               # the connection object keeps no timer
    assert a.live_connections() == []
    assert bc.state == T.CLOSED and not b.conns
    assert a.next_deadline() == pytest.approx(2 * MSL)
    a.handle_timer(2 * MSL - 0.01)
    assert c.key in a.conns
    a.handle_timer(2 * MSL)
    assert not a.conns and not a.time_wait and a.ports_in_use[(c.key[2], c.key[3])] == 0
    assert a.next_deadline() is None and a.time_wait_held == 0


def test_the_record_re_acks_a_retransmitted_fin_and_the_peer_then_closes():
    a, b = pair()
    c, bc, fin = closed_by_a(a, b, lose_last_ack=True)
    assert bc.state == T.LAST_ACK
    a.receive_packets([fin], 1.0)                  # b retransmits its FIN
    (ack,) = a.packets_to_send()
    fseq, _fack, _ = tcp_fields(fin)
    seq, acked, flags = tcp_fields(ack)
    assert flags == W.ACK and acked == (fseq + 1) & T.M32 and seq == c.snd_nxt & T.M32
    assert a.counters["tcp_time_wait_acks"] == 1
    b.receive_packets([ack], 1.0)
    assert bc.state == T.CLOSED and bc.error is None
    assert a.next_deadline() == pytest.approx(2 * MSL)       # not restarted, as in tcp.py


def _segment(a, c, seq_delta=0, flags=W.ACK, payload=b""):
    """A segment from b to a's TIME-WAIT 4-tuple, seq relative to a's RCV.NXT."""
    rec = a.conns[c.key]
    pk = W.Packetizer(c.key[0], c.key[2], c.key[1], c.key[3])
    return pk.build(rec.rcv_nxt + seq_delta, rec.snd_nxt, flags, 512, b"", payload)


def test_the_record_answers_as_time_wait_does():
    a, b = pair()
    c, _, _ = closed_by_a(a, b)
    a.receive_packets([_segment(a, c)], 1.0)                   # a pure ACK at RCV.NXT
    assert a.packets_to_send() == []
    a.receive_packets([_segment(a, c, -5000)], 1.0)            # an old duplicate: ACK
    a.receive_packets([_segment(a, c, flags=W.SYN)], 1.0)      # a SYN: challenge ACK
    a.receive_packets([_segment(a, c, payload=b"late")], 1.0)  # data after the FIN: ACK
    assert len(a.packets_to_send()) == 3
    a.receive_packets([_segment(a, c, 1 << 28, flags=W.RST)], 1.0)   # out of window: ignored
    a.receive_packets([_segment(a, c, 10, flags=W.RST)], 1.0)        # in window: challenge ACK
    assert len(a.packets_to_send()) == 1 and c.key in a.conns
    a.receive_packets([_segment(a, c, flags=W.RST)], 1.0)            # at RCV.NXT: ends it
    assert a.packets_to_send() == [] and c.key not in a.conns
    assert a.ports_in_use[(c.key[2], c.key[3])] == 0
    a.handle_timer(3 * MSL)                                          # the FIFO lets it go
    assert not a.time_wait and a.next_deadline() is None


def test_icmp_errors_for_a_time_wait_4_tuple_are_counted_not_delivered():
    a, b = pair()
    c, _, _ = closed_by_a(a, b)
    quoted = bytes(a.conns[c.key].ack())[:28]       # what a sent on that 4-tuple, as quoted
    a._icmp_error("unreachable", quoted)
    assert a.counters["icmp_error_unmatched"] == 1 and c.key in a.conns


def test_past_the_port_range_an_old_enough_record_is_taken_over(monkeypatch):
    """Short connections to one server faster than the port range per 2*MSL: the next port
    round is a TIME-WAIT record; once REUSE_AFTER old it is taken over with an ISS past
    the old SND.NXT, and the new connection works."""
    monkeypatch.setattr(S, "EPHEMERAL_LO", 50000)
    monkeypatch.setattr(S, "EPHEMERAL_HI", 50003)
    a, b = pair()
    old = [closed_by_a(a, b)[0] for _ in range(4)]
    assert len(a.time_wait) == 4
    with pytest.raises(NetworkUnreachable, match="no free local port"):
        a.tcp_connect(B, 80, REUSE_AFTER / 2)          # every record is too young
    now = REUSE_AFTER + 0.1
    c = a.tcp_connect(B, 80, now)
    was = next(o for o in old if o.key == c.key)
    assert a.counters["tcp_time_wait_reused"] == 1 and a.conns[c.key] is c
    assert 0 < (c.iss - was.snd_nxt) & T.M32 < 1 << 31      # ahead of everything sent before
    assert (c.iss - was.snd_nxt) & T.M32 >= ISS_GAP or c.iss == a._isn(c.key, now)
    assert len([r for r in a.time_wait if not r.done]) == 3 == a.time_wait_held
    for _ in range(3):
        deliver(a, b, now)
        deliver(b, a, now)
    assert c.state == T.ESTABLISHED
    assert a.ports_in_use[(c.key[2], c.key[3])] == 1


def test_reuse_iss_keeps_an_iss_that_is_far_enough_ahead():
    rec = TimeWait(None, snd_nxt=1000, rcv_nxt=0, wnd=0, win_field=0, since=0.0, expires=1.0)
    assert rec.reuse_iss(1000 + ISS_GAP + 5) == 1000 + ISS_GAP + 5
    assert rec.reuse_iss(999) == 1000 + ISS_GAP
    rec.snd_nxt = T.M32 - 10                                  # across the wrap
    assert rec.reuse_iss(5) == (T.M32 - 10 + ISS_GAP) & T.M32


def test_records_beyond_the_cap_end_early_oldest_first(monkeypatch):
    monkeypatch.setattr(S, "MAX_TIME_WAIT", 2)
    a, b = pair()
    conns = [closed_by_a(a, b)[0] for _ in range(3)]
    assert a.counters["tcp_time_wait_overflow"] == 1
    assert conns[0].key not in a.conns and all(c.key in a.conns for c in conns[1:])
    assert a.ports_in_use[(conns[0].key[2], conns[0].key[3])] == 0 and a.time_wait_held == 2
    a.receive_packets([_segment(a, conns[1], flags=W.RST)], 1.0)   # ends early, stays queued
    assert conns[1].key not in a.conns and a.time_wait_held == 1
    closed_by_a(a, b)                          # 3 in the FIFO, 2 live: nothing more ends
    assert a.counters["tcp_time_wait_overflow"] == 1 and conns[2].key in a.conns
