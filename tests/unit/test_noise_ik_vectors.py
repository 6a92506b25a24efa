"""Known-answer test of our Noise IK steps against the noise-c vector (tests/vectors/)."""

from __future__ import annotations

import json
import pathlib

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tsproxy.control.noiseconn import NoiseConnection
from tsproxy.noise import ik
from tsproxy.noise.primitives import NONCE_LE, dh_public

V = json.loads((pathlib.Path(__file__).parent.parent / "vectors"
                / "noise_ik_25519_chachapoly_blake2s.json").read_text())
hx = bytes.fromhex


def test_noise_c_ik_vector():
    s_i, e_i = hx(V["init_static"]), hx(V["init_ephemeral"])
    s_r, e_r = hx(V["resp_static"]), hx(V["resp_ephemeral"])
    assert dh_public(s_r) == hx(V["init_remote_static"])
    msgs = V["messages"]
    pro = hx(V["prologue"])

    ini = ik._initial_state(pro, dh_public(s_r))
    c0 = ik.write_message1(ini, s_i, e_i, dh_public(e_i), dh_public(s_r), hx(msgs[0]["payload"]))
    assert c0.hex() == msgs[0]["ciphertext"]

    resp = ik._initial_state(pro, dh_public(s_r))
    rs, re, p0 = ik.read_message1(resp, s_r, c0)
    assert (rs, re, p0) == (dh_public(s_i), dh_public(e_i), hx(msgs[0]["payload"]))
    c1 = ik.write_message2(resp, e_r, dh_public(e_r), re, rs, hx(msgs[1]["payload"]))
    assert c1.hex() == msgs[1]["ciphertext"]
    assert ik.read_message2(ini, s_i, e_i, c1) == hx(msgs[1]["payload"])
    assert ini.h.hex() == resp.h.hex() == V["handshake_hash"]

    k1, k2 = ini.split()
    assert (k1, k2) == resp.split()
    # transport: initiator sends with k1, responder with k2; counters 0 then 1 (LE in Noise)
    for i, (key, m) in enumerate([(k1, msgs[2]), (k2, msgs[3]), (k1, msgs[4]), (k2, msgs[5])]):
        ct = ChaCha20Poly1305(key).encrypt(NONCE_LE.pack(i // 2), hx(m["payload"]), None)
        assert ct.hex() == m["ciphertext"]

    # our TS2021 record layer with these keys: counter 0 agrees with Noise (BE == LE at 0),
    # counter 1 deliberately differs (big-endian nonce, PROTOCOL.md 2.5)
    res = ik.HandshakeResult(k1, k2, ini.h, dh_public(s_r), 0)
    conn = NoiseConnection(res)
    conn.write(hx(msgs[2]["payload"]))
    conn.write(hx(msgs[4]["payload"]))
    out = conn.data_to_send()
    n0 = len(hx(msgs[2]["ciphertext"]))
    # record header: type 0x04, u16be length (PROTOCOL.md 2.5)
    assert out[:3] == b"\x04" + n0.to_bytes(2, "big")
    assert out[3:3 + n0].hex() == msgs[2]["ciphertext"]
    # the second record: nonce = 4 zero bytes || u64be(1), built here by hand from the spec
    p1 = hx(msgs[4]["payload"])
    expected = ChaCha20Poly1305(k1).encrypt(bytes(4) + (1).to_bytes(8, "big"), p1, None)
    assert out[3 + n0:] == b"\x04" + len(expected).to_bytes(2, "big") + expected
    # and the same bytes the Noise-spec (LE) vector would have are NOT what we send at counter 1
    assert expected.hex() != msgs[4]["ciphertext"]
