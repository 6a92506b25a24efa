"""One TCP connection (RFC 9293), sans-IO.

The stack feeds parsed segments (`receive_segment`) and timer ticks (`handle_timer`); the
connection appends whole IP packets to the stack's outbox through its Packetizer, and queues
events (`take_events`) for the stream layer: connected, readable, writable, eof, closed,
error(kind).

Sequence numbers are unwrapped 64-bit-ish Python ints inside (wire values are `& 0xFFFFFFFF`),
so comparisons are plain `<`.  Buffers are bounded: the send buffer by `snd_cap` (send()
accepts what fits: that is the writer's backpressure), the receive buffer by `rcv_cap` (the
advertised window is what is free in it: a slow reader closes the window).

Loss recovery: SACK (RFC 2018) scoreboard with FACK-style loss marking, conservative pipe
accounting after RFC 6675, NewReno (RFC 6582) partial-ACK handling when the peer has no SACK,
RTO per RFC 6298 (200 ms floor, Karn's rule, exponential backoff) falling back to slow start.
Congestion control is pluggable (tcp_cc.py): NewReno with RFC 3465 byte counting by default,
CUBIC (RFC 9438) with `cc=Cubic()`.

Seam with stack.py (the stack owns demux, ports, listeners and ISNs; see
`initial_sequence_number`):
    TcpConnection(out, packetizer, *, now, iss, mss, notify=None, counters=None,
                  rcv_cap=4 MiB, snd_cap=4 MiB, sack=True, wscale=7 | None, msl=30.0,
                  keepalive=None | idle seconds, cc=None)
    connect(now)                                active open (sends SYN)
    accept_syn(seq, window, options, now)       passive open for a listener's SYN
    receive_segment(seq, ack, flags, window, options: bytes, payload, now)   wire values
    next_deadline() -> float | None ; handle_timer(now)
    send(data, now) -> int accepted ; send_space() ; recv(max_bytes, now) -> bytes
    readable_bytes() ; shutdown_write(now) ; close(now) ; abort(now) ; icmp_error(kind, now)
    take_events() -> [(EV_*, detail)] ; `notify(conn)` is called on every new event
    state (RFC 9293 names), error, eof, counters (shared dict of named drop/recovery counters)
Segments go out as whole IP packets appended to `out` (built by the packetizer).
"""

from __future__ import annotations

import bisect
import hashlib

from tsproxy.netstack.tcp_cc import NewReno
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


class TcpConnection:
    def __init__(self, out: list, packetizer: W.Packetizer, *, now: float, iss: int, mss: int,
                 notify=None, counters: dict | None = None, rcv_cap: int = DEFAULT_BUF,
                 snd_cap: int = DEFAULT_BUF, sack: bool = True, wscale: int | None = DEFAULT_WSCALE,
                 msl: float = DEFAULT_MSL, keepalive: float | None = None, cc=None):
        self.out = out
        self.pk = packetizer
        self.notify = notify
        self.counters = counters if counters is not None else {}
        self.state = CLOSED
        self.local_mss = mss
        self.mss = min(mss, 536) if mss < 536 else mss
        self.msl = msl
        self.events: list = []
        self.error: str | None = None
        self.key = None                        # set by the stack (its demux key)

        # send side
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.snd_wscale = 0
        self.buf_seq = iss + 1                 # sequence number of sndbuf[0]
        self.sndbuf = bytearray()
        self.snd_cap = snd_cap
        self.fin_queued = False
        self.fin_seq: int | None = None        # our FIN's sequence number once sent
        self.sack_ok = False
        self.want_sack = sack
        self.want_wscale = wscale

        # receive side
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_buf = bytearray()
        self.rcv_cap = rcv_cap
        self.rcv_wscale = 0
        self.rcv_adv = 0                       # right edge we advertised
        self.ooo: list = []                    # sorted [start, bytes]
        self.ooo_starts: list = []
        self.ooo_bytes = 0
        self.ooo_max = max(64, rcv_cap // 256)  # bounds the segment count, not just bytes
        self.remote_fin: int | None = None     # sequence number of their FIN once seen
        self.eof = False
        self.app_closed = False

        # congestion control and recovery
        self.cwnd = 10 * self.mss
        self.ssthresh = 1 << 40
        self.dupacks = 0
        self.recovery: str | None = None       # None | "fast" | "rto"
        self.recovery_point = 0
        self.rtx_high = 0                      # holes below this were retransmitted this round
        self.sacked: list = []                 # merged sorted [start, end) above snd_una
        self.sacked_bytes = 0
        self.high_sack = 0
        self.cc = cc if cc is not None else NewReno()

        # timers
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = RTO_INITIAL
        self.rto_at: float | None = None
        self.retries = 0
        self.rtt_seq: int | None = None
        self.rtt_time = 0.0
        self.ack_pending = 0
        self.ack_now = False
        self.delack_at: float | None = None
        self.persist_at: float | None = None
        self.persist_backoff = 0
        self.time_wait_at: float | None = None
        self.keepalive = keepalive
        self.keepalive_at: float | None = None
        self.keepalive_probes = 0
        self.last_rx = now

    # ================================================================ opening
    def connect(self, now: float) -> None:
        """Active open: send SYN."""
        self.state = SYN_SENT
        self._send_syn(now)

    def accept_syn(self, seq: int, window: int, options: bytes, now: float) -> None:
        """Passive open from a listener: a SYN arrived for us."""
        self.irs = seq
        self.rcv_nxt = seq + 1
        self._apply_syn_options(W.parse_options(options), window, syn_ack=False)
        self.snd_wnd = window                  # never scaled in a SYN
        self.state = SYN_RECEIVED
        self._send_syn(now)

    def _apply_syn_options(self, opts: dict, window: int, syn_ack: bool) -> None:
        if "mss" in opts:
            self.mss = max(min(self.local_mss, opts["mss"]), 64)
        else:
            self.mss = min(self.local_mss, 536)
        self.cwnd = 10 * self.mss
        self.sack_ok = self.want_sack and opts.get("sack_perm", False)
        if self.want_wscale is not None and "wscale" in opts:
            self.snd_wscale = opts["wscale"]
            self.rcv_wscale = self.want_wscale
        else:
            self.snd_wscale = self.rcv_wscale = 0
            self.want_wscale = None if not syn_ack else self.want_wscale

    def _send_syn(self, now: float) -> None:
        flags = SYN if self.state == SYN_SENT else SYN | ACK
        if self.state == SYN_SENT:
            opts = W.syn_options(self.local_mss, self.want_wscale, self.want_sack)
        else:
            opts = W.syn_options(self.local_mss, self.rcv_wscale if self.want_wscale is not None and self.rcv_wscale else None,
                                 self.sack_ok)
        win = min(self.rcv_cap, 65535)
        self.rcv_adv = self.rcv_nxt + win
        self.out.append(self.pk.build(self.iss, self.rcv_nxt, flags, win, opts))
        self.snd_nxt = max(self.snd_nxt, self.iss + 1)
        self.snd_max = max(self.snd_max, self.snd_nxt)
        if self.rto_at is None:
            self.rto_at = now + self.rto

    # ================================================================ app side
    def send(self, data, now: float) -> int:
        if self.state not in CAN_SEND and self.state not in (SYN_SENT, SYN_RECEIVED):
            return 0
        if self.fin_queued:
            return 0
        room = self.snd_cap - len(self.sndbuf)
        if room <= 0:
            return 0
        n = min(room, len(data))
        self.sndbuf += data[:n] if n < len(data) else data
        if self.state in CAN_SEND:
            self._output(now)
        return n

    def send_space(self) -> int:
        return self.snd_cap - len(self.sndbuf)

    def recv(self, max_bytes: int, now: float) -> bytes:
        buf = self.rcv_buf
        if not buf:
            return b""
        if max_bytes >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:max_bytes])
            del buf[:max_bytes]
        # window update when the window opened enough to matter (receiver SWS avoidance)
        if self.state in CAN_RECEIVE_DATA:
            new_edge = self.rcv_nxt + self._free()
            if new_edge - self.rcv_adv >= min(self.rcv_cap // 2, 2 * self.mss):
                self.ack_now = True
                self._output(now)
        return data

    def readable_bytes(self) -> int:
        return len(self.rcv_buf)

    def shutdown_write(self, now: float) -> None:
        if self.fin_queued or self.state in (CLOSED, TIME_WAIT, FIN_WAIT_1, FIN_WAIT_2, CLOSING, LAST_ACK):
            return
        self.fin_queued = True
        if self.state in CAN_SEND:
            self._output(now)

    def close(self, now: float) -> None:
        self.app_closed = True
        if self.state in (SYN_SENT,):
            self._to_closed(None)
            return
        self.shutdown_write(now)

    def abort(self, now: float) -> None:
        if self.state in SYNCHRONIZED or self.state == SYN_RECEIVED:
            if self.state != TIME_WAIT:
                self.out.append(self.pk.build(self.snd_nxt, self.rcv_nxt, RST | ACK, 0))
                self.counters["tcp_rst_sent"] = self.counters.get("tcp_rst_sent", 0) + 1
        self._to_closed(None)

    def icmp_error(self, kind: str, now: float) -> None:
        """A hard ICMP error for this 4-tuple: fatal while opening, remembered afterwards."""
        if self.state in (SYN_SENT, SYN_RECEIVED):
            self._to_closed(kind)
        else:
            self.error = self.error or kind

    # ================================================================ events
    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _event(self, *ev) -> None:
        if ev[0] == EV_CONNECTED and self.keepalive is not None:
            self.keepalive_at = self.last_rx + self.keepalive
        self.events.append(ev)
        if self.notify is not None:
            self.notify(self)

    def take_events(self) -> list:
        ev, self.events = self.events, []
        return ev

    def _to_closed(self, error: str | None) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.rto_at = self.delack_at = self.persist_at = self.time_wait_at = self.keepalive_at = None
        if error is not None:
            self.error = error
            self._event(EV_ERROR, error)
        self._event(EV_CLOSED, None)

    # ================================================================ input
    def receive_segment(self, seq: int, ack: int, flags: int, window: int, options, payload,
                        now: float) -> None:
        st = self.state
        if st == SYN_SENT:
            self._rx_syn_sent(seq, ack, flags, window, options, payload, now)
            return
        if st == CLOSED:
            self._count("tcp_rx_closed")
            return
        self.last_rx = now
        if self.keepalive is not None:
            self.keepalive_at = now + self.keepalive
            self.keepalive_probes = 0
        seq = unwrap(self.rcv_nxt, seq)
        plen = len(payload)
        if st == SYN_RECEIVED and flags & (SYN | ACK | RST) == SYN | ACK and seq == self.irs \
                and unwrap(self.snd_una, ack) == self.iss + 1:
            self._simultaneous_open_done(window, now)      # their SYN-ACK acks our SYN
            return
        if st == SYN_RECEIVED and flags & (SYN | ACK | RST) == SYN and seq == self.irs:
            self._send_syn(now)            # their SYN again: our SYN-ACK was lost
            return
        # --- 1. sequence acceptability (RFC 9293 3.10.7.4)
        wnd = self.rcv_adv - self.rcv_nxt
        if wnd < 0:
            wnd = 0
        rn = self.rcv_nxt
        if plen == 0:
            # RCV.NXT-1 (keepalive / persist probes) is unacceptable: it earns an ACK below
            ok = seq == rn if wnd == 0 else rn <= seq < rn + wnd
        else:
            ok = wnd > 0 and (rn <= seq < rn + wnd or rn <= seq + plen - 1 < rn + wnd) or (seq < rn and seq + plen > rn)
            if not ok and seq + plen <= rn:
                ok = False
        if not ok:
            self._count("tcp_rx_unacceptable")
            if not flags & RST:
                if wnd == 0 and plen and seq == rn:
                    self.counters["tcp_zero_window_drop"] = self.counters.get("tcp_zero_window_drop", 0) + 1
                self.ack_now = True
                self._output(now)
            return
        # --- 2. RST (RFC 5961 3.2)
        if flags & RST:
            if seq == rn:
                if st == SYN_RECEIVED:
                    self._to_closed("refused")
                elif st in (CLOSING, LAST_ACK, TIME_WAIT):
                    self._to_closed(None)
                else:
                    self._to_closed("reset")
            else:
                self._challenge_ack(now)
            return
        # --- 3. SYN in a synchronized state: challenge ACK (RFC 5961 4)
        if flags & SYN:
            self._challenge_ack(now)
            return
        if not flags & ACK:
            self._count("tcp_rx_no_ack")          # RFC 9293: drop segments without ACK
            return
        ack = unwrap(self.snd_una, ack)
        # --- 4. ACK
        if st == SYN_RECEIVED:
            if self.snd_una < ack <= self.snd_max:
                self.state = st = ESTABLISHED
                self.snd_una = ack
                self.buf_seq = self.iss + 1
                self.snd_wnd = window << self.snd_wscale
                self.snd_wl1, self.snd_wl2 = seq, ack
                self.rto_at = None
                self.retries = 0
                self._event(EV_CONNECTED, None)
            else:
                self.out.append(self.pk.build(ack, 0, RST, 0))
                return
        if ack > self.snd_max:
            self.ack_now = True                # acks something we never sent
            self._output(now)
            return
        self._process_ack(seq, ack, window, options, plen, flags, now)
        if self.state == CLOSED:
            return
        # --- 5. data
        if plen and self.state in CAN_RECEIVE_DATA:
            self._rx_data(seq, payload, now)
        elif plen:
            self.ack_now = True                # data after their FIN or our close: just ack
        # --- 6. FIN
        if flags & FIN:
            fin_at = seq + plen
            if self.remote_fin is None and fin_at >= self.rcv_nxt:
                self.remote_fin = fin_at
            self.ack_now = True
        if self.remote_fin is not None and self.rcv_nxt == self.remote_fin:
            self._rx_fin(now)
        self._output(now)

    def _simultaneous_open_done(self, window: int, now: float) -> None:
        self.state = ESTABLISHED
        self.snd_una = self.iss + 1
        self.snd_wnd = window                 # SYN-ACK windows are never scaled
        self.snd_wl1, self.snd_wl2 = self.irs, self.snd_una
        self.rto_at = None
        self.retries = 0
        self.ack_now = True
        self._event(EV_CONNECTED, None)
        self._output(now)

    def _challenge_ack(self, now: float) -> None:
        self.counters["tcp_challenge_ack"] = self.counters.get("tcp_challenge_ack", 0) + 1
        self.ack_now = True
        self._output(now)

    def _rx_syn_sent(self, seq, ack, flags, window, options, payload, now) -> None:
        self.last_rx = now
        if flags & ACK:
            ack_abs = unwrap(self.snd_una, ack)
            if ack_abs <= self.iss or ack_abs > self.snd_max:
                if not flags & RST:
                    self.out.append(self.pk.build(ack, 0, RST, 0))
                return
            if flags & RST:
                self._to_closed("refused")
                return
        elif flags & RST:
            self._count("tcp_rx_unacceptable")
            return
        if not flags & SYN:
            self._count("tcp_rx_unacceptable")
            return
        self.irs = seq
        self.rcv_nxt = seq + 1
        self._apply_syn_options(W.parse_options(options), window, syn_ack=True)
        if flags & ACK:
            self.snd_una = unwrap(self.snd_una, ack)
            self.buf_seq = self.iss + 1
            self.state = ESTABLISHED
            self.snd_wnd = window                # SYN-ACK windows are never scaled
            self.snd_wl1, self.snd_wl2 = self.rcv_nxt - 1, self.snd_una
            self.rto_at = None
            self.retries = 0
            self.ack_now = True
            self._event(EV_CONNECTED, None)
            self._output(now)
        else:
            self.state = SYN_RECEIVED            # simultaneous open
            self._send_syn(now)

    def _process_ack(self, seq, ack, window, options, plen, flags, now) -> None:
        st = self.state
        # window update (RFC 9293 3.10.7.4 step 5)
        if self.snd_wl1 < seq or (self.snd_wl1 == seq and self.snd_wl2 <= ack):
            self.snd_wnd = window << self.snd_wscale
            self.snd_wl1, self.snd_wl2 = seq, ack
            if self.snd_wnd and self.persist_at is not None:
                self.persist_at = None
                self.persist_backoff = 0
        sack_blocks = None
        if self.sack_ok and options:
            opts = W.parse_options(options)
            sack_blocks = opts.get("sack")
        if sack_blocks:
            self._update_sack(sack_blocks)
        acked = ack - self.snd_una
        if acked > 0:
            self._on_new_ack(ack, acked, now)
        elif acked == 0 and plen == 0 and not flags & FIN and self.snd_max > self.snd_una \
                and (window << self.snd_wscale) == self.snd_wnd:
            self.dupacks += 1
            if self.recovery is None and (self.dupacks >= DUPTHRESH
                                          or (self.sack_ok and self.sacked_bytes > DUPTHRESH * self.mss)):
                self._enter_fast_recovery(now)
        elif self.recovery is None and self.sack_ok and self.sacked_bytes > DUPTHRESH * self.mss:
            self._enter_fast_recovery(now)
        # our FIN acknowledged?
        if self.fin_seq is not None and self.snd_una > self.fin_seq:
            if st == FIN_WAIT_1:
                self.state = FIN_WAIT_2
            elif st == CLOSING:
                self._enter_time_wait(now)
            elif st == LAST_ACK:
                self._to_closed(None)
                return
        if self.state in CAN_SEND or self.state == FIN_WAIT_1 or self.state == CLOSING or self.state == LAST_ACK:
            self._output(now)

    def _on_new_ack(self, ack: int, acked: int, now: float) -> None:
        self.dupacks = 0
        # drop acknowledged bytes (the FIN takes one sequence number but no buffer byte)
        data_acked = min(ack, self.buf_seq + len(self.sndbuf)) - self.buf_seq
        if data_acked > 0:
            del self.sndbuf[:data_acked]
            self.buf_seq += data_acked
        self.snd_una = ack
        if self.snd_nxt < ack:
            self.snd_nxt = ack
        # scoreboard below snd_una is history
        if self.sacked:
            while self.sacked and self.sacked[0][1] <= ack:
                s, e = self.sacked.pop(0)
                self.sacked_bytes -= e - s
            if self.sacked and self.sacked[0][0] < ack:
                self.sacked_bytes -= ack - self.sacked[0][0]
                self.sacked[0][0] = ack
        # RTT sample (Karn: only for segments never retransmitted)
        if self.rtt_seq is not None and ack >= self.rtt_seq:
            self._rtt_sample(now - self.rtt_time)
            self.rtt_seq = None
        self.retries = 0
        # congestion control
        if self.recovery is not None:
            if ack >= self.recovery_point:
                if self.recovery == "fast":
                    self.cc.on_recovery_exit(self, now)
                self.recovery = None
                self.counters["tcp_recovery_exit"] = self.counters.get("tcp_recovery_exit", 0) + 1
            else:
                if self.rtx_high < ack:
                    self.rtx_high = ack
                if not self.sack_ok:
                    self.high_sack = min(ack + self.mss, self.snd_max)   # NewReno: next hole
                if self.recovery == "rto":
                    self._grow_cwnd(acked, now)
        else:
            self._grow_cwnd(acked, now)
        # retransmission timer (RFC 6298 5.2/5.3)
        if self.snd_una >= self.snd_max:
            self.rto_at = None
        else:
            self.rto_at = now + self.rto
        # space was freed: a writer waiting for it must hear so even when the buffer is now
        # empty (an ACK that drains everything is exactly when a parked writer can resume)
        if data_acked > 0 or self.fin_queued:
            self._event(EV_WRITABLE, None)

    def _grow_cwnd(self, acked: int, now: float) -> None:
        self.cc.on_ack(self, acked, now)
        mss = self.mss
        cap = 2 * self.snd_cap + 4 * mss
        if self.cwnd > cap:
            self.cwnd = cap

    def _rtt_sample(self, r: float) -> None:
        if r < 0:
            return
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.rto = min(max(self.srtt + max(0.001, 4 * self.rttvar), RTO_MIN), RTO_MAX)

    def _update_sack(self, blocks) -> None:
        una, top = self.snd_una, self.snd_max
        changed = False
        for left, right in blocks:
            l, r = unwrap(una, left), unwrap(una, right)
            if not (una < r <= top and una <= l < r):
                continue                                      # D-SACK or bogus: ignore
            self._add_sacked(l, r)
            changed = True
        if changed:
            self.high_sack = max(self.high_sack, self.sacked[-1][1]) if self.sacked else self.high_sack

    def _add_sacked(self, l: int, r: int) -> None:
        sk = self.sacked
        i = bisect.bisect_left(sk, [l])
        if i > 0 and sk[i - 1][1] >= l:
            i -= 1
        if len(sk) >= MAX_SACKED_RANGES and not (i < len(sk) and sk[i][0] <= r):
            self.counters["tcp_sack_scoreboard_full"] = self.counters.get("tcp_sack_scoreboard_full", 0) + 1
            return
        j = i
        nl, nr = l, r
        while j < len(sk) and sk[j][0] <= nr:
            nl = min(nl, sk[j][0])
            nr = max(nr, sk[j][1])
            self.sacked_bytes -= sk[j][1] - sk[j][0]
            j += 1
        sk[i:j] = [[nl, nr]]
        self.sacked_bytes += nr - nl

    def _enter_fast_recovery(self, now: float) -> None:
        self.counters["tcp_fast_recovery"] = self.counters.get("tcp_fast_recovery", 0) + 1
        self.cc.on_congestion(self, now)
        self.recovery = "fast"
        self.recovery_point = self.snd_max
        self.rtx_high = self.snd_una
        if not self.sack_ok or not self.sacked:
            self.high_sack = min(self.snd_una + self.mss, self.snd_max)
        self.rtt_seq = None
        self._output(now, force_first_hole=True)

    # ---------------------------------------------------------------- receiving data
    def _free(self) -> int:
        free = self.rcv_cap - len(self.rcv_buf) - self.ooo_bytes
        return free if free > 0 else 0

    def _rx_data(self, seq: int, payload, now: float) -> None:
        rn = self.rcv_nxt
        end = seq + len(payload)
        if seq < rn:
            payload = payload[rn - seq:]
            seq = rn
        limit = self.rcv_adv if self.rcv_adv > rn else rn
        if end > limit:
            payload = payload[:max(0, limit - seq)]
            end = seq + len(payload)
            self.counters["tcp_rx_beyond_window"] = self.counters.get("tcp_rx_beyond_window", 0) + 1
        if not payload:
            self.ack_now = True
            return
        if seq == rn:
            self.rcv_buf += payload
            self.rcv_nxt = end
            if self.ooo:
                self._drain_ooo()
                self.ack_now = True                           # filled a hole: ack at once
            else:
                self.ack_pending += 1
                if self.ack_pending >= 2:
                    self.ack_now = True
                elif self.delack_at is None:
                    self.delack_at = now + DELACK
            self._event(EV_READABLE, None)
        else:
            self._store_ooo(seq, bytes(payload))
            self.ack_now = True                               # out of order: ack (with SACK) now

    def _store_ooo(self, seq: int, data: bytes) -> None:
        starts = self.ooo_starts
        i = bisect.bisect_left(starts, seq)
        if i < len(starts) and starts[i] == seq and len(self.ooo[i][1]) >= len(data):
            return                                            # duplicate
        # trim against neighbours so stored bytes never overlap
        if i > 0:
            ps, pd = self.ooo[i - 1]
            pe = ps + len(pd)
            if pe >= seq + len(data):
                return
            if pe > seq:
                data = data[pe - seq:]
                seq = pe
        end = seq + len(data)
        j = i
        while j < len(starts) and starts[j] + len(self.ooo[j][1]) <= end:
            self.ooo_bytes -= len(self.ooo[j][1])
            j += 1
        if j < len(starts) and starts[j] < end:
            data = data[:starts[j] - seq]
            end = seq + len(data)
        self.ooo_bytes += len(data)
        self.last_ooo = seq
        if i > 0 and i == j and self.ooo[i - 1][0] + len(self.ooo[i - 1][1]) == seq:
            self.ooo[i - 1][1] += data                        # the common case: extend a run
            return
        if i == j and len(starts) >= self.ooo_max:
            self.ooo_bytes -= len(data)
            self.counters["tcp_ooo_queue_full"] = self.counters.get("tcp_ooo_queue_full", 0) + 1
            return
        self.ooo[i:j] = [[seq, bytearray(data)]]
        starts[i:j] = [seq]

    def _drain_ooo(self) -> None:
        while self.ooo and self.ooo[0][0] <= self.rcv_nxt:
            s, d = self.ooo.pop(0)
            self.ooo_starts.pop(0)
            self.ooo_bytes -= len(d)
            e = s + len(d)
            if e > self.rcv_nxt:
                self.rcv_buf += d[self.rcv_nxt - s:]
                self.rcv_nxt = e

    def _sack_blocks(self) -> list:
        if not self.ooo:
            return []
        blocks = []
        for s, d in self.ooo:
            e = s + len(d)
            if blocks and blocks[-1][1] == s:
                blocks[-1][1] = e
            else:
                blocks.append([s, e])
        last = getattr(self, "last_ooo", None)
        first = [b for b in blocks if last is not None and b[0] <= last < b[1]]
        rest = [b for b in reversed(blocks) if b not in first]
        return (first + rest)[:4]

    def _rx_fin(self, now: float) -> None:
        self.rcv_nxt += 1
        self.remote_fin = None
        self.eof = True
        self.ack_now = True
        st = self.state
        if st == ESTABLISHED:
            self.state = CLOSE_WAIT
        elif st == FIN_WAIT_1:
            if self.fin_seq is not None and self.snd_una > self.fin_seq:
                self._enter_time_wait(now)
            else:
                self.state = CLOSING
        elif st == FIN_WAIT_2:
            self._enter_time_wait(now)
        self._event(EV_EOF, None)

    def _enter_time_wait(self, now: float) -> None:
        self.state = TIME_WAIT
        self.rto_at = self.persist_at = self.keepalive_at = None
        self.time_wait_at = now + 2 * self.msl
        self._event(EV_CLOSED, None)             # finished for the application

    # ================================================================ output
    def _window_field(self) -> int:
        free = self._free()
        edge = self.rcv_nxt + free
        if edge < self.rcv_adv:
            edge = self.rcv_adv                               # never shrink the window
        win = (edge - self.rcv_nxt) >> self.rcv_wscale
        if win > 65535:
            win = 65535
        self.rcv_adv = self.rcv_nxt + (win << self.rcv_wscale)
        return win

    def _emit(self, seq: int, flags: int, payload=b"", options: bytes = b"") -> None:
        if self.sack_ok and self.ooo and not options:
            options = W.sack_option(self._sack_blocks())
        self.out.append(self.pk.build(seq, self.rcv_nxt, flags | ACK, self._window_field(), options, payload))
        self.ack_pending = 0
        self.ack_now = False
        self.delack_at = None

    def _holes(self):
        """Lost ranges not yet retransmitted in this recovery: [max(start, rtx_high), end)."""
        lo = max(self.snd_una, self.rtx_high)
        hi = self.high_sack
        for s, e in self.sacked:
            if e <= lo:
                continue
            if s > lo:
                yield lo, min(s, hi)
            lo = max(lo, e)
            if lo >= hi:
                return
        if lo < hi:
            yield lo, hi

    def _pipe(self) -> int:
        inflight = self.snd_max - self.snd_una - self.sacked_bytes
        if self.recovery is not None:
            lost = 0
            for s, e in self._holes():
                lost += e - s
            inflight -= lost
        return inflight

    def _output(self, now: float, force_first_hole: bool = False) -> None:
        st = self.state
        if st not in SYNCHRONIZED:
            if st == SYN_RECEIVED and self.ack_now:
                self._emit(self.snd_max, 0)            # unacceptable segment / challenge ACK
            return
        sending = st in CAN_SEND or st in (FIN_WAIT_1, CLOSING, LAST_ACK)
        mss = self.mss
        sent_any = False
        if sending:
            # 1. retransmit holes while in recovery
            if self.recovery is not None:
                budget = self.cwnd - self._pipe()
                if force_first_hole and budget < mss:
                    budget = mss                               # fast retransmit goes out now
                for s, e in list(self._holes()):
                    while s < e and budget > 0:
                        n = min(mss, e - s)
                        self._send_range(s, n, now, retransmit=True)
                        self.rtx_high = s + n
                        budget -= n
                        s += n
                        sent_any = True
                    if budget <= 0:
                        break
            # 2. new data within cwnd and the peer's window
            buf_end = self.buf_seq + len(self.sndbuf)
            wnd_end = self.snd_una + self.snd_wnd
            pipe = self._pipe() if self.recovery is not None else self.snd_max - self.snd_una - self.sacked_bytes
            while self.snd_max < buf_end:
                room = min(self.cwnd - pipe, wnd_end - self.snd_max)
                if room <= 0:
                    break
                n = min(mss, buf_end - self.snd_max, room)
                if n < mss and n < buf_end - self.snd_max and pipe > 0:
                    break                                       # wait for a full segment
                self._send_range(self.snd_max, n, now, retransmit=False)
                pipe += n
                sent_any = True
            # 3. FIN once everything is sent
            if self.fin_queued and self.fin_seq is None and self.snd_max >= buf_end:
                if st in CAN_SEND:
                    self.fin_seq = buf_end
                    self._emit(buf_end, FIN | PSH)
                    self.snd_max = self.snd_nxt = buf_end + 1
                    self.state = FIN_WAIT_1 if st == ESTABLISHED else LAST_ACK
                    if self.rto_at is None:
                        self.rto_at = now + self.rto
                    sent_any = True
            # 4. zero window with data waiting: persist timer
            if self.snd_wnd == 0 and self.snd_max < buf_end and self.snd_max == self.snd_una:
                if self.persist_at is None:
                    self.persist_at = now + min(self.rto * (1 << self.persist_backoff), PERSIST_MAX)
        if self.ack_now and not sent_any:
            self._emit(self.snd_max, 0)

    def _send_range(self, seq: int, n: int, now: float, retransmit: bool) -> None:
        off = seq - self.buf_seq
        payload = self.sndbuf[off:off + n]
        flags = PSH if seq + n == self.buf_seq + len(self.sndbuf) else 0
        if self.fin_seq is not None and seq + n > self.fin_seq:
            flags |= FIN                                        # a hole that covers our FIN
        self._emit(seq, flags, payload)
        end = seq + n
        if retransmit:
            if end > self.snd_max:                              # defensive: keep SND.MAX honest
                self.snd_max = self.snd_nxt = end
            self.counters["tcp_retransmit"] = self.counters.get("tcp_retransmit", 0) + 1
            if self.rtt_seq is not None and seq < self.rtt_seq:
                self.rtt_seq = None                             # Karn: this round is ambiguous
        else:
            if self.rtt_seq is None:
                self.rtt_seq, self.rtt_time = end, now
            self.snd_max = end
            self.snd_nxt = end
        if self.rto_at is None:
            self.rto_at = now + self.rto

    # ================================================================ timers
    def next_deadline(self) -> float | None:
        best = None
        for d in (self.rto_at, self.delack_at, self.persist_at, self.time_wait_at, self.keepalive_at):
            if d is not None and (best is None or d < best):
                best = d
        return best

    def handle_timer(self, now: float) -> None:
        if self.time_wait_at is not None and now >= self.time_wait_at:
            self.time_wait_at = None
            self._to_closed(None)
            return
        if self.rto_at is not None and now >= self.rto_at:
            self.rto_at = None
            self._on_rto(now)
            if self.state == CLOSED:
                return
        if self.delack_at is not None and now >= self.delack_at:
            self.delack_at = None
            if self.ack_pending:
                self.ack_now = True
                self._output(now)
        if self.persist_at is not None and now >= self.persist_at:
            self.persist_at = None
            if self.snd_wnd == 0 and self.state in SYNCHRONIZED:
                # probe with an already-acknowledged sequence number: elicits an ACK with the window
                self.out.append(self.pk.build(self.snd_una - 1, self.rcv_nxt, ACK, self._window_field()))
                self.counters["tcp_zero_window_probe"] = self.counters.get("tcp_zero_window_probe", 0) + 1
                self.persist_backoff = min(self.persist_backoff + 1, 10)
                self.persist_at = now + min(self.rto * (1 << self.persist_backoff), PERSIST_MAX)
        if self.keepalive_at is not None and now >= self.keepalive_at:
            if self.keepalive_probes >= 9:
                self._to_closed("timeout")
                return
            self.keepalive_probes += 1
            self.out.append(self.pk.build(self.snd_una - 1, self.rcv_nxt, ACK, self._window_field()))
            self.keepalive_at = now + max(self.keepalive / 4, 1.0)

    def _on_rto(self, now: float) -> None:
        st = self.state
        self.retries += 1
        self.counters["tcp_rto"] = self.counters.get("tcp_rto", 0) + 1
        if st in (SYN_SENT, SYN_RECEIVED):
            if self.retries > SYN_RETRIES:
                self._to_closed("timeout")
                return
            self.rto = min(self.rto * 2, RTO_MAX)
            self._send_syn(now)
            self.rto_at = now + self.rto
            return
        if self.snd_max <= self.snd_una:
            return
        if self.retries > DATA_RETRIES:
            self._to_closed("timeout")
            return
        self.cc.on_rto(self, now)
        self.recovery = "rto"
        self.recovery_point = self.snd_max
        self.rtx_high = self.snd_una
        self.sacked.clear()                                    # the receiver may renege
        self.sacked_bytes = 0
        self.high_sack = self.snd_max
        self.rtt_seq = None
        self.rto = min(self.rto * 2, RTO_MAX)
        # retransmit the first segment (or the FIN)
        buf_end = self.buf_seq + len(self.sndbuf)
        if self.snd_una < buf_end:
            # never past SND.MAX: a short segment (small window) is resent short, else the
            # peer would ack bytes we think we never sent and we would ignore its ACKs
            n = min(self.mss, buf_end - self.snd_una, self.snd_max - self.snd_una)
            self._send_range(self.snd_una, n, now, retransmit=True)
            self.rtx_high = self.snd_una + n
        elif self.fin_seq is not None:
            self._emit(self.fin_seq, FIN)
            self.rtx_high = self.snd_max
        self.rto_at = now + self.rto
