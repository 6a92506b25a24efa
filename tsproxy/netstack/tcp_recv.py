"""The receive half of a TCP connection (a mixin of TcpConnection in tcp.py): the in-order
receive buffer the application reads, the out-of-order queue (reassembly, SACK blocks we
advertise), and the advertised window.

The advertised window is what is free in the receive buffer (`rcv_cap` less what is queued),
within what the stack's shared receive budget grants (tcp_budget.py), never shrunk once
advertised (RFC 9293 3.8.6).  ACKs are decimated: one per two segments, or one per input
batch when the stack batches (`ack_defer`), immediately for out-of-order data.

A window update that reopens a window the sender could not send a full segment into is made
reliable: if no in-order data arrives within a short interval, the ACK is sent again (a few
times, backing off).  Without that, one lost update leaves the sender on its persist or
retransmission timer, whose exponential backoff (up to 120 s on Linux) turns a single drop
in a congested peer's socket into a stall of tens of seconds.
"""

from __future__ import annotations

import bisect

from tsproxy.netstack.tcp_seq import CAN_RECEIVE_DATA, DELACK, EV_READABLE, SYNCHRONIZED

# re-sending a reopening window update: first after 2 x SRTT within these bounds, then doubling
WND_NUDGE_MIN = 0.2
WND_NUDGE_MAX = 0.4
WND_NUDGE_TRIES = 5               # 0.2-0.4 s .. 3.2-6.4 s after the update: then the peer's timers


class ReceiveSide:
    budget = None                     # the stack's ReceiveBudget (tcp_budget.py), if any
    ack_defer = None                  # the stack's set of connections to ack at batch end
    wnd_reopened = False              # an ACK just reopened a window below one segment
    wnd_nudge_at = None               # when to send that update again if no data came
    wnd_nudges = 0                    # re-sends of the current update so far

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
        b = self.budget
        if b is not None:
            b.set_held(self, self._held())               # read bytes go back to the budget
        if self.state in CAN_RECEIVE_DATA and self._window_update_due():
            self.ack_now = True
            self._output(now)
        if self.wnd_reopened:
            self._arm_nudge(now)
        return data

    def _held(self) -> int:
        """What this connection holds of the receive budget: bytes buffered for the
        application plus window advertised and not yet received (none after their FIN)."""
        if self.eof:
            return len(self.rcv_buf)
        ahead = self.rcv_adv - self.rcv_nxt
        return len(self.rcv_buf) + (ahead if ahead > 0 else 0)

    def _window_update_due(self) -> bool:
        """Send a window update only when it matters (RFC 9293 3.8.6.2.2 receiver SWS
        avoidance, and Linux's rule): the window opens by at least a segment and at least
        doubles.  A reader draining a large buffer promptly costs no packets: the ACKs for
        its data carry the window anyway."""
        rn = self.rcv_nxt
        base = self.rcv_adv if self.rcv_adv > rn else rn
        cur = base - rn
        opened = rn + self._free() - base
        need = self.mss if self.mss < self.rcv_cap // 2 else self.rcv_cap // 2
        if opened < need or opened < cur:
            return False
        b = self.budget
        if b is not None:
            opened = b.grant(self, self._held(), opened)   # queued as a waiter if spent
            return opened >= need and opened >= cur
        return True

    def budget_wakeup(self, now: float) -> None:
        """The budget has room again for this waiter: advertise it if that matters."""
        if self.state in CAN_RECEIVE_DATA and self._window_update_due():
            self.ack_now = True
            self._output(now)
        if self.wnd_reopened:
            self._arm_nudge(now)

    def flush_ack(self, now: float) -> None:
        """End of an input batch: one ACK for the in-order data it brought (decimation)."""
        if self.ack_pending and self.state in SYNCHRONIZED:
            self.ack_now = True
            self._output(now)
        if self.wnd_reopened:
            self._arm_nudge(now)

    # -- reliable window updates ---------------------------------------------------------------
    def _arm_nudge(self, now: float) -> None:
        """An ACK reopened the window (see _window_field): expect data within the interval."""
        self.wnd_reopened = False
        if self.state not in CAN_RECEIVE_DATA or self.remote_fin is not None:
            return
        self.wnd_nudges = 0
        self.wnd_nudge_at = now + self._nudge_interval()

    def _nudge_interval(self) -> float:
        srtt = self.srtt
        if srtt is None:
            return WND_NUDGE_MAX
        t = 2 * srtt
        return WND_NUDGE_MIN if t < WND_NUDGE_MIN else WND_NUDGE_MAX if t > WND_NUDGE_MAX else t

    def on_wnd_nudge(self, now: float) -> None:
        """The reopening update brought no data in time: it (or the data) may have been lost
        in a peer's full socket.  Send the ACK again while the window is still open."""
        self.wnd_nudge_at = None
        if self.state not in CAN_RECEIVE_DATA or self.remote_fin is not None \
                or self.rcv_adv - self.rcv_nxt < self.mss:
            return                    # finished, or the window is small again: a read reopens it
        self.counters["tcp_window_update_resent"] = self.counters.get("tcp_window_update_resent", 0) + 1
        self.ack_now = True
        self._output(now)
        self.wnd_reopened = False
        self.wnd_nudges += 1
        if self.wnd_nudges < WND_NUDGE_TRIES:
            self.wnd_nudge_at = now + self._nudge_interval() * (1 << self.wnd_nudges)

    def readable_bytes(self) -> int:
        return len(self.rcv_buf)

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
                self._ack_at_once()                           # filled a hole
            else:
                self._count_for_ack(now)
            ev = self.events
            if not ev or ev[-1][0] != EV_READABLE:          # one pending "readable" is enough
                self._event(EV_READABLE, None)
        else:
            self._store_ooo(seq, bytes(payload))
            self._ack_at_once()                               # out of order: ack (with SACK)

    def _count_for_ack(self, now: float) -> None:
        """One more in-order segment to acknowledge: ack every 2nd (RFC 9293 3.8.6.3), else arm
        the delayed ACK; inside an input batch the stack sends one ACK for all of them at its
        end (they would leave together)."""
        self.wnd_nudge_at = None                        # the sender is sending: no nudge due
        self.ack_pending += 1
        if self.ack_pending >= 2:
            if self.ack_defer is None:
                self.ack_now = True
            else:
                self.ack_defer.add(self)
        elif self.delack_at is None:
            self.delack_at = now + DELACK

    def _ack_at_once(self) -> None:
        """Out-of-order data or a filled hole is acked immediately (RFC 9293 3.8.6.3).  With
        SACK, inside an input batch, the one ACK at the batch's end (leaving at the same
        moment) carries every block the sender would learn from one per segment; without
        SACK the sender counts duplicate ACKs, so each goes out."""
        if self.sack_ok and self.ack_defer is not None:
            self.ack_pending += 1
            self.ack_defer.add(self)
        else:
            self.ack_now = True

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

    def _window_field(self) -> int:
        rn = self.rcv_nxt
        base = self.rcv_adv if self.rcv_adv > rn else rn
        # the sender could not send a full segment into what we advertised (data has come:
        # the handshake's first window is not a reopening)
        was_blocked = base - rn < self.mss and rn > self.irs + 1
        edge = rn + self._free()
        b = self.budget
        if edge > base:
            if b is not None:
                edge = base + b.grant(self, self._held(), edge - base)
        else:
            edge = base                                       # never shrink the window
        win = (edge - rn) >> self.rcv_wscale
        if win > 65535:
            win = 65535
        # rcv_adv is the furthest edge ever advertised: the scaled field may round a closing
        # window below it (by < 2**wscale bytes), and the peer may still send up to it
        adv = rn + (win << self.rcv_wscale)
        if adv > self.rcv_adv:
            self.rcv_adv = adv
            if was_blocked and adv - rn >= self.mss:
                self.wnd_reopened = True                  # armed by the caller (_arm_nudge)
        if b is not None:
            b.set_held(self, self._held())
        return win
