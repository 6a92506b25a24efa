"""TS2021 framing around the Noise handshake (PROTOCOL.md 2.1, 2.2, 2.5, 2.6).

Upgrade (HTTP/1.1 on a fresh TCP/TLS connection):

    POST /ts2021 HTTP/1.1
    Host: <host>
    Upgrade: tailscale-control-protocol
    Connection: upgrade
    X-Tailscale-Handshake: <base64 of the 101-byte initiation>
    Content-Length: 0

    -> HTTP/1.1 101 Switching Protocols, Upgrade: tailscale-control-protocol, then raw bytes:
       51-byte Noise response (or a type-3 error), then records.

Record:   type=4 | ciphertext length u16be | ChaCha20-Poly1305(k, nonce=0000|counter u64be, no AD)
          total <= 4096 bytes, so plaintext <= 4077 per record.

Early payload (first plaintext bytes from the server, optional):
          FF FF FF 54 53 | JSON length u32be | {"nodeKeyChallenge":"chalpub:<hex>"}
"""

from __future__ import annotations

import base64
import binascii
import json
import struct

from tsproxy.errors import RemoteProtocolError
from tsproxy.noise.ik import (INITIATION_LEN, MSG_ERROR, MSG_RECORD, MSG_RESPONSE,  # noqa: F401
                              RESPONSE_LEN, build_error_message, parse_error_message)

UPGRADE_PROTOCOL = "tailscale-control-protocol"
HANDSHAKE_HEADER = "X-Tailscale-Handshake"
UPGRADE_PATH = "/ts2021"
KEY_PATH = "/key"

MAX_FRAME = 4096
RECORD_HEADER_LEN = 3
TAG_LEN = 16
MAX_CIPHERTEXT = MAX_FRAME - RECORD_HEADER_LEN          # 4093
MAX_PLAINTEXT = MAX_CIPHERTEXT - TAG_LEN                # 4077

EARLY_MAGIC = b"\xff\xff\xffTS"
EARLY_HEADER_LEN = 9
MAX_EARLY_JSON = 10 << 20
MAX_KEY_RESPONSE = 64 << 10
MAX_HTTP_HEADER = 16 << 10

RECORD_HEADER = struct.Struct(">BH")
EARLY_HEADER = struct.Struct(">5sI")


# ---- GET /key --------------------------------------------------------------------------------

def key_path(version: int) -> str:
    return f"{KEY_PATH}?v={version}"


def parse_key_response(body: bytes) -> bytes:
    """The server's Noise public key (32 raw bytes) from the /key JSON body."""
    if len(body) > MAX_KEY_RESPONSE:
        raise RemoteProtocolError("/key response too large")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RemoteProtocolError("control server is too old; no noise key (/key is not JSON)") \
            from None
    text = obj.get("publicKey") if isinstance(obj, dict) else None
    if not isinstance(text, str) or not text.startswith("mkey:"):
        raise RemoteProtocolError("control server is too old; no noise key")
    try:
        raw = bytes.fromhex(text[5:])
    except ValueError:
        raise RemoteProtocolError("/key: publicKey is not hex") from None
    if len(raw) != 32 or raw == bytes(32):
        raise RemoteProtocolError("control server is too old; no noise key")
    return raw


def build_key_response(public: bytes) -> bytes:
    return json.dumps({"legacyPublicKey": "mkey:" + "0" * 64,
                       "publicKey": "mkey:" + public.hex()}).encode()


# ---- HTTP/1.1 upgrade ------------------------------------------------------------------------

def build_upgrade_request(host: str, initiation: bytes, *, method: str = "POST",
                          user_agent: str = "tsproxy") -> bytes:
    """`host` is the Host header value (with :port when the control URL had one)."""
    if len(initiation) != INITIATION_LEN:
        raise ValueError("initiation must be 101 bytes")
    hs = base64.b64encode(initiation).decode()
    return (f"{method} {UPGRADE_PATH} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"User-Agent: {user_agent}\r\n"
            f"Upgrade: {UPGRADE_PROTOCOL}\r\n"
            f"Connection: upgrade\r\n"
            f"{HANDSHAKE_HEADER}: {hs}\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def split_http_head(buf: bytes) -> tuple[bytes, bytes] | None:
    """(head without the blank line, rest) once a full header block is in `buf`, else None.
    Raises if the header block grows past MAX_HTTP_HEADER."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        if len(buf) > MAX_HTTP_HEADER:
            raise RemoteProtocolError("HTTP header block too large")
        return None
    if i > MAX_HTTP_HEADER:
        raise RemoteProtocolError("HTTP header block too large")
    return buf[:i], buf[i + 4:]


def parse_http_head(head: bytes) -> tuple[str, dict[str, str]]:
    """(first line, {lower-case name: value}); later duplicates win."""
    try:
        lines = head.decode("latin-1").split("\r\n")
    except UnicodeDecodeError:                           # pragma: no cover - latin-1 is total
        raise RemoteProtocolError("bad HTTP header") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise RemoteProtocolError("malformed HTTP header line")
        headers[name.lower()] = value.strip()
    return lines[0], headers


def check_upgrade_response(head: bytes) -> None:
    """Require `101` and `Upgrade: tailscale-control-protocol` exactly (as the Go client)."""
    status_line, headers = parse_http_head(head)
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise RemoteProtocolError("control upgrade: not an HTTP/1.x response")
    if parts[1] != "101":
        reason = parts[2] if len(parts) > 2 else ""
        raise RemoteProtocolError(f"control upgrade: unexpected HTTP status {parts[1]} {reason}"
                                  .rstrip()[:200])
    if headers.get("upgrade") != UPGRADE_PROTOCOL:
        raise RemoteProtocolError("control upgrade: server did not switch to "
                                  + UPGRADE_PROTOCOL)


def parse_upgrade_request(head: bytes) -> bytes:
    """Server side: validate the upgrade request head and return the 101-byte initiation."""
    request_line, headers = parse_http_head(head)
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[0] not in ("POST", "GET") or \
            parts[1].split("?", 1)[0] != UPGRADE_PATH:
        raise RemoteProtocolError("not a ts2021 upgrade request")
    if headers.get("upgrade") != UPGRADE_PROTOCOL:
        raise RemoteProtocolError("missing next protocol")
    try:
        init = base64.b64decode(headers.get(HANDSHAKE_HEADER.lower(), ""), validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError("invalid handshake header") from None
    if not init:
        raise RemoteProtocolError("no handshake header")
    return init


UPGRADE_RESPONSE = (f"HTTP/1.1 101 Switching Protocols\r\n"
                    f"Upgrade: {UPGRADE_PROTOCOL}\r\n"
                    f"Connection: upgrade\r\n\r\n").encode()


# ---- early payload ---------------------------------------------------------------------------

def build_early_payload(challenge_public: bytes) -> bytes:
    body = json.dumps({"nodeKeyChallenge": "chalpub:" + challenge_public.hex()},
                      separators=(",", ":")).encode()
    return EARLY_HEADER.pack(EARLY_MAGIC, len(body)) + body


def early_payload_length(first9: bytes) -> int | None:
    """Given the first 9 plaintext bytes: the JSON length if they start an early payload,
    None if they are already HTTP/2 bytes (to be kept)."""
    magic, n = EARLY_HEADER.unpack_from(first9)
    if magic != EARLY_MAGIC:
        return None
    if n > MAX_EARLY_JSON:
        raise RemoteProtocolError("early payload too large")
    return n


def parse_early_json(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RemoteProtocolError("early payload is not JSON") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("early payload is not a JSON object")
    return obj
