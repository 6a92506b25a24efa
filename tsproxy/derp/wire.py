"""DERP frame codec (PROTOCOL.md 5.4).

    +------+----------------+-----------------+
    | type | length (u32be) | payload[length] |
    +------+----------------+-----------------+

FrameReader buffers a byte stream and yields (type, payload) tuples; a frame longer than
MAX_FRAME (1 MiB, the Go client's limit) raises RemoteProtocolError before it is buffered.
"""
import struct

from tsproxy.errors import RemoteProtocolError

MAGIC = b"DERP\xf0\x9f\x94\x91"
PROTOCOL_VERSION = 2
KEY_LEN = 32
NONCE_LEN = 24
MAX_PACKET = 64 << 10
MAX_FRAME = 1 << 20
MAX_CLIENT_INFO = 256 << 10

SERVER_KEY = 0x01
CLIENT_INFO = 0x02
SERVER_INFO = 0x03
SEND_PACKET = 0x04
RECV_PACKET = 0x05
KEEP_ALIVE = 0x06
NOTE_PREFERRED = 0x07
PEER_GONE = 0x08
PEER_PRESENT = 0x09
FORWARD_PACKET = 0x0A
WATCH_CONNS = 0x10
CLOSE_PEER = 0x11
PING = 0x12
PONG = 0x13
HEALTH = 0x14
RESTARTING = 0x15

PEER_GONE_DISCONNECTED = 0x00
PEER_GONE_NOT_HERE = 0x01

HEADER = struct.Struct(">BI")
_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
RESTARTING_BODY = struct.Struct(">II")


def build_frame(ftype: int, payload: bytes = b"") -> bytes:
    return _pack_header(ftype, len(payload)) + payload


def build_server_key(server_public: bytes) -> bytes:
    return build_frame(SERVER_KEY, MAGIC + server_public)


def parse_server_key(payload: bytes) -> bytes:
    if len(payload) < 40 or payload[:8] != MAGIC:
        raise RemoteProtocolError("DERP ServerKey frame: bad magic or length")
    return bytes(payload[8:40])


def build_send_packet(dst: bytes, data: bytes) -> bytes:
    if len(data) > MAX_PACKET:
        raise ValueError("DERP packet larger than 64 KiB")
    return _pack_header(SEND_PACKET, KEY_LEN + len(data)) + dst + data


def build_recv_packet(src: bytes, data: bytes) -> bytes:
    return _pack_header(RECV_PACKET, KEY_LEN + len(data)) + src + data


def build_peer_gone(key: bytes, reason: int = PEER_GONE_DISCONNECTED) -> bytes:
    return build_frame(PEER_GONE, key + bytes((reason,)))


def build_restarting(reconnect_ms: int, try_for_ms: int) -> bytes:
    return build_frame(RESTARTING, RESTARTING_BODY.pack(reconnect_ms, try_for_ms))


class FrameReader:
    """Incremental frame splitter with a bounded buffer."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out = []
        off = 0
        n = len(buf)
        while n - off >= 5:
            ftype, length = _unpack_header(buf, off)
            if length > self._max:
                raise RemoteProtocolError(f"DERP frame type {ftype:#x} too large ({length} bytes)")
            end = off + 5 + length
            if end > n:
                break
            out.append((ftype, bytes(buf[off + 5:end])))
            off = end
        if off:
            del buf[:off]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
