"""The transmit fast path: the checksum fold, the one-join segment builder and WgDevice's
batched send must give exactly what the straightforward code gives."""

import os
import random
import struct

import pytest
from hypothesis import given, settings, strategies as st

from tsproxy.netstack.wire import checksum as C
from tsproxy.netstack.wire import tcp as W
from tsproxy.netstack.wire.ip import DEFAULT_TTL, DF, PROTO_TCP
from tsproxy.wg import constants as WC
from tests.unit.test_wg_device import A_IP, B_IP, Pair, ip4, ip6

_from_bytes = int.from_bytes


def reference_build(src, dst, sport, dport, seq, ack, flags, window, options=b"", payload=b""):
    """The segment builder as it was: header template, copy in, sum the finished segment."""
    v4 = len(src) == 4
    hl = 20 + len(options)
    tcp_len = hl + len(payload)
    if v4:
        buf = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 0, DF, DEFAULT_TTL,
                                    PROTO_TCP, 0, src, dst))
        buf[10:12] = C.checksum(bytes(buf)).to_bytes(2, "big")
    else:
        buf = bytearray(struct.pack("!IHBB16s16s", 6 << 28, tcp_len, PROTO_TCP, DEFAULT_TTL, src, dst))
    ih = len(buf)
    buf += struct.pack("!HHIIHHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                       (hl << 10) | flags, window, 0, 0) + options + bytes(payload)
    seg = bytes(buf[ih:])
    s = (_from_bytes(seg + b"\0" * (len(seg) & 1), "big") + C.ones_sum(src + dst) + PROTO_TCP
         + tcp_len) % 0xFFFF
    buf[ih + 16:ih + 18] = (~s & 0xFFFF).to_bytes(2, "big")
    return buf


# -- the fold -------------------------------------------------------------------------------------

_BIG = st.one_of(
    st.integers(min_value=0, max_value=1 << 64),
    st.tuples(st.integers(0, 70000), st.integers(0, 1 << 32)).map(
        lambda t: random.Random(t[1]).getrandbits(t[0])),
    st.integers(0, 70000).map(lambda k: (1 << k) - 1),                 # all ones
    st.tuples(st.integers(1, 70000), st.integers(-3, 3)).map(
        lambda t: max(0, (1 << t[0]) + t[1])))


@given(_BIG)
@settings(max_examples=400, deadline=None)
def test_fold_is_mod_0xffff(s):
    assert C.fold(s) == s % 0xFFFF


@pytest.mark.parametrize("n", [0, 1, 2, 359, 360, 361, 719, 1440, 1460, 1480, 2160, 2881,
                               4321, 9000, 65535, 70000, 200000])
def test_fold_at_split_boundaries(n):
    rnd = random.Random(n)
    for data in (bytes(n), b"\xff" * n, rnd.randbytes(n)):
        s = _from_bytes(data, "big")
        assert C.fold(s) == s % 0xFFFF
        if n:
            assert C.checksum(data) == C.reference_checksum(data)


# -- the builder ----------------------------------------------------------------------------------

_OPTIONS = st.sampled_from([b"", W.syn_options(1360, 7, True), W.syn_options(1440, None, False),
                            W.sack_option([(5, 9)]), W.sack_option([(1, 2), (3, 4), (5, 6), (7, 8)])])


@given(v6=st.booleans(), sport=st.integers(0, 65535), dport=st.integers(0, 65535),
       seq=st.integers(0, (1 << 40) - 1), ack=st.integers(0, (1 << 40) - 1),
       flags=st.integers(0, 255), window=st.integers(0, 65535), options=_OPTIONS,
       payload=st.one_of(st.binary(max_size=64), st.integers(0, 3000).map(os.urandom)),
       as_view=st.booleans())
@settings(max_examples=500, deadline=None)
def test_build_matches_reference(v6, sport, dport, seq, ack, flags, window, options, payload, as_view):
    src, dst = (os.urandom(16), os.urandom(16)) if v6 else (os.urandom(4), os.urandom(4))
    pk = W.Packetizer(src, dst, sport, dport)
    body = memoryview(bytearray(b"x" + payload + b"y"))[1:-1] if as_view else payload
    pkt = pk.build(seq, ack, flags, window, options, body)
    assert isinstance(pkt, bytearray)
    assert pkt == reference_build(src, dst, sport, dport, seq, ack, flags, window, options, payload)
    start = 40 if v6 else 20
    assert W.segment_checksum_ok(pkt, start, len(pkt), src, dst, PROTO_TCP)
    if not v6:
        assert C.checksum(bytes(pkt[:20])) == 0


def test_build_all_ones_payload_checksums():
    """Payloads whose sum folds to 0 or 0xFFFF: the field takes the value the old code gave."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    pk = W.Packetizer(src, dst, 1, 2)
    for n in (0, 1, 2, 1459, 1460):
        for fill in (b"\0", b"\xff"):
            pay = fill * n
            assert pk.build(0, 0, W.ACK, 0, b"", pay) == reference_build(src, dst, 1, 2, 0, 0, W.ACK, 0, b"", pay)


def test_build_rejects_options_that_are_not_whole_words():
    pk = W.Packetizer(bytes(4), bytes(4), 1, 2)
    with pytest.raises(ValueError):
        pk.build(0, 0, W.ACK, 0, b"\x01\x01\x01")


def test_send_range_leaves_no_view_on_the_send_buffer():
    """The segment payload is a memoryview of the send buffer: once sent, the buffer must still
    resize (an ACK trims it), so no view may outlive the call."""
    from tsproxy.netstack import tcp as T
    from tsproxy.netstack.stack import Stack
    from tsproxy.testing.link import Link, run_until
    a, b = Stack(["10.0.0.1"], mtu=1420, now=0.0), Stack(["10.0.0.2"], mtu=1420, now=0.0)
    b.tcp_listen(80)
    c = a.tcp_connect("10.0.0.2", 80, 0.0)
    link = Link(delay=0.001, seed=1)
    run_until([a, b], link, lambda: c.state == T.ESTABLISHED, now=0.0, limit=5)
    assert c.send(os.urandom(50000), 1.0) > 0
    a.poke(c)
    c.sndbuf += b"z"                                     # would raise BufferError with a view alive
    del c.sndbuf[-1:]


# -- WgDevice.send_packets ------------------------------------------------------------------------

def _session():
    p = Pair()
    p.handshake()
    p.b.take_packets()
    p.now += 1.0                          # past the initiation rate limit: a rekey may start
    return p


def _mixed_batch():
    rnd = random.Random(5)
    batch = []
    for i in range(60):
        r = i % 10
        if r == 7:
            batch.append(ip6("fd00::1", "fd00::2", rnd.randbytes(rnd.randrange(0, 200))))
        elif r == 8:
            batch.append(ip4(A_IP, "10.9.9.9", rnd.randbytes(30)))          # no route
        elif r == 9:
            batch.append(b"\x45" * 10)                                       # short
        else:
            batch.append(bytearray(ip4(A_IP, B_IP, rnd.randbytes(rnd.randrange(20, 1400)), proto=6)))
    return batch


def _run(p, batch, batched):
    peer = next(iter(p.a.peers.values()))
    kp = peer.current
    before = (kp.send_counter, dict(p.a.counters), peer.tx_bytes, peer.tx_packets)
    if batched:
        p.a.send_packets(batch, p.now)
    else:
        for pkt in batch:
            p.a.send_packet(pkt, p.now)
    out = p.a.datagrams_to_send()
    after = (kp.send_counter, dict(p.a.counters), peer.tx_bytes, peer.tx_packets)
    kp.send_counter, p.a.counters = before[0], before[1]          # replay the same counters
    peer.tx_bytes, peer.tx_packets = before[2], before[3]
    return out, after


def test_send_packets_batch_equals_one_by_one():
    p = _session()
    batch = _mixed_batch()
    one, st_one = _run(p, batch, batched=False)
    many, st_many = _run(p, batch, batched=True)
    assert [bytes(d) for d, _ in many] == [bytes(d) for d, _ in one]
    assert [ep for _, ep in many] == [ep for _, ep in one]
    assert st_many == st_one
    for d, _ in many:
        p.b.receive_datagram(d, p.a_src, p.now)
    expect = [bytes(x) for x in batch if len(x) >= 20 and (x[0] >> 4 == 6 or x[16:20] == bytes([10, 0, 0, 2]))]
    assert [bytes(x) for x in p.b.take_packets()] == expect


def test_send_packets_batch_stops_at_the_message_limit_and_rekeys():
    p = _session()
    peer = next(iter(p.a.peers.values()))
    kp = peer.current
    kp.send_counter = WC.REJECT_AFTER_MESSAGES - 3
    batch = [ip4(A_IP, B_IP, bytes(100), proto=6) for _ in range(8)]
    staged0 = p.a.counters["tx_staged"]
    p.a.send_packets(batch, p.now)
    out = p.a.datagrams_to_send()
    data = [d for d, _ in out if d[0] == 4]
    inits = [d for d, _ in out if d[0] == 1]
    assert len(data) == 3 and kp.send_counter == WC.REJECT_AFTER_MESSAGES
    assert len(peer.staged) == 5 and p.a.counters["tx_staged"] - staged0 == 5
    assert len(inits) == 1                                         # one handshake for the rest


def test_send_packets_batch_rekeys_past_rekey_after_messages():
    p = _session()
    peer = next(iter(p.a.peers.values()))
    peer.current.send_counter = WC.REKEY_AFTER_MESSAGES
    p.a.send_packets([ip4(A_IP, B_IP, bytes(100), proto=6)] * 4, p.now)
    out = p.a.datagrams_to_send()
    assert sum(1 for d, _ in out if d[0] == 4) == 4
    assert sum(1 for d, _ in out if d[0] == 1) == 1


# -- MagicCore.send: a batch to one peer reuses that peer's direct plan --------------------------

def test_magic_send_batch_reuses_a_direct_plan_only():
    from tests.unit.test_magicsock_core import WG, pair
    a, b = pair()
    ep = a.core.endpoint_for(b.node())
    other = ("192.0.2.3", 1)
    # no proven path yet: every datagram of the batch goes over DERP, none is cached as direct
    a.core.send([(WG, ep)] * 3, 10.0)
    assert sum(1 for f in a.core.derp_frames_to_send() if f[2] == WG) == 3
    assert not [d for d, to in a.core.datagrams_to_send() if d == WG]
    ep.paths.best, ep.paths.best_latency, ep.paths.trust_until = b.addr, 0.001, 20.0
    a.core.send([(WG, ep)] * 3 + [(WG + b"x", other)] + [(WG, ep)] * 2, 11.0)
    assert a.core.datagrams_to_send() == [(WG, b.addr)] * 3 + [(WG + b"x", other)] + [(WG, b.addr)] * 2
    assert a.core.derp_frames_to_send() == []
    assert ep.tx_udp == 5 * len(WG)
    assert ep.paths.last_send == 11.0


# -- WgDevice.receive_datagrams: runs of one session ---------------------------------------------

def test_receive_datagrams_batch_equals_one_by_one():
    from tsproxy.wg.replay import ReplayFilter
    p = _session()
    a_peer = next(iter(p.a.peers.values()))
    rnd = random.Random(9)
    pkts = [ip4(A_IP, B_IP, rnd.randbytes(rnd.randrange(0, 1300))) for _ in range(40)]
    pkts[5] = ip4("10.7.7.7", B_IP, b"spoofed source")                  # not a's address
    p.a.send_packets(pkts, p.now)
    p.a._send_keepalive(a_peer, p.now)
    dgs = [(bytes(d), p.a_src) for d, _ in p.a.datagrams_to_send()]
    bad = bytearray(dgs[3][0])
    bad[-1] ^= 1                                                          # tag fails
    batch = dgs[:3] + [(bytes(bad), p.a_src)] + dgs[3:10] + [dgs[4]]      # a replay
    batch += [(dgs[11][0][:20], p.a_src)]                                 # short
    batch += [(dgs[12][0], ("192.0.2.99", 7))] + dgs[13:]                # roamed source
    junk = bytearray(dgs[14][0])
    junk[4:8] = b"\x01\x02\x03\x04"                                       # unknown index
    batch.insert(20, (bytes(junk), p.a_src))

    b_peer = next(iter(p.b.peers.values()))
    kp = b_peer.current
    fields = ("endpoint", "rx_bytes", "rx_packets", "keepalive_at", "new_handshake_at")
    snap = {f: getattr(b_peer, f) for f in fields}
    counters = dict(p.b.counters)

    def run(batched):
        kp.replay = ReplayFilter()
        for f, v in snap.items():
            setattr(b_peer, f, v)
        p.b.counters = dict(counters)
        if batched:
            p.b.receive_datagrams(batch, p.now)
        else:
            for d, addr in batch:
                p.b.receive_datagram(d, addr, p.now)
        return ([bytes(x) for x in p.b.take_packets()], dict(p.b.counters),
                {f: getattr(b_peer, f) for f in fields}, p.b.datagrams_to_send())

    one, many = run(False), run(True)
    assert many == one
    got, c, peer_state, _ = many
    assert c["rx_replay"] - counters["rx_replay"] == 1
    assert c["rx_decrypt_failed"] - counters["rx_decrypt_failed"] == 1
    assert c["rx_src_not_allowed"] - counters["rx_src_not_allowed"] == 1
    assert c["rx_unknown_index"] - counters["rx_unknown_index"] == 1
    assert c["rx_keepalive"] - counters["rx_keepalive"] == 1
    assert peer_state["endpoint"] == p.a_src                              # roamed back
    assert len(got) == 37 and got[0] == bytes(pkts[0])          # 41 sent, 10 and 11 lost, 5 spoofed
