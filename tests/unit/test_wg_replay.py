"""WireGuard replay window against wireguard-go's replay.Filter (replay/replay.go).

The expectations are literal numbers taken from the reference's behaviour, not derived from
our REPLAY_WINDOW constant: wireguard-go's window is (128 - 1) blocks * 64 bits = 8128 and it
rejects a counter only when `last - counter > 8128`, so a counter exactly 8128 behind the
highest is still accepted once, and 8129 behind is not. Counters >= RejectAfterMessages
(2**64 - 2**13 - 1 = 18446744073709543423) are always rejected.
"""


import pytest

from tsproxy.wg.replay import ReplayFilter
from tests.unit.test_wg_device import A_ADDR, A_IP, B_IP, Pair, ip4

RAM = 18446744073709543423          # wireguard-go RejectAfterMessages

# wireguard-go replay_test.go TestReplay, with T_LIM = windowSize + 1 = 8129 written out.
REFERENCE_SEQUENCE = [
    (0, True), (1, True), (1, False), (9, True), (8, True), (7, True), (7, False),
    (8129, True), (8128, True), (8128, False), (8127, True), (2, True), (2, False),
    (8145, True), (3, False), (8145, False), (32516, True), (24388, True), (10, False),
    (24387, False), (24386, False), (24389, True), (24388, False), (0, False),
    (RAM, False), (RAM - 1, True), (RAM, False), (RAM - 1, False), (RAM - 2, True),
    (RAM + 1, False), (RAM + 2, False), (RAM - 2, False), (RAM - 3, True), (0, False),
]


def _run(seq):
    f = ReplayFilter()
    got = []
    for counter, _ in seq:
        # the pre-decrypt check must agree with the recording step
        pre = not f.seen_or_too_old(counter)
        acc = f.accept(counter)
        assert pre == acc, counter
        got.append((counter, acc))
    return got


def test_reference_sequence():
    assert _run(REFERENCE_SEQUENCE) == REFERENCE_SEQUENCE


def test_exactly_8128_behind_is_accepted_once_8129_is_not():
    seq = [(10000, True), (1872, True), (1872, False), (1871, False), (10000 - 1, True)]
    assert _run(seq) == seq


@pytest.mark.parametrize("first,last,then", [
    (1, 8128, [(0, True), (0, False)]),           # bulk 1: 0 is 8128 behind 8128
    (2, 8129, [(1, True), (0, False)]),           # bulk 2: 0 is 8129 behind
])
def test_reference_bulk_forward(first, last, then):
    seq = [(c, True) for c in range(first, last + 1)] + then
    assert _run(seq) == seq


@pytest.mark.parametrize("top,bottom,then", [
    (8129, 1, []),                                 # bulk 3
    (8130, 2, [(0, False)]),                       # bulk 4
    (8128, 1, [(8129, True), (0, False)]),         # bulk 5
    (8128, 1, [(0, True), (8129, True)]),          # bulk 6
])
def test_reference_bulk_backward(top, bottom, then):
    seq = [(c, True) for c in range(top, bottom - 1, -1)] + then
    assert _run(seq) == seq


def test_a_jump_past_the_window_forgets_everything_behind_it():
    seq = [(5, True), (5 + 8129, True), (5, False), (6, True), (5 + 8129 + 100000, True),
           (5 + 8129, False), (5 + 8129 + 100000 - 8128, True)]
    assert _run(seq) == seq


def test_device_accepts_a_data_packet_8128_behind_and_counts_the_one_beyond():
    """End to end through WgDevice: the transport counters on the wire decide."""
    p = Pair()
    p.handshake()
    p.b.take_packets()
    kp = p.a.peers[p.kb.public()].current
    sent = []

    def send(counter, payload):
        kp.send_counter = counter
        assert p.a.send_packet(ip4(A_IP, B_IP, payload), p.now)
        sent.append(p.a.datagrams_to_send()[0][0])
        p.b.receive_datagram(sent[-1], A_ADDR, p.now)
        return p.b.take_packets()

    assert send(9000, b"top") == [ip4(A_IP, B_IP, b"top")]
    assert send(9000 - 8128, b"edge") == [ip4(A_IP, B_IP, b"edge")]
    before = p.b.counters["rx_replay"]
    assert send(9000 - 8129, b"old") == []
    assert p.b.counters["rx_replay"] == before + 1
    p.b.receive_datagram(sent[1], A_ADDR, p.now)       # the edge packet again: a replay
    assert p.b.take_packets() == [] and p.b.counters["rx_replay"] == before + 2
