"""TCP constants shared by the connection modules: states, events, timer and buffer
defaults, and sequence-number helpers (unwrap to absolute numbers, RFC 6528 ISNs)."""

from __future__ import annotations

import hashlib

from tsproxy.netstack.wire import tcp as W

CLOSED = "CLOSED"
SYN_SENT = "SYN-SENT"
SYN_RECEIVED = "SYN-RECEIVED"
ESTABLISHED = "ESTABLISHED"
FIN_WAIT_1 = "FIN-WAIT-1"
FIN_WAIT_2 = "FIN-WAIT-2"
CLOSE_WAIT = "CLOSE-WAIT"
CLOSING = "CLOSING"
LAST_ACK = "LAST-ACK"
TIME_WAIT = "TIME-WAIT"

SYNCHRONIZED = {ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT, CLOSING, LAST_ACK, TIME_WAIT}
CAN_SEND = {ESTABLISHED, CLOSE_WAIT}
CAN_RECEIVE_DATA = {ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2}

M32 = 0xFFFFFFFF
RTO_MIN = 0.2
RTO_MAX = 60.0
RTO_INITIAL = 1.0
SYN_RETRIES = 6
DATA_RETRIES = 15
DELACK = 0.04
DUPTHRESH = 3
DEFAULT_BUF = 4 * 1024 * 1024
DEFAULT_WSCALE = 7
DEFAULT_MSL = 30.0
PERSIST_MAX = 60.0
MAX_SACKED_RANGES = 512         # sender scoreboard entries: holes, not bytes (bounds per-ACK work)

ACK = W.ACK
FIN = W.FIN
SYN = W.SYN
RST = W.RST
PSH = W.PSH

# events
EV_CONNECTED = "connected"
EV_READABLE = "readable"
EV_WRITABLE = "writable"
EV_EOF = "eof"
EV_CLOSED = "closed"
EV_ERROR = "error"           # detail: "refused" | "reset" | "timeout" | "unreachable" | ...


def unwrap(ref: int, value: int) -> int:
    """The absolute sequence number closest to `ref` whose low 32 bits are `value`."""
    d = (value - ref) & M32
    if d >= 0x80000000:
        d -= 0x100000000
    return ref + d


def initial_sequence_number(secret: bytes, key: tuple, now: float) -> int:
    """RFC 6528: ISN = M + F(secret, 4-tuple), M a 4 us clock.  `key` holds packed addresses
    (bytes) and ports (ints) in any fixed order."""
    h = hashlib.blake2s(b"".join(k if isinstance(k, bytes) else k.to_bytes(2, "big") for k in key),
                        key=secret[:32], digest_size=4).digest()
    return (int(now * 250_000) + int.from_bytes(h, "big")) & M32
