"""Disco wire format (PROTOCOL.md 6.1, 6.2).

    magic "TS\\xf0\\x9f\\x92\\xac" (6) | sender disco public (32) | nonce (24) | NaCl box(inner)
    inner: type (1) | version (1) | payload

Messages are tuples:  ("ping", txid, node_key|None, padding_len)
                      ("pong", txid, (ip_str, port))
                      ("call_me_maybe", [(ip_str, port), ...])
DiscoCodec.open() never raises: unknown senders, short or bad boxes are dropped and counted.
"""
import ipaddress
import os
import struct

from nacl.bindings import crypto_box_beforenm
from nacl.public import PrivateKey
from nacl.secret import SecretBox

MAGIC = b"TS\xf0\x9f\x92\xac"
HEADER_LEN = 62
PING, PONG, CALL_ME_MAYBE = 0x01, 0x02, 0x03
_ADDR = struct.Struct(">16sH")
STUN_COOKIE = b"\x21\x12\xa4\x42"


def _addr_bytes(ip: str, port: int) -> bytes:
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        a = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed)
    return _ADDR.pack(a.packed, port)


def _addr_parse(b: bytes, off: int) -> tuple[str, int]:
    raw, port = _ADDR.unpack_from(b, off)
    a = ipaddress.IPv6Address(raw)
    m = a.ipv4_mapped
    return (str(m) if m is not None else str(a), port)


def build_ping(txid: bytes, node_key: bytes | None = None, padding: int = 0) -> bytes:
    assert len(txid) == 12
    return bytes((PING, 0)) + txid + (node_key or b"") + b"\0" * padding


DERP_MAGIC_IP = "127.3.3.40"      # Go's pseudo address for "via DERP region N"


def build_pong(txid: bytes, src: tuple[str, int]) -> bytes:
    ip, port = src
    if ip == DERP_MAGIC_IP:
        port &= 0xFFFF                # region IDs are 64-bit; Go sends uint16(regionID)
    return bytes((PONG, 0)) + txid + _addr_bytes(ip, port)


def build_call_me_maybe(endpoints) -> bytes:
    return bytes((CALL_ME_MAYBE, 0)) + b"".join(_addr_bytes(ip, p) for ip, p in endpoints)


def parse_message(m: bytes):
    """Inner message -> tuple, or None when unknown/malformed."""
    if len(m) < 2:
        return None
    t, ver = m[0], m[1]
    p = m[2:]
    if t == PING:
        if len(p) < 12:
            return None
        nk = bytes(p[12:44]) if len(p) >= 44 else None
        return ("ping", bytes(p[:12]), nk, max(0, len(p) - 44))
    if t == PONG:
        if len(p) < 30:
            return None
        return ("pong", bytes(p[:12]), _addr_parse(p, 12))
    if t == CALL_ME_MAYBE:
        if ver != 0 or not p or len(p) % 18:
            return ("call_me_maybe", [])
        return ("call_me_maybe", [_addr_parse(p, i) for i in range(0, len(p), 18)])
    return None


def looks_like(b: bytes) -> str:
    """Demux one UDP datagram: 'stun', 'geneve', 'disco' or 'wireguard' (PROTOCOL.md 6.2)."""
    n = len(b)
    if n >= 20 and b[0] & 0xC0 == 0 and b[4:8] == STUN_COOKIE and b[1] == 0x01:
        return "stun"
    if (n >= 8 and b[0] & 0xC0 == 0 and b[1] & 0x3F == 0 and b[7] == 0
            and b[2:4] in (b"\x7a\x11", b"\x7a\x12")):
        return "geneve"
    if n >= 38 and b[:6] == MAGIC:
        return "disco"
    return "wireguard"


class DiscoCodec:
    """Seal/open disco packets with precomputed per-peer shared keys."""

    def __init__(self, disco_private, rng=os.urandom):
        self._priv = PrivateKey(disco_private.raw)
        self.public = bytes(self._priv.public_key)
        self._rng = rng
        self._boxes: dict[bytes, SecretBox] = {}
        self.counters = {"disco_rx": 0, "disco_tx": 0, "disco_short": 0, "disco_unknown_sender": 0,
                         "disco_bad_box": 0, "disco_bad_message": 0}

    def _box(self, peer: bytes) -> SecretBox:
        box = self._boxes.get(peer)
        if box is None:
            if len(self._boxes) > 65536:
                self._boxes.clear()
            box = SecretBox(crypto_box_beforenm(bytes(peer), bytes(self._priv)))
            self._boxes[peer] = box
        return box

    def set_peers(self, disco_publics) -> None:
        """Restrict opening to these peers' disco keys (rebuild on every netmap change)."""
        keys = {bytes(k) for k in disco_publics}
        self._boxes = {k: self._boxes.get(k) or self._box(k) for k in keys}
        self._known = keys

    _known = None

    def seal(self, peer_disco: bytes, message: bytes) -> bytes:
        nonce = self._rng(24)
        self.counters["disco_tx"] += 1
        return MAGIC + self.public + nonce + self._box(bytes(peer_disco)).encrypt(message, nonce).ciphertext

    def open(self, pkt: bytes):
        """-> (sender_disco_public, message tuple) or None (dropped, counted)."""
        if len(pkt) < HEADER_LEN + 16 or pkt[:6] != MAGIC:
            self.counters["disco_short"] += 1
            return None
        sender = bytes(pkt[6:38])
        if self._known is not None and sender not in self._known:
            self.counters["disco_unknown_sender"] += 1
            return None
        try:
            inner = self._box(sender).decrypt(bytes(pkt[62:]), bytes(pkt[38:62]))
        except Exception:
            self.counters["disco_bad_box"] += 1
            return None
        msg = parse_message(inner)
        if msg is None:
            self.counters["disco_bad_message"] += 1
            return None
        self.counters["disco_rx"] += 1
        return sender, msg
