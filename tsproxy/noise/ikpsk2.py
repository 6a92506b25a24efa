"""WireGuard's handshake: Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, mac1/mac2 and cookies.

Message layouts (little-endian, PROTOCOL.md 7.3):

    initiation (148): type=1 |sender u32|ephemeral 32|static 32+16|timestamp 12+16|mac1 16|mac2 16
    response    (92): type=2 |sender u32|receiver u32|ephemeral 32|empty 0+16|mac1 16|mac2 16
    cookie      (64): type=3 |receiver u32|nonce 24|cookie 16+16

Pure functions over bytes: the caller (wg/peer.py, wg/device.py) keeps the state, indices,
timers and the decision whether we are under load.  Failures return None; nothing raises on
bad input.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from nacl.bindings import (crypto_aead_xchacha20poly1305_ietf_decrypt,
                           crypto_aead_xchacha20poly1305_ietf_encrypt)
from nacl.exceptions import CryptoError

from tsproxy.noise.primitives import aead, dh, dh_generate, hash_, kdf1, kdf2, kdf3, mac

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
CK0 = hash_(CONSTRUCTION)
H0 = hash_(CK0, IDENTIFIER)

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE = 3
MSG_DATA = 4
INITIATION_LEN = 148
RESPONSE_LEN = 92
COOKIE_LEN = 64
ZERO_NONCE = bytes(12)
ZERO_KEY = bytes(32)
EMPTY_MAC = bytes(16)

_INIT = struct.Struct("<II32s48s28s")          # up to mac1 (116 bytes)
_RESP = struct.Struct("<III32s16s")            # up to mac1 (60 bytes)
_COOKIE = struct.Struct("<II24s32s")
_TAI64N = struct.Struct(">QI")
TAI64_BASE = 0x400000000000000A


def tai64n(wall: float) -> bytes:
    """TAI64N label; the low 24 bits of the nanoseconds are cleared (wireguard-go whitening)."""
    secs = int(wall)
    nanos = int((wall - secs) * 1e9) & ~0xFFFFFF
    return _TAI64N.pack(TAI64_BASE + secs, nanos)


def mac1_key(static_pub: bytes) -> bytes:
    return hash_(LABEL_MAC1, static_pub)


def cookie_key(static_pub: bytes) -> bytes:
    return hash_(LABEL_COOKIE, static_pub)


def _seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return aead(key).encrypt(ZERO_NONCE, plaintext, ad)


def _open(key: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    try:
        return aead(key).decrypt(ZERO_NONCE, ciphertext, ad)
    except InvalidTag:
        return None


def _dh(priv: bytes, pub: bytes) -> bytes | None:
    try:
        return dh(priv, pub)
    except ValueError:           # low-order point: the shared secret would be all zeros
        return None


class InitiatorState:
    """What an initiator keeps between sending its initiation and receiving the response."""

    __slots__ = ("chaining_key", "hash", "ephemeral_priv", "sender_index", "sent_at")

    def __init__(self, chaining_key, hash_value, ephemeral_priv, sender_index, sent_at):
        self.chaining_key = chaining_key
        self.hash = hash_value
        self.ephemeral_priv = ephemeral_priv
        self.sender_index = sender_index
        self.sent_at = sent_at


def create_initiation(*, static_priv: bytes, static_pub: bytes, peer_pub: bytes,
                      precomputed_ss: bytes, sender_index: int, wall: float, rng,
                      peer_mac1_key: bytes, cookie: bytes | None, now: float
                      ) -> tuple[bytes, InitiatorState]:
    e_priv, e_pub = dh_generate(rng)
    h = hash_(H0, peer_pub)
    c = kdf1(CK0, e_pub)
    h = hash_(h, e_pub)
    es = _dh(e_priv, peer_pub)
    c, k = kdf2(c, es)
    enc_static = _seal(k, static_pub, h)
    h = hash_(h, enc_static)
    c, k = kdf2(c, precomputed_ss)
    enc_ts = _seal(k, tai64n(wall), h)
    h = hash_(h, enc_ts)
    body = _INIT.pack(MSG_INITIATION, sender_index, e_pub, enc_static, enc_ts)
    msg = add_macs(body, peer_mac1_key, cookie)
    return msg, InitiatorState(c, h, e_priv, sender_index, now)


def add_macs(body: bytes, peer_mac1_key: bytes, cookie: bytes | None) -> bytes:
    m1 = mac(peer_mac1_key, body)
    m2 = mac(cookie, body + m1) if cookie is not None else EMPTY_MAC
    return body + m1 + m2


def check_mac1(msg: bytes, our_mac1_key: bytes) -> bool:
    end = len(msg) - 32
    return mac(our_mac1_key, msg[:end]) == msg[end:end + 16]


def check_mac2(msg: bytes, cookie: bytes) -> bool:
    end = len(msg) - 16
    return mac(cookie, msg[:end]) == msg[end:]


class ConsumedInitiation:
    __slots__ = ("peer_pub", "timestamp", "chaining_key", "hash", "remote_ephemeral", "remote_index")

    def __init__(self, peer_pub, timestamp, chaining_key, hash_value, remote_ephemeral, remote_index):
        self.peer_pub = peer_pub
        self.timestamp = timestamp
        self.chaining_key = chaining_key
        self.hash = hash_value
        self.remote_ephemeral = remote_ephemeral
        self.remote_index = remote_index


def consume_initiation(msg: bytes, *, static_priv: bytes, static_pub: bytes,
                       lookup_ss) -> ConsumedInitiation | None:
    """Decrypt an initiation addressed to us.  `lookup_ss(peer_pub)` returns the precomputed
    static-static DH for a known peer, or None (unknown peers are rejected).  mac1 must have
    been checked by the caller."""
    _, sender, e_pub, enc_static, enc_ts = _INIT.unpack_from(msg)
    h = hash_(H0, static_pub)
    c = kdf1(CK0, e_pub)
    h = hash_(h, e_pub)
    es = _dh(static_priv, e_pub)
    if es is None:
        return None
    c, k = kdf2(c, es)
    peer_pub = _open(k, enc_static, h)
    if peer_pub is None:
        return None
    h = hash_(h, enc_static)
    ss = lookup_ss(peer_pub)
    if ss is None:
        return None
    c, k = kdf2(c, ss)
    ts = _open(k, enc_ts, h)
    if ts is None:
        return None
    h = hash_(h, enc_ts)
    return ConsumedInitiation(peer_pub, ts, c, h, e_pub, sender)


def create_response(init: ConsumedInitiation, *, peer_pub: bytes, psk: bytes, sender_index: int,
                    rng, peer_mac1_key: bytes, cookie: bytes | None) -> tuple[bytes, bytes, bytes]:
    """-> (message, send key, receive key) for the responder."""
    e_priv, e_pub = dh_generate(rng)
    c = kdf1(init.chaining_key, e_pub)
    h = hash_(init.hash, e_pub)
    c = kdf1(c, _dh(e_priv, init.remote_ephemeral) or ZERO_KEY)
    c = kdf1(c, _dh(e_priv, peer_pub) or ZERO_KEY)
    c, tau, k = kdf3(c, psk)
    h = hash_(h, tau)
    empty = _seal(k, b"", h)
    body = _RESP.pack(MSG_RESPONSE, sender_index, init.remote_index, e_pub, empty)
    msg = add_macs(body, peer_mac1_key, cookie)
    recv_key, send_key = kdf2(c, b"")        # T_i->r is the responder's receive key
    return msg, send_key, recv_key


def consume_response(msg: bytes, st: InitiatorState, *, static_priv: bytes, psk: bytes
                     ) -> tuple[int, bytes, bytes] | None:
    """-> (responder's index, send key, receive key) for the initiator, or None."""
    _, sender, receiver, e_pub, empty = _RESP.unpack_from(msg)
    if receiver != st.sender_index:
        return None
    c = kdf1(st.chaining_key, e_pub)
    h = hash_(st.hash, e_pub)
    ee = _dh(st.ephemeral_priv, e_pub)
    se = _dh(static_priv, e_pub)
    if ee is None or se is None:
        return None
    c = kdf1(c, ee)
    c = kdf1(c, se)
    c, tau, k = kdf3(c, psk)
    h = hash_(h, tau)
    if _open(k, empty, h) is None:
        return None
    send_key, recv_key = kdf2(c, b"")
    return sender, send_key, recv_key


def parse_index(msg: bytes, offset: int) -> int:
    return int.from_bytes(msg[offset:offset + 4], "little")


# -- cookies ---------------------------------------------------------------------------------

def make_cookie(secret: bytes, source: bytes) -> bytes:
    return mac(secret, source)


def create_cookie_reply(msg: bytes, *, our_cookie_key: bytes, cookie: bytes, rng) -> bytes:
    """Answer an initiation/response we will not process now because we are under load."""
    receiver = parse_index(msg, 4)
    nonce = rng(24)
    mac1 = msg[-32:-16]
    enc = crypto_aead_xchacha20poly1305_ietf_encrypt(cookie, mac1, nonce, our_cookie_key)
    return _COOKIE.pack(MSG_COOKIE, receiver, nonce, enc)


def consume_cookie_reply(msg: bytes, *, peer_cookie_key: bytes, our_last_mac1: bytes) -> bytes | None:
    if len(msg) != COOKIE_LEN:
        return None
    _, _, nonce, enc = _COOKIE.unpack(msg)
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(enc, our_last_mac1, nonce, peer_cookie_key)
    except CryptoError:
        return None
