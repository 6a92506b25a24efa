"""Typed Curve25519 keys and their text forms (PROTOCOL.md section 1.1).

Public keys: ``nodekey:``/``mkey:``/``discokey:`` + 64 lowercase hex digits; WireGuard's
base64 form for wg-quick files.  Private keys: ``privkey:`` + hex; their repr never shows
the secret.  ``short()`` is the log form Go uses: ``[`` + first 5 base64 chars + ``]``.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Callable, ClassVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tsproxy.errors import ConfigError

KEY_LEN = 32


def _clamp(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


class _Key:
    """32 raw bytes with a typed text form.  Immutable, hashable, comparable."""

    __slots__ = ("raw",)
    PREFIX: ClassVar[str] = ""

    def __init__(self, raw: bytes):
        if len(raw) != KEY_LEN:
            raise ValueError(f"{type(self).__name__} needs {KEY_LEN} bytes, got {len(raw)}")
        object.__setattr__(self, "raw", bytes(raw))

    def __setattr__(self, name, value):
        raise AttributeError("keys are immutable")

    def __eq__(self, other):
        return type(other) is type(self) and other.raw == self.raw

    def __hash__(self):
        return hash((type(self).__name__, self.raw))

    def __bytes__(self) -> bytes:
        return self.raw

    def is_zero(self) -> bool:
        return self.raw == bytes(KEY_LEN)

    @classmethod
    def from_text(cls, text: str):
        if not isinstance(text, str) or not text.startswith(cls.PREFIX):
            raise ValueError(f"key text must start with {cls.PREFIX!r}")
        digits = text[len(cls.PREFIX):]
        if len(digits) != 2 * KEY_LEN:
            raise ValueError(f"key text needs {2 * KEY_LEN} hex digits after {cls.PREFIX!r}")
        try:
            return cls(bytes.fromhex(digits))
        except ValueError:
            raise ValueError("key text has non-hex digits") from None

    @classmethod
    def from_base64(cls, text: str):
        """WireGuard / wg-quick form (44 chars of standard base64)."""
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
        if len(raw) != KEY_LEN:
            raise ValueError(f"decodes to {len(raw)} bytes, a key has {KEY_LEN}")
        return cls(raw)

    def b64(self) -> str:
        return base64.b64encode(self.raw).decode()


class _PublicKey(_Key):
    __slots__ = ()

    def text(self) -> str:
        return self.PREFIX + self.raw.hex()

    __str__ = text

    def short(self) -> str:
        return "[" + self.b64()[:5] + "]"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.PREFIX}{self.raw.hex()[:8]}…)"


class _PrivateKey(_Key):
    """A private key; repr/str are redacted so it cannot leak into logs by accident."""

    __slots__ = ()
    PREFIX = "privkey:"
    PUBLIC: ClassVar[type]

    @classmethod
    def generate(cls, rng: Callable[[int], bytes] = os.urandom):
        return cls(_clamp(rng(KEY_LEN)))

    def public(self):
        pub = X25519PrivateKey.from_private_bytes(self.raw).public_key().public_bytes_raw()
        return self.PUBLIC(pub)

    def exchange(self, peer: _PublicKey) -> bytes:
        """X25519 shared secret with a peer public key."""
        return X25519PrivateKey.from_private_bytes(self.raw).exchange(
            X25519PublicKey.from_public_bytes(peer.raw))

    def text(self) -> str:
        """Secret text form for state files only; never log it."""
        return self.PREFIX + self.raw.hex()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<redacted>)"

    __str__ = __repr__


class NodePublic(_PublicKey):
    __slots__ = ()
    PREFIX = "nodekey:"


class MachinePublic(_PublicKey):
    __slots__ = ()
    PREFIX = "mkey:"


class DiscoPublic(_PublicKey):
    __slots__ = ()
    PREFIX = "discokey:"


class NodePrivate(_PrivateKey):
    __slots__ = ()
    PUBLIC = NodePublic


class MachinePrivate(_PrivateKey):
    __slots__ = ()
    PUBLIC = MachinePublic


class DiscoPrivate(_PrivateKey):
    __slots__ = ()
    PUBLIC = DiscoPublic


def parse_wg_key(text: str, what: str, cls=NodePublic):
    """Parse a wg-quick base64 key, raising ConfigError that names `what` but not the value."""
    try:
        return cls.from_base64(text)
    except ValueError as e:
        raise ConfigError(f"invalid key ({e})", key=what) from None
