from hypothesis import given, strategies as st

from tsproxy.disco import wire
from tsproxy.disco.wire import DiscoCodec
from tsproxy.keys import DiscoPrivate


def test_inner_golden():
    txid = bytes(range(12))
    nk = b"N" * 32
    p = wire.build_ping(txid, nk)
    assert p == b"\x01\x00" + txid + nk and len(p) == 46
    assert wire.parse_message(p) == ("ping", txid, nk, 0)
    pong = wire.build_pong(txid, ("1.2.3.4", 41641))
    assert pong == b"\x02\x00" + txid + bytes(10) + b"\xff\xff\x01\x02\x03\x04" + b"\xa2\xa9"
    assert wire.parse_message(pong) == ("pong", txid, ("1.2.3.4", 41641))
    cmm = wire.build_call_me_maybe([("10.0.0.1", 1), ("2001:db8::5", 2)])
    assert len(cmm) == 2 + 36
    assert wire.parse_message(cmm) == ("call_me_maybe", [("10.0.0.1", 1), ("2001:db8::5", 2)])
    assert wire.parse_message(cmm[:-1]) == ("call_me_maybe", [])
    assert wire.parse_message(b"\x01\x00short") is None


def test_box_round_trip_and_wire_size():
    a, b = DiscoPrivate.generate(), DiscoPrivate.generate()
    ca, cb = DiscoCodec(a), DiscoCodec(b)
    pkt = ca.seal(cb.public, wire.build_ping(b"t" * 12, b"N" * 32))
    assert len(pkt) == 124 and pkt[:6] == wire.MAGIC and pkt[6:38] == ca.public
    assert wire.looks_like(pkt) == "disco"
    assert cb.open(pkt) == (ca.public, ("ping", b"t" * 12, b"N" * 32, 0))
    pong = cb.seal(ca.public, wire.build_pong(b"t" * 12, ("::1", 9)))
    assert len(pong) == 110
    assert ca.open(pong) == (cb.public, ("pong", b"t" * 12, ("::1", 9)))


def test_bad_boxes_dropped_and_counted():
    a, b, c = DiscoPrivate.generate(), DiscoPrivate.generate(), DiscoPrivate.generate()
    ca, cb = DiscoCodec(a), DiscoCodec(b)
    pkt = bytearray(ca.seal(cb.public, wire.build_ping(b"t" * 12)))
    pkt[-1] ^= 1
    assert cb.open(bytes(pkt)) is None
    assert cb.counters["disco_bad_box"] == 1
    assert cb.open(bytes(pkt[:70])) is None
    assert cb.counters["disco_short"] == 1
    cb.set_peers([DiscoCodec(c).public])
    assert cb.open(ca.seal(cb.public, wire.build_ping(b"t" * 12))) is None
    assert cb.counters["disco_unknown_sender"] == 1
    assert cb.open(ca.seal(cb.public, b"\x09\x00")) is None  # unknown type from unknown sender
    cb.set_peers([ca.public])
    assert cb.open(ca.seal(cb.public, b"\x09\x00")) is None
    assert cb.counters["disco_bad_message"] == 1


def test_looks_like():
    from tsproxy.disco import stun
    assert wire.looks_like(stun.build_request(b"x" * 12)) == "stun"
    assert wire.looks_like(stun.build_response(b"x" * 12, "1.2.3.4", 5)) == "stun"
    assert wire.looks_like(b"\x01\x00\x00\x00" + bytes(144)) == "wireguard"
    assert wire.looks_like(b"\x00\x00\x7a\x11\x00\x00\x00\x00" + bytes(10)) == "geneve"
    assert wire.looks_like(wire.MAGIC + bytes(31)) == "wireguard"


@given(st.binary(max_size=200))
def test_parsers_hypothesis(data):
    wire.parse_message(data)
    wire.looks_like(data)
    c = DiscoCodec(DiscoPrivate.generate())
    assert c.open(wire.MAGIC + data) is None
