"""One TCP connection (RFC 9293), sans-IO.

The stack feeds parsed segments (`receive_segment`) and timer ticks (`handle_timer`); the
connection appends whole IP packets to the stack's outbox through its Packetizer, and queues
events (`take_events`) for the stream layer: connected, readable, writable, eof, closed,
error(kind).

Sequence numbers are unwrapped 64-bit-ish Python ints inside (wire values are `& 0xFFFFFFFF`),
so comparisons are plain `<`.  Buffers are bounded: the send buffer by `snd_cap` (send()
accepts what fits: that is the writer's backpressure), the receive buffer by `rcv_cap` (the
advertised window is what is free in it: a slow reader closes the window).

The connection is split by concern: this module holds the state machine (opening, segment
acceptance, RST/SYN/FIN handling, closing, timers); tcp_send.py the send buffer, ACK
processing, SACK scoreboard, loss recovery and segment output; tcp_recv.py the receive
buffer, reassembly and the advertised window; tcp_seq.py the constants and sequence helpers
(re-exported here).  Loss recovery is described in tcp_send.py.
Congestion control is pluggable (tcp_cc.py): NewReno with RFC 3465 byte counting by default,
CUBIC (RFC 9438) with `cc=Cubic()`.

Seam with stack.py (the stack owns demux, ports, listeners and ISNs; see
`initial_sequence_number`):
    TcpConnection(out, packetizer, *, now, iss, mss, notify=None, counters=None,
                  rcv_cap=4 MiB, snd_cap=4 MiB, sack=True, wscale=7 | None, msl=30.0,
                  keepalive=None | idle seconds, cc=None)
    connect(now)                                active open (sends SYN)
    connect_by = deadline                       optional: not established by then -> error
                                                "dial_timeout" (an abort, RST if synchronizing)
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

from tsproxy.netstack.tcp_cc import NewReno
from tsproxy.netstack.tcp_recv import ReceiveSide
from tsproxy.netstack.tcp_send import SendSide
from tsproxy.netstack.tcp_seq import (  # noqa: F401 - re-exported: the stack and tests use T.<name>
    CLOSED, SYN_SENT, SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT, CLOSING,
    LAST_ACK, TIME_WAIT, SYNCHRONIZED, CAN_SEND, CAN_RECEIVE_DATA, M32, RTO_MIN, RTO_MAX,
    RTO_INITIAL, SYN_RETRIES, DATA_RETRIES, DELACK, DUPTHRESH, DEFAULT_BUF, DEFAULT_WSCALE,
    DEFAULT_MSL, PERSIST_MAX, MAX_SACKED_RANGES, ACK, FIN, SYN, RST, PSH, EV_CONNECTED,
    EV_READABLE, EV_WRITABLE, EV_EOF, EV_CLOSED, EV_ERROR, unwrap, initial_sequence_number)
from tsproxy.netstack.wire import tcp as W

_NOT_PREDICTED = SYN | FIN | RST | ACK | W.URG      # of these, a predicted segment has only ACK


class TcpConnection(SendSide, ReceiveSide):
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
        self.connect_by: float | None = None   # an active open's deadline (stack.tcp_connect)
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
        b = self.budget
        if b is not None:
            win = b.grant(self, 0, win)              # at least the budget's floor
        self.rcv_adv = self.rcv_nxt + win
        if b is not None:
            b.set_held(self, win)
        self.out.append(self.pk.build(self.iss, self.rcv_nxt, flags, win, opts))
        self.snd_nxt = max(self.snd_nxt, self.iss + 1)
        self.snd_max = max(self.snd_max, self.snd_nxt)
        if self.rto_at is None:
            self.rto_at = now + self.rto

    # ================================================================ app side
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
        if ev[0] == EV_CONNECTED:
            self.connect_by = None
            if self.keepalive is not None:
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
        self.connect_by = self.wnd_nudge_at = None
        if self.budget is not None:
            self.budget.detach(self)
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
        plen = len(payload)
        if (st == ESTABLISHED and flags & _NOT_PREDICTED == ACK and not options and not self.ooo
                and seq == self.rcv_nxt & M32 and ack == self.snd_una & M32
                and 0 < plen <= self.rcv_adv - self.rcv_nxt
                and (window << self.snd_wscale) == self.snd_wnd):
            self._rx_predicted(payload, plen, now)
            return
        self.last_rx = now
        if self.keepalive is not None:
            self.keepalive_at = now + self.keepalive
            self.keepalive_probes = 0
        seq = unwrap(self.rcv_nxt, seq)
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

    def _rx_predicted(self, payload, plen: int, now: float) -> None:
        """Header prediction (the common case of RFC 9293 3.10.7.4, after Van Jacobson): the
        next in-order data within the window, nothing newly acknowledged, the same window, no
        options, no reassembly going on.  Every check of the general path would pass and
        change nothing but what is done here."""
        self.last_rx = now
        if self.keepalive is not None:
            self.keepalive_at = now + self.keepalive
            self.keepalive_probes = 0
        rn = self.rcv_nxt
        self.snd_wl1, self.snd_wl2 = rn, self.snd_una
        self.rcv_buf += payload
        self.rcv_nxt = rn + plen
        self._count_for_ack(now)
        ev = self.events
        if not ev or ev[-1][0] != EV_READABLE:
            self._event(EV_READABLE, None)
        if self.ack_now:
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

    # ---------------------------------------------------------------- receiving data

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
        if self.budget is not None:
            self.budget.detach(self)             # no more data can arrive
        self._event(EV_CLOSED, None)             # finished for the application

    # ================================================================ timers
    def next_deadline(self) -> float | None:
        best = self.connect_by
        for d in (self.rto_at, self.delack_at, self.persist_at, self.time_wait_at, self.keepalive_at,
                  self.wnd_nudge_at):
            if d is not None and (best is None or d < best):
                best = d
        return best

    def handle_timer(self, now: float) -> None:
        if self.time_wait_at is not None and now >= self.time_wait_at:
            self.time_wait_at = None
            self._to_closed(None)
            return
        if self.connect_by is not None and now >= self.connect_by:
            if self.state == SYN_RECEIVED:     # simultaneous open half done: tell the peer
                self.out.append(self.pk.build(self.snd_nxt, self.rcv_nxt, RST | ACK, 0))
            self._to_closed("dial_timeout")
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
        if self.wnd_nudge_at is not None and now >= self.wnd_nudge_at:
            self.on_wnd_nudge(now)                 # tcp_recv.py: a reopening update again
        elif self.wnd_reopened:
            self._arm_nudge(now)                   # a delayed ACK above reopened the window
        if self.keepalive_at is not None and now >= self.keepalive_at:
            if self.keepalive_probes >= 9:
                self._to_closed("timeout")
                return
            self.keepalive_probes += 1
            self.out.append(self.pk.build(self.snd_una - 1, self.rcv_nxt, ACK, self._window_field()))
            self.keepalive_at = now + max(self.keepalive / 4, 1.0)

