import json

import pytest
from hypothesis import given, strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from tsproxy.derp import wire
from tsproxy.derp.client import DerpClient, READ_TIMEOUT
from tsproxy.errors import RemoteProtocolError
from tsproxy.keys import NodePrivate

SKEY = bytes(range(32))


def test_server_key_golden():
    f = wire.build_server_key(SKEY)
    assert f[:13].hex() == "0100000028" + "44455250f09f9491"
    assert len(f) == 45 and f[13:] == SKEY
    assert wire.parse_server_key(f[5:]) == SKEY
    with pytest.raises(RemoteProtocolError):
        wire.parse_server_key(b"DERQ\xf0\x9f\x94\x91" + SKEY)


def test_send_recv_packet_golden():
    assert wire.build_send_packet(b"P" * 32, b"x" * 148)[:5].hex() == "04000000b4"
    assert wire.build_recv_packet(b"C" * 32, b"hi") == bytes.fromhex("0500000022") + b"C" * 32 + b"hi"
    assert wire.build_peer_gone(b"Q" * 32, 1) == bytes.fromhex("0800000021") + b"Q" * 32 + b"\x01"
    with pytest.raises(ValueError):
        wire.build_send_packet(b"P" * 32, b"x" * 65537)


@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
def test_reader_split(mode):
    frames = [(wire.KEEP_ALIVE, b""), (wire.RECV_PACKET, b"k" * 32 + b"data"), (wire.PING, b"12345678")]
    stream = b"".join(wire.build_frame(t, p) for t, p in frames)
    r = wire.FrameReader()
    out = []
    if mode == "whole":
        out = r.feed(stream)
    elif mode == "bytewise":
        for i in range(len(stream)):
            out += r.feed(stream[i:i + 1])
    else:
        out = r.feed(stream + b"\x05\x00\x00")
        assert r.buffered == 3
    assert out == frames


def test_reader_oversized_raises_before_buffering():
    r = wire.FrameReader()
    with pytest.raises(RemoteProtocolError):
        r.feed(b"\x05" + (wire.MAX_FRAME + 1).to_bytes(4, "big"))


@given(st.binary(max_size=300), st.integers(1, 50))
def test_reader_hypothesis_never_crashes(data, chunk):
    r = wire.FrameReader(max_frame=100)
    try:
        for i in range(0, len(data), chunk):
            for t, p in r.feed(data[i:i + chunk]):
                assert len(p) <= 100
    except RemoteProtocolError:
        pass
    assert r.buffered <= 105


class FakeServer:
    """Just enough server-side DERP to drive the sans-IO client."""

    def __init__(self):
        self.priv = PrivateKey(bytes(range(1, 33)))
        self.pub = bytes(self.priv.public_key)

    def server_info(self, client_pub, js=b'{"version":2}'):
        nonce = b"n" * 24
        sealed = Box(self.priv, PublicKey(client_pub)).encrypt(js, nonce).ciphertext
        return wire.build_frame(wire.SERVER_INFO, nonce + sealed)


def _handshake(c, srv, now=0.0):
    c.receive_data(wire.build_server_key(srv.pub), now)
    out = c.data_to_send()
    return out


def test_client_handshake_bytes():
    srv = FakeServer()
    node = NodePrivate(bytes(range(100, 132)))
    c = DerpClient(node, now=0.0, preferred=True, rng=lambda n: b"\x07" * n)
    out = _handshake(c, srv)
    assert out[:5].hex() == "0200000068"
    assert out[5:37] == c.public
    nonce = out[37:61]
    js = Box(srv.priv, PublicKey(c.public)).decrypt(out[61:109], nonce)
    assert json.loads(js) == {"version": 2, "CanAckPings": True}
    assert out[109:] == bytes.fromhex("070000000101")
    c.receive_data(srv.server_info(c.public), 1.0)
    assert c.next_event() == ("connected", srv.pub, {"version": 2})
    assert c.connected


def test_client_events_and_ping():
    srv = FakeServer()
    c = DerpClient(NodePrivate.generate(), now=0.0)
    _handshake(c, srv)
    c.receive_data(srv.server_info(c.public), 0)
    c.next_event()
    stream = (wire.build_recv_packet(b"A" * 32, b"payload") + wire.build_frame(wire.PING, b"abcdefgh")
              + wire.build_peer_gone(b"B" * 32, 0) + wire.build_frame(wire.PEER_GONE, b"C" * 32)
              + wire.build_frame(wire.HEALTH, b"bad") + wire.build_restarting(1500, 30000)
              + wire.build_frame(0x77, b"zz") + wire.build_frame(wire.KEEP_ALIVE))
    for i in range(len(stream)):
        c.receive_data(stream[i:i + 1], 1.0)
    evs = []
    while (e := c.next_event()) is not None:
        evs.append(e)
    assert evs == [("packet", b"A" * 32, b"payload"), ("peer_gone", b"B" * 32, 0),
                   ("peer_gone", b"C" * 32, 0), ("health", "bad"), ("restarting", 1.5, 30.0)]
    assert c.data_to_send() == bytes.fromhex("1300000008") + b"abcdefgh"
    assert c.counters["unknown_frames"] == 1 and c.counters["keepalives"] == 1
    c.send_packet(b"D" * 32, b"wg")
    assert c.data_to_send() == bytes.fromhex("0400000022") + b"D" * 32 + b"wg"


def test_client_read_timeout():
    c = DerpClient(NodePrivate.generate(), now=10.0)
    assert c.next_deadline() == 10.0 + READ_TIMEOUT
    c.receive_data(wire.build_frame(wire.KEEP_ALIVE), 50.0)
    c.handle_timer(100.0)
    with pytest.raises(RemoteProtocolError):
        c.handle_timer(50.0 + READ_TIMEOUT)


@pytest.mark.parametrize("bad", [
    wire.build_frame(wire.SERVER_KEY, b"x" * 40),
    wire.build_frame(wire.RECV_PACKET, b"short"),
    wire.build_frame(wire.PING, b"1234"),
])
def test_client_malformed_is_sticky_error(bad):
    c = DerpClient(NodePrivate.generate(), now=0.0)
    with pytest.raises(RemoteProtocolError):
        c.receive_data(bad, 0.0)
    with pytest.raises(RemoteProtocolError):
        c.receive_data(wire.build_frame(wire.KEEP_ALIVE), 0.0)


def test_client_bad_server_info_box():
    srv = FakeServer()
    c = DerpClient(NodePrivate.generate(), now=0.0)
    _handshake(c, srv)
    f = bytearray(srv.server_info(c.public))
    f[-1] ^= 1
    with pytest.raises(RemoteProtocolError):
        c.receive_data(bytes(f), 0.0)


@given(st.binary(max_size=200))
def test_client_hypothesis(data):
    c = DerpClient(NodePrivate.generate(), now=0.0)
    try:
        c.receive_data(data, 0.0)
    except RemoteProtocolError:
        pass


_frames = st.lists(st.tuples(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 0x12, 0x13, 0x14, 0x15, 0x42]),
                             st.binary(max_size=80)), max_size=8)


@given(_frames)
def test_client_hypothesis_structured_frames(frames):
    """Well-framed but arbitrary frames: events or RemoteProtocolError, nothing else."""
    srv = FakeServer()
    c = DerpClient(NodePrivate.generate(), now=0.0)
    _handshake(c, srv)
    stream = b"".join(wire.build_frame(t, p) for t, p in frames)
    try:
        c.receive_data(stream, 1.0)
    except RemoteProtocolError:
        return
    while (e := c.next_event()) is not None:
        assert e[0] in {"packet", "peer_gone", "peer_present", "health", "restarting", "pong", "connected"}
