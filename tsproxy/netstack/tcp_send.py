"""The send half of a TCP connection (a mixin of TcpConnection in tcp.py): the send buffer,
ACK processing, the SACK scoreboard, loss recovery and retransmission, segment output.

Loss recovery: SACK (RFC 2018) scoreboard with FACK-style loss marking, conservative pipe
accounting after RFC 6675, NewReno (RFC 6582) partial-ACK handling when the peer has no SACK,
RTO per RFC 6298 (200 ms floor, Karn's rule, exponential backoff) falling back to slow start.
"""

from __future__ import annotations

import bisect

from tsproxy.netstack.tcp_seq import (ACK, CAN_SEND, CLOSING, DUPTHRESH, EV_WRITABLE, FIN,
                                      FIN_WAIT_1, FIN_WAIT_2, LAST_ACK, MAX_SACKED_RANGES,
                                      PERSIST_MAX, PSH, RTO_MAX, RTO_MIN, SYN_RECEIVED, SYN_RETRIES,
                                      DATA_RETRIES, ESTABLISHED, SYN_SENT, SYNCHRONIZED, unwrap)
from tsproxy.netstack.wire import tcp as W


class SendSide:
    tx_gate = None                    # the stack's SendQuota (tcp_budget.py), if any

    def send(self, data, now: float) -> int:
        if self.state not in CAN_SEND and self.state not in (SYN_SENT, SYN_RECEIVED):
            return 0
        if self.fin_queued:
            return 0
        room = self.snd_cap - len(self.sndbuf)
        if room <= 0:
            return 0
        n = min(room, len(data))
        self.sndbuf += memoryview(data)[:n] if n < len(data) else data   # one copy, not two
        if self.state in CAN_SEND:
            self._output(now)
        return n

    def send_space(self) -> int:
        return self.snd_cap - len(self.sndbuf)

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
        # what the ACK lets us send goes out from receive_segment's one _output at its end,
        # after any data in this segment was taken: those segments then carry its ACK

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
        if self.retries and self.srtt is not None:
            # new data acknowledged: the path works again, so drop the exponential backoff
            # (as Linux does) instead of keeping it until a clean RTT sample; a burst of
            # losses then costs one long timeout, not a string of them
            self.rto = self._rto_from_srtt()
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
        self.rto = self._rto_from_srtt()

    def _rto_from_srtt(self) -> float:
        return min(max(self.srtt + max(0.001, 4 * self.rttvar), RTO_MIN), RTO_MAX)

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
            cwnd = self.cwnd
            if self.recovery is None and 0 < self.dupacks < DUPTHRESH:
                cwnd += self.dupacks * mss      # limited transmit (RFC 3042): earn a 3rd dupack
            if self.snd_max < buf_end:
                pipe, sent = self._send_new(now, buf_end, wnd_end, pipe, cwnd)
                sent_any = sent_any or sent
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

    def _send_new(self, now: float, buf_end: int, wnd_end: int, pipe: int, cwnd: int):
        """New data within cwnd and the peer's window -> (pipe, sent any).  What _send_range
        does for each segment, with the per-flight constants (ACK number, window field, SACK
        option) computed once and the payload taken from one view of the send buffer."""
        mss = self.mss
        gate = self.tx_gate
        seq = self.snd_max
        build = self.pk.build
        append = self.out.append
        buf_seq = self.buf_seq
        rcv_nxt = self.rcv_nxt
        win = None
        opts = b""
        first = seq
        with memoryview(self.sndbuf) as view:     # released before anything resizes the buffer
            while seq < buf_end:
                room = min(cwnd - pipe, wnd_end - seq)
                if room <= 0:
                    break
                left = buf_end - seq
                n = min(mss, left, room)
                if n < mss and n < left and pipe > 0:
                    break                                       # wait for a full segment
                if gate is not None:
                    if gate.left <= 0:
                        gate.park(self, now)                    # the stack resumes us after a flush
                        break
                    gate.left -= 1
                if win is None:
                    win = self._window_field()
                    if self.sack_ok and self.ooo:
                        opts = W.sack_option(self._sack_blocks())
                off = seq - buf_seq
                end = seq + n
                append(build(seq, rcv_nxt, (PSH | ACK) if end == buf_end else ACK, win, opts,
                             view[off:off + n]))
                seq = end
                pipe += n
        if seq == first:
            return pipe, False
        if self.rtt_seq is None:
            self.rtt_seq, self.rtt_time = first + min(mss, seq - first), now   # its first segment
        self.snd_max = self.snd_nxt = seq
        self.ack_pending = 0                           # what _emit does once per segment
        self.ack_now = False
        self.delack_at = None
        if self.rto_at is None:
            self.rto_at = now + self.rto
        return pipe, True

    def _send_range(self, seq: int, n: int, now: float, retransmit: bool) -> None:
        off = seq - self.buf_seq
        # a view, not a copy: the builder copies the bytes once into the packet (the view is
        # gone when this returns, before anything can resize the buffer)
        payload = memoryview(self.sndbuf)[off:off + n]
        flags = PSH if seq + n == self.buf_seq + len(self.sndbuf) else 0
        if self.fin_seq is not None and seq + n >= self.fin_seq:
            flags |= FIN                                        # the FIN rides along (or sits inside)
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

    def _on_rto(self, now: float) -> None:
        st = self.state
        self.retries += 1
        self.counters["tcp_rto"] = self.counters.get("tcp_rto", 0) + 1
        if st in (SYN_SENT, SYN_RECEIVED):
            self.counters["tcp_rto_syn"] = self.counters.get("tcp_rto_syn", 0) + 1
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
