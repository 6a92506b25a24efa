"""Sans-IO DERP client (PROTOCOL.md 5.2, 5.4, 5.9).

Feed the bytes that follow the HTTP 101 response to receive_data(); write data_to_send() to the
stream; read events with next_event().  Events are tuples so the receive path stays cheap:

    ("connected", server_public: bytes, server_info: dict)
    ("packet", src: bytes, data: bytes)
    ("peer_gone", key: bytes, reason: int)
    ("peer_present", key: bytes)
    ("health", text: str)
    ("restarting", reconnect_s: float, try_for_s: float)
    ("pong", data: bytes)

Liveness: any frame resets the 120 s receive deadline; handle_timer() past it raises
RemoteProtocolError (the aio layer then reconnects).
"""
import json
import os
from collections import deque

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from tsproxy.derp import wire
from tsproxy.errors import RemoteProtocolError

READ_TIMEOUT = 120.0
MAX_QUEUED_EVENTS = 4096

CLIENT_INFO_JSON = b'{"version":2,"CanAckPings":true}'


class DerpClient:
    def __init__(self, node_private, *, now: float, preferred: bool = False, rng=os.urandom,
                 server_public: bytes | None = None):
        self._priv = PrivateKey(node_private.raw)
        self.public = bytes(self._priv.public_key)
        self._rng = rng
        self._reader = wire.FrameReader()
        self._out = bytearray()
        self._events: deque = deque()
        self._preferred = preferred
        self.server_public = server_public
        self.server_info: dict | None = None
        self.connected = False
        self._error: RemoteProtocolError | None = None
        self._deadline = now + READ_TIMEOUT
        self.counters = {"rx_packets": 0, "tx_packets": 0, "keepalives": 0, "pings": 0,
                         "unknown_frames": 0, "events_dropped": 0}
        if server_public is not None:  # fast start: key known out of band
            self._send_client_info()

    # -- input -------------------------------------------------------------------------------
    def receive_data(self, data: bytes, now: float) -> None:
        if self._error is not None:
            raise self._error
        try:
            frames = self._reader.feed(data)
            self._deadline = now + READ_TIMEOUT
            for ftype, payload in frames:
                self._on_frame(ftype, payload)
        except RemoteProtocolError as e:
            self._error = e
            raise

    def _emit(self, ev) -> None:
        if len(self._events) >= MAX_QUEUED_EVENTS:
            self.counters["events_dropped"] += 1
            return
        self._events.append(ev)

    def _on_frame(self, ftype: int, p: bytes) -> None:
        if ftype == wire.RECV_PACKET:
            if len(p) < 32:
                raise RemoteProtocolError("DERP RecvPacket shorter than a key")
            self.counters["rx_packets"] += 1
            self._emit(("packet", p[:32], p[32:]))
        elif ftype == wire.KEEP_ALIVE:
            self.counters["keepalives"] += 1
        elif ftype == wire.SERVER_KEY:
            if self.server_public is not None:
                raise RemoteProtocolError("DERP: unexpected second ServerKey")
            self.server_public = wire.parse_server_key(p)
            try:
                self._send_client_info()
            except CryptoError:          # libsodium refuses low-order keys (e.g. all zeros)
                raise RemoteProtocolError("DERP ServerKey is not a usable key") from None
        elif ftype == wire.SERVER_INFO:
            if self.server_public is None or len(p) < wire.NONCE_LEN + 16:
                raise RemoteProtocolError("DERP ServerInfo before ServerKey or too short")
            box = Box(self._priv, PublicKey(self.server_public))
            try:
                js = box.decrypt(p[24:], p[:24])
                info = json.loads(js)
            except Exception as e:
                raise RemoteProtocolError(f"DERP ServerInfo cannot be opened: {type(e).__name__}")
            if not isinstance(info, dict):
                raise RemoteProtocolError("DERP ServerInfo is not a JSON object")
            self.server_info = info
            self.connected = True
            self._emit(("connected", self.server_public, info))
        elif ftype == wire.PEER_GONE:
            if len(p) < 32:
                raise RemoteProtocolError("DERP PeerGone too short")
            self._emit(("peer_gone", p[:32], p[32] if len(p) > 32 else 0))
        elif ftype == wire.PEER_PRESENT:
            if len(p) < 32:
                raise RemoteProtocolError("DERP PeerPresent too short")
            self._emit(("peer_present", p[:32]))
        elif ftype == wire.PING:
            if len(p) < 8:
                raise RemoteProtocolError("DERP Ping shorter than 8 bytes")
            self.counters["pings"] += 1
            self._out += wire.build_frame(wire.PONG, p[:8])
        elif ftype == wire.PONG:
            if len(p) < 8:
                raise RemoteProtocolError("DERP Pong shorter than 8 bytes")
            self._emit(("pong", p[:8]))
        elif ftype == wire.HEALTH:
            self._emit(("health", p.decode("utf-8", "replace")))
        elif ftype == wire.RESTARTING:
            if len(p) < 8:
                raise RemoteProtocolError("DERP Restarting too short")
            a, b = wire.RESTARTING_BODY.unpack_from(p)
            self._emit(("restarting", a / 1000.0, b / 1000.0))
        else:
            self.counters["unknown_frames"] += 1

    def _send_client_info(self) -> None:
        box = Box(self._priv, PublicKey(self.server_public))
        nonce = self._rng(24)
        sealed = box.encrypt(CLIENT_INFO_JSON, nonce).ciphertext
        self._out += wire.build_frame(wire.CLIENT_INFO, self.public + nonce + sealed)
        if self._preferred:
            self._out += wire.build_frame(wire.NOTE_PREFERRED, b"\x01")

    # -- output ------------------------------------------------------------------------------
    def send_packet(self, dst: bytes, data: bytes) -> None:
        self.counters["tx_packets"] += 1
        self._out += wire.build_send_packet(bytes(dst), data)

    def note_preferred(self, preferred: bool) -> None:
        self._preferred = preferred
        if self.server_public is not None:
            self._out += wire.build_frame(wire.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")

    def send_ping(self, data: bytes) -> None:
        self._out += wire.build_frame(wire.PING, data[:8].ljust(8, b"\0"))

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        if now >= self._deadline:
            self._error = RemoteProtocolError("DERP: no frame for 120 s")
            raise self._error
