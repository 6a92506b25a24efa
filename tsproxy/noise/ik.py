"""TS2021 control handshake: Noise_IK_25519_ChaChaPoly_BLAKE2s, both roles (PROTOCOL.md 2.4).

    <- s                       (the client knows the server's static key from GET /key)
    ...
    -> e, es, s, ss            initiation, 101 bytes
    <- e, ee, se               response, 51 bytes

Prologue = b"Tailscale Control Protocol v%d" % version; the version is also sent in clear in
the initiation header, and the responder builds its prologue from that header.

    initiation: version u16be | type=1 | len u16be=96 | e.pub 32 | enc(machine pub) 48 | tag 16
    response:   type=2 | len u16be=48 | e.pub 32 | tag 16
    error:      type=3 | len u16be | UTF-8 text (unauthenticated)

After the handshake: Split() -> (k1, k2); the initiator sends with k1, the responder with k2.
Transport records (big-endian nonces) live in tsproxy/control/wire.py + noiseconn.py.

Failures raise RemoteProtocolError and leave the object unchanged (a tampered response can be
followed by the genuine one).  Handshake keys are each used once, so the nonce is always zero.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from tsproxy.errors import LocalProtocolError, RemoteProtocolError
from tsproxy.noise.primitives import aead, dh, dh_generate, dh_public, hash_, kdf2

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE_PREFIX = b"Tailscale Control Protocol v"
PROTOCOL_VERSION = 130

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_ERROR = 3
MSG_RECORD = 4

INITIATION_LEN = 101
INITIATION_PAYLOAD_LEN = 96
RESPONSE_LEN = 51
RESPONSE_PAYLOAD_LEN = 48
MAX_ERROR_TEXT = 0xFFFF

_INIT_HDR = struct.Struct(">HBH")     # version, type, payload length
_MSG_HDR = struct.Struct(">BH")       # type, payload length
_ZERO_NONCE = bytes(12)
_H0 = hash_(PROTOCOL_NAME)            # protocol name is 33 bytes > HASHLEN: hashed


def prologue(version: int) -> bytes:
    return PROLOGUE_PREFIX + str(version).encode()


@dataclass(frozen=True)
class HandshakeResult:
    """Transport keys and identities once the handshake completed (either role)."""
    send_key: bytes
    recv_key: bytes
    handshake_hash: bytes
    peer_static: bytes          # initiator: server key; responder: client machine key
    version: int

    def __repr__(self) -> str:   # keys never in logs
        return f"HandshakeResult(version={self.version}, peer={self.peer_static.hex()[:8]}…)"


class _Symmetric:
    """Noise SymmetricState; copied before each fallible step so failures change nothing."""
    __slots__ = ("ck", "h", "k")

    def __init__(self, ck: bytes, h: bytes, k: bytes | None = None):
        self.ck, self.h, self.k = ck, h, k

    def copy(self) -> _Symmetric:
        return _Symmetric(self.ck, self.h, self.k)

    def mix_hash(self, data: bytes) -> None:
        self.h = hash_(self.h, data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = kdf2(self.ck, ikm)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = aead(self.k).encrypt(_ZERO_NONCE, plaintext, self.h)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            pt = aead(self.k).decrypt(_ZERO_NONCE, ciphertext, self.h)
        except InvalidTag:
            raise RemoteProtocolError("noise handshake: authentication tag mismatch") from None
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[bytes, bytes]:
        return kdf2(self.ck, b"")


def _initial_state(prologue_bytes: bytes, responder_static_pub: bytes) -> _Symmetric:
    st = _Symmetric(_H0, _H0)
    st.mix_hash(prologue_bytes)
    st.mix_hash(responder_static_pub)                           # pre-message <- s
    return st


# The four Noise IK message steps, generic over the payload (TS2021 sends empty payloads;
# the known-answer test uses the noise-c vector's payloads).  They mutate `st`.

def write_message1(st: _Symmetric, s: bytes, e: bytes, e_pub: bytes, rs: bytes,
                   payload: bytes) -> bytes:
    """-> e, es, s, ss"""
    st.mix_hash(e_pub)
    st.mix_key(_dh(e, rs))                                      # es
    enc_static = st.encrypt_and_hash(dh_public(s))              # s
    st.mix_key(_dh(s, rs))                                      # ss
    return e_pub + enc_static + st.encrypt_and_hash(payload)


def read_message1(st: _Symmetric, s: bytes, msg: bytes) -> tuple[bytes, bytes, bytes]:
    """Responder: returns (initiator static, initiator ephemeral, payload)."""
    if len(msg) < 32 + 48 + 16:
        raise RemoteProtocolError("noise initiation too short")
    re = bytes(msg[:32])
    st.mix_hash(re)
    st.mix_key(_dh(s, re))                                      # es
    rs = st.decrypt_and_hash(bytes(msg[32:80]))                 # s
    st.mix_key(_dh(s, rs))                                      # ss
    return rs, re, st.decrypt_and_hash(bytes(msg[80:]))


def write_message2(st: _Symmetric, e: bytes, e_pub: bytes, re: bytes, rs: bytes,
                   payload: bytes) -> bytes:
    """<- e, ee, se"""
    st.mix_hash(e_pub)
    st.mix_key(_dh(e, re))                                      # ee
    st.mix_key(_dh(e, rs))                                      # se
    return e_pub + st.encrypt_and_hash(payload)


def read_message2(st: _Symmetric, s: bytes, e: bytes, msg: bytes) -> bytes:
    if len(msg) < 32 + 16:
        raise RemoteProtocolError("noise response too short")
    re = bytes(msg[:32])
    st.mix_hash(re)
    st.mix_key(_dh(e, re))                                      # ee
    st.mix_key(_dh(s, re))                                      # se
    return st.decrypt_and_hash(bytes(msg[32:]))


def _dh(priv: bytes, pub: bytes) -> bytes:
    try:
        return dh(priv, pub)
    except ValueError:
        raise RemoteProtocolError("noise handshake: low-order public key") from None


def _raw(key) -> bytes:
    raw = key.raw if hasattr(key, "raw") else bytes(key)
    if len(raw) != 32:
        raise LocalProtocolError("noise handshake: keys are 32 bytes")
    return raw


def parse_error_message(data: bytes) -> str | None:
    """The text of a complete type-3 error message, or None if `data` is not one."""
    if len(data) < 3 or data[0] != MSG_ERROR:
        return None
    _, n = _MSG_HDR.unpack_from(data)
    if len(data) != 3 + n:
        return None
    return data[3:].decode("utf-8", "replace")


def build_error_message(text: str) -> bytes:
    body = text.encode()[:MAX_ERROR_TEXT]
    return _MSG_HDR.pack(MSG_ERROR, len(body)) + body


class Initiator:
    """Client side.  `initiation` is ready at construction (it goes in the upgrade header)."""

    def __init__(self, machine_private, server_public, *, version: int = PROTOCOL_VERSION,
                 rng=os.urandom):
        if not 0 <= version <= 0xFFFF:
            raise LocalProtocolError("noise handshake: version out of range")
        self.version = version
        self._s = _raw(machine_private)
        self._rs = _raw(server_public)
        self._e, e_pub = dh_generate(rng)
        st = _initial_state(prologue(version), self._rs)
        body = write_message1(st, self._s, self._e, e_pub, self._rs, b"")
        self._st = st
        self.result: HandshakeResult | None = None
        self.initiation = _INIT_HDR.pack(version, MSG_INITIATION, INITIATION_PAYLOAD_LEN) + body

    def receive_response(self, msg: bytes) -> HandshakeResult:
        """Finish with the server's 51-byte response; a type-3 error message raises with its
        text.  Raises RemoteProtocolError (state unchanged) on anything invalid."""
        if self.result is not None:
            raise LocalProtocolError("noise handshake already complete")
        msg = bytes(msg)
        err = parse_error_message(msg)
        if err is not None:
            raise RemoteProtocolError(f"control server error: {err[:200]}")
        if len(msg) != RESPONSE_LEN:
            raise RemoteProtocolError(f"noise response: {len(msg)} bytes, want {RESPONSE_LEN}")
        typ, n = _MSG_HDR.unpack_from(msg)
        if typ != MSG_RESPONSE or n != RESPONSE_PAYLOAD_LEN:
            raise RemoteProtocolError(f"noise response: type {typ} length {n}")
        st = self._st.copy()
        read_message2(st, self._s, self._e, msg[3:])
        k1, k2 = st.split()
        self.result = HandshakeResult(k1, k2, st.h, self._rs, self.version)
        self._st = st
        return self.result


def parse_initiation_header(msg: bytes) -> int:
    """Validate framing of a 101-byte initiation and return its protocol version."""
    if len(msg) != INITIATION_LEN:
        raise RemoteProtocolError("wrong handshake initiation size")
    version, typ, n = _INIT_HDR.unpack_from(msg)
    if typ != MSG_INITIATION:
        raise RemoteProtocolError("unexpected handshake message type")
    if n != INITIATION_PAYLOAD_LEN:
        raise RemoteProtocolError("wrong handshake initiation length")
    return version


class Responder:
    """Server side: one instance per server static key; `respond()` per client connection."""

    def __init__(self, server_private, *, rng=os.urandom):
        self._s = _raw(server_private)
        self.public = dh_public(self._s)
        self._rng = rng

    def respond(self, initiation: bytes) -> tuple[bytes, HandshakeResult]:
        """Process an initiation; return (51-byte response, result).  `result.peer_static` is
        the client's machine public key, `result.version` the version from the header.
        Raises RemoteProtocolError with Go's wording for framing errors (the server may send
        it back with build_error_message) or for a failed authentication."""
        initiation = bytes(initiation)
        version = parse_initiation_header(initiation)
        st = _initial_state(prologue(version), self.public)
        rs, re, _ = read_message1(st, self._s, initiation[5:])
        e, e_pub = dh_generate(self._rng)
        body = write_message2(st, e, e_pub, re, rs, b"")
        k1, k2 = st.split()
        response = _MSG_HDR.pack(MSG_RESPONSE, RESPONSE_PAYLOAD_LEN) + body
        return response, HandshakeResult(k2, k1, st.h, rs, version)
