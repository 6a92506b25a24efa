"""Known-answer checks for the WireGuard handshake (tsproxy/noise/ikpsk2.py).

CK0/H0 are checked against the literals in PROTOCOL.md 7.2.  The full handshake is checked
byte for byte against a second, independent implementation written here from the
WireGuard paper (section 5.4) on different libraries: hashlib BLAKE2s, the stdlib hmac
module, and libsodium (PyNaCl) for X25519 and ChaCha20-Poly1305 -- the code under test uses
`cryptography` for those.  Provenance: tests/vectors/PROVENANCE.md.
"""

import hashlib
import hmac as std_hmac
import struct

from nacl.bindings import (crypto_aead_chacha20poly1305_ietf_decrypt,
                           crypto_aead_chacha20poly1305_ietf_encrypt, crypto_scalarmult,
                           crypto_scalarmult_base)

from tsproxy.noise import ikpsk2

# ---- reference implementation (paper section 5.4) -----------------------------------------


def H(*parts):
    return hashlib.blake2s(b"".join(parts)).digest()


def HMAC(key, data):
    return std_hmac.new(key, data, hashlib.blake2s).digest()


def KDF(n, key, data):
    prk = HMAC(key, data)
    out, prev = [], b""
    for i in range(1, n + 1):
        prev = HMAC(prk, prev + bytes([i]))
        out.append(prev)
    return out


def MAC(key, data):
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def clamp(k):
    k = bytearray(k)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def pub(k):
    return crypto_scalarmult_base(clamp(k))


def DH(priv, public):
    return crypto_scalarmult(clamp(priv), public)


def AEAD(key, counter, plain, ad):
    return crypto_aead_chacha20poly1305_ietf_encrypt(plain, ad, struct.pack("<4xQ", counter), key)


def ref_initiation(s_i, S_r, e_i, idx, ts):
    C = H(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    Hh = H(C, b"WireGuard v1 zx2c4 Jason@zx2c4.com")
    Hh = H(Hh, S_r)
    E_i = pub(e_i)
    (C,) = KDF(1, C, E_i)
    Hh = H(Hh, E_i)
    C, k = KDF(2, C, DH(e_i, S_r))
    enc_s = AEAD(k, 0, pub(s_i), Hh)
    Hh = H(Hh, enc_s)
    C, k = KDF(2, C, DH(s_i, S_r))
    enc_t = AEAD(k, 0, ts, Hh)
    Hh = H(Hh, enc_t)
    body = struct.pack("<I", 1) + struct.pack("<I", idx) + E_i + enc_s + enc_t
    m1 = MAC(H(b"mac1----", S_r), body)
    return body + m1 + bytes(16), C, Hh


def ref_response(C, Hh, e_r, s_i_pub, E_i, idx_r, idx_i, psk):
    E_r = pub(e_r)
    (C,) = KDF(1, C, E_r)
    Hh = H(Hh, E_r)
    (C,) = KDF(1, C, DH(e_r, E_i))
    (C,) = KDF(1, C, DH(e_r, s_i_pub))
    C, tau, k = KDF(3, C, psk)
    Hh = H(Hh, tau)
    empty = AEAD(k, 0, b"", Hh)
    body = struct.pack("<III", 2, idx_r, idx_i) + E_r + empty
    m1 = MAC(H(b"mac1----", s_i_pub), body)
    t_send_i, t_recv_i = KDF(2, C, b"")     # initiator's send = responder's receive
    return body + m1 + bytes(16), t_send_i, t_recv_i


# ---- fixed inputs ---------------------------------------------------------------------------

S_I = bytes(range(1, 33))
S_R = bytes(range(101, 133))
E_I = bytes(range(201, 233))
E_R = bytes((7 * i + 3) & 0xFF for i in range(32))
PSK = bytes(range(50, 82))
IDX_I, IDX_R = 0x11223344, 0xA1B2C3D4
WALL = 1_700_000_000.5


def fixed_rng(value):
    return lambda n: value[:n]


def test_initial_chaining_key_and_hash_match_protocol_md():
    assert ikpsk2.CK0.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    assert ikpsk2.H0.hex() == "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


def test_tai64n_layout():
    ts = ikpsk2.tai64n(WALL)
    secs, nanos = struct.unpack(">QI", ts)
    assert secs == 0x400000000000000A + 1_700_000_000
    assert nanos == 500_000_000 & ~0xFFFFFF and len(ts) == 12


def _our_initiation():
    s_i, s_r = clamp(S_I), clamp(S_R)
    msg, st = ikpsk2.create_initiation(
        static_priv=s_i, static_pub=pub(S_I), peer_pub=pub(S_R),
        precomputed_ss=DH(S_I, pub(S_R)), sender_index=IDX_I, wall=WALL,
        rng=fixed_rng(E_I), peer_mac1_key=ikpsk2.mac1_key(pub(S_R)), cookie=None, now=0.0)
    return msg, st, s_r


def test_initiation_bytes_match_independent_reference():
    msg, st, _ = _our_initiation()
    ref, C, Hh = ref_initiation(S_I, pub(S_R), E_I, IDX_I, ikpsk2.tai64n(WALL))
    assert len(msg) == 148
    assert msg == ref
    assert st.chaining_key == C and st.hash == Hh


def test_response_and_transport_keys_match_independent_reference():
    msg, st, s_r = _our_initiation()
    ref_init, C, Hh = ref_initiation(S_I, pub(S_R), E_I, IDX_I, ikpsk2.tai64n(WALL))
    ss = DH(S_R, pub(S_I))
    init = ikpsk2.consume_initiation(msg, static_priv=s_r, static_pub=pub(S_R),
                                     lookup_ss=lambda p: ss if p == pub(S_I) else None)
    assert init is not None
    assert init.peer_pub == pub(S_I) and init.timestamp == ikpsk2.tai64n(WALL)
    assert init.remote_index == IDX_I and init.chaining_key == C and init.hash == Hh

    resp, r_send, r_recv = ikpsk2.create_response(
        init, peer_pub=pub(S_I), psk=PSK, sender_index=IDX_R, rng=fixed_rng(E_R),
        peer_mac1_key=ikpsk2.mac1_key(pub(S_I)), cookie=None)
    ref_resp, i_send_ref, i_recv_ref = ref_response(C, Hh, E_R, pub(S_I), pub(E_I), IDX_R, IDX_I, PSK)
    assert len(resp) == 92 and resp == ref_resp
    assert (r_send, r_recv) == (i_recv_ref, i_send_ref)

    got = ikpsk2.consume_response(resp, st, static_priv=clamp(S_I), psk=PSK)
    assert got == (IDX_R, i_send_ref, i_recv_ref)
    # and the keys really work across the two libraries
    ct = AEAD(i_send_ref, 7, b"hello", b"")
    assert crypto_aead_chacha20poly1305_ietf_decrypt(ct, b"", struct.pack("<4xQ", 7), r_recv) == b"hello"


def test_mac2_and_cookie_reply_match_reference():
    msg, _, _ = _our_initiation()
    cookie = bytes(range(16))
    with_mac2 = ikpsk2.add_macs(msg[:116], ikpsk2.mac1_key(pub(S_R)), cookie)
    assert with_mac2[116:132] == MAC(H(b"mac1----", pub(S_R)), msg[:116])
    assert with_mac2[132:] == MAC(cookie, with_mac2[:132])
    assert ikpsk2.check_mac2(with_mac2, cookie) and not ikpsk2.check_mac2(with_mac2, bytes(16))
    assert ikpsk2.cookie_key(pub(S_R)) == H(b"cookie--", pub(S_R))
    reply = ikpsk2.create_cookie_reply(with_mac2, our_cookie_key=ikpsk2.cookie_key(pub(S_R)),
                                       cookie=cookie, rng=fixed_rng(bytes(range(24))))
    assert len(reply) == 64 and reply[:8] == struct.pack("<II", 3, IDX_I)
    assert ikpsk2.consume_cookie_reply(reply, peer_cookie_key=H(b"cookie--", pub(S_R)),
                                       our_last_mac1=with_mac2[116:132]) == cookie
    assert ikpsk2.consume_cookie_reply(reply, peer_cookie_key=H(b"cookie--", pub(S_R)),
                                       our_last_mac1=bytes(16)) is None
