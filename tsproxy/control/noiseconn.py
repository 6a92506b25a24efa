"""Sans-IO TS2021 Noise connection: upgrade + handshake + transport records (PROTOCOL.md 2.2-2.6).

    ClientHandshake  builds the upgrade request, consumes the 101 head and the Noise response,
                     then hands over a NoiseConnection (with any bytes that followed).
    ServerHandshake  the mirror for a test control server: consumes the upgrade request, emits
                     101 + response (+ optional early payload) and a NoiseConnection.
    NoiseConnection  records in/out with big-endian nonces, each direction its own counter,
                     plaintext split into <= 4077-byte records, client-side early payload strip.

Errors are RemoteProtocolError and sticky: once the connection failed every later call raises.
Every buffer is bounded (MAX_BUFFER).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag

from tsproxy.control import wire
from tsproxy.errors import LocalProtocolError, RemoteProtocolError
from tsproxy.noise.ik import (MSG_ERROR, MSG_RECORD, RESPONSE_LEN, HandshakeResult, Initiator,
                              Responder, build_error_message)
from tsproxy.noise.primitives import NONCE_BE, aead

MAX_BUFFER = 1 << 20            # unread plaintext / undecrypted bytes kept per connection
_MAX_NONCE = (1 << 64) - 1      # "cipher exhausted": this counter value is never used
_pack_nonce = NONCE_BE.pack
_unpack_hdr = wire.RECORD_HEADER.unpack_from
_pack_hdr = wire.RECORD_HEADER.pack
_GO_FRAMING_ERRORS = ("wrong handshake initiation size", "unexpected handshake message type",
                      "wrong handshake initiation length")


class NoiseConnection:
    """Transport phase.  Feed raw bytes with receive_data(); read plaintext with read();
    write plaintext with write(); take raw bytes with data_to_send()."""

    def __init__(self, result: HandshakeResult, *, expect_early_payload: bool = False,
                 max_buffer: int = MAX_BUFFER):
        self.result = result
        self.peer_static = result.peer_static
        self.handshake_hash = result.handshake_hash
        self._enc = aead(result.send_key).encrypt
        self._dec = aead(result.recv_key).decrypt
        self._send_n = 0
        self._recv_n = 0
        self._inbuf = bytearray()
        self._plain = bytearray()
        self._out = bytearray()
        self._max = max_buffer
        self._error: RemoteProtocolError | None = None
        self._early_pending = expect_early_payload     # client: look at the first 9 bytes
        self.early_payload: dict | None = None
        self.records_in = 0
        self.records_out = 0

    # -- inbound --
    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if len(self._inbuf) + len(data) > self._max + wire.MAX_FRAME:
            self._fail("noise: receive buffer overflow")
        self._inbuf += data
        buf = self._inbuf
        pos = 0
        try:
            while len(buf) - pos >= 3:
                typ, n = _unpack_hdr(buf, pos)
                if typ != MSG_RECORD:
                    if typ == MSG_ERROR:
                        self._fail("noise: unexpected error message after handshake")
                    self._fail(f"noise: unexpected message type {typ}")
                if n > wire.MAX_CIPHERTEXT:
                    self._fail("noise: record exceeds max allowed Noise frame size")
                if n < wire.TAG_LEN:
                    self._fail("noise: record shorter than its tag")
                if len(buf) - pos < 3 + n:
                    break
                if self._recv_n >= _MAX_NONCE:
                    self._fail("noise: receive cipher exhausted")
                try:
                    pt = self._dec(_pack_nonce(self._recv_n), bytes(buf[pos + 3:pos + 3 + n]),
                                   None)
                except InvalidTag:
                    self._fail("noise: record authentication failed")
                self._recv_n += 1
                self.records_in += 1
                pos += 3 + n
                if pt:
                    limit = self._max + (wire.MAX_EARLY_JSON if self._early_pending else 0)
                    if len(self._plain) + len(pt) > limit:
                        self._fail("noise: unread plaintext exceeds buffer bound")
                    self._plain += pt
        finally:
            del buf[:pos]
        if self._early_pending:
            self._strip_early_payload()

    def _strip_early_payload(self) -> None:
        plain = self._plain
        if len(plain) < wire.EARLY_HEADER_LEN:
            return
        n = wire.early_payload_length(bytes(plain[:wire.EARLY_HEADER_LEN]))
        if n is None:
            self._early_pending = False           # these are HTTP/2 bytes: keep them
            return
        if len(plain) < wire.EARLY_HEADER_LEN + n:
            return
        self.early_payload = wire.parse_early_json(
            bytes(plain[wire.EARLY_HEADER_LEN:wire.EARLY_HEADER_LEN + n]))
        del plain[:wire.EARLY_HEADER_LEN + n]
        self._early_pending = False

    def _fail(self, msg: str):
        self._error = RemoteProtocolError(msg)
        raise self._error

    @property
    def failed(self) -> bool:
        return self._error is not None

    def read(self, max_bytes: int = -1) -> bytes:
        """Plaintext received so far (at most max_bytes); empty while the early payload is
        still incomplete."""
        if self._early_pending:
            return b""
        plain = self._plain
        if max_bytes < 0 or max_bytes >= len(plain):
            out = bytes(plain)
            plain.clear()
        else:
            out = bytes(plain[:max_bytes])
            del plain[:max_bytes]
        return out

    def pending_plaintext(self) -> int:
        return 0 if self._early_pending else len(self._plain)

    # -- outbound --
    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        mv = memoryview(data)
        if len(self._out) + len(mv) > self._max * 16:
            raise LocalProtocolError("noise: send buffer overflow (take data_to_send())")
        step = wire.MAX_PLAINTEXT
        for off in range(0, len(mv), step):
            chunk = mv[off:off + step]
            if self._send_n >= _MAX_NONCE:
                self._error = RemoteProtocolError("noise: send cipher exhausted")
                raise self._error
            ct = self._enc(_pack_nonce(self._send_n), bytes(chunk), None)
            self._send_n += 1
            self.records_out += 1
            self._out += _pack_hdr(MSG_RECORD, len(ct))
            self._out += ct

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out


class ClientHandshake:
    """Client: request bytes first (`request`), then receive_data() until `connection` is set.
    `host` is the Host header (host[:port])."""

    def __init__(self, machine_private, server_public, host: str, *, version: int = 130,
                 rng=os.urandom, method: str = "POST"):
        self._ini = Initiator(machine_private, server_public, version=version, rng=rng)
        self.request = wire.build_upgrade_request(host, self._ini.initiation, method=method)
        self._buf = bytearray()
        self._head_done = False
        self.connection: NoiseConnection | None = None

    def receive_data(self, data: bytes) -> NoiseConnection | None:
        """Returns the NoiseConnection once the handshake finished (extra bytes already fed
        to it); raises RemoteProtocolError on an HTTP or Noise failure."""
        if self.connection is not None:
            self.connection.receive_data(data)
            return self.connection
        self._buf += data
        if not self._head_done:
            split = wire.split_http_head(bytes(self._buf))
            if split is None:
                return None
            head, rest = split
            wire.check_upgrade_response(head)
            self._head_done = True
            self._buf = bytearray(rest)
        buf = self._buf
        if len(buf) < 3:
            return None
        if buf[0] == MSG_ERROR:
            n = int.from_bytes(buf[1:3], "big")
            if len(buf) < 3 + n:
                return None
            self._ini.receive_response(bytes(buf[:3 + n]))     # raises with the text
        if len(buf) < RESPONSE_LEN:
            return None
        result = self._ini.receive_response(bytes(buf[:RESPONSE_LEN]))
        conn = NoiseConnection(result, expect_early_payload=True)
        rest = bytes(buf[RESPONSE_LEN:])
        self._buf = bytearray()
        self.connection = conn
        if rest:
            conn.receive_data(rest)
        return conn


class ServerHandshake:
    """Server: receive_data() the upgrade request; when `connection` is set, send
    data_to_send() (101 head + Noise response + early payload records if asked)."""

    def __init__(self, responder: Responder, *, early_challenge: bytes | None = None):
        self._responder = responder
        self._early = early_challenge
        self._buf = bytearray()
        self._out = bytearray()
        self.connection: NoiseConnection | None = None
        self.version: int | None = None

    def receive_data(self, data: bytes) -> NoiseConnection | None:
        if self.connection is not None:
            self.connection.receive_data(data)
            return self.connection
        self._buf += data
        split = wire.split_http_head(bytes(self._buf))
        if split is None:
            return None
        head, rest = split
        initiation = wire.parse_upgrade_request(head)
        self._out += wire.UPGRADE_RESPONSE
        try:
            response, result = self._responder.respond(initiation)
        except RemoteProtocolError as exc:
            # Go answers framing errors with a type-3 message; a failed decryption just closes.
            if str(exc) in _GO_FRAMING_ERRORS:
                self._out += build_error_message(str(exc))
            raise
        self.version = result.version
        self._out += response
        conn = NoiseConnection(result)
        if self._early is not None:
            conn.write(wire.build_early_payload(self._early))
            self._out += conn.data_to_send()
        self.connection = conn
        self._buf = bytearray()
        if rest:
            conn.receive_data(rest)
        return conn

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        if self.connection is not None:
            out += self.connection.data_to_send()
        return out
