"""Pluggable congestion control for TcpConnection.

A controller owns only its private state; it reads and sets `conn.cwnd` / `conn.ssthresh`
(bytes) and reads `conn.mss`, `conn.snd_max`, `conn.snd_una`.  The connection calls:

    on_ack(conn, acked, now)     new data cumulatively acknowledged outside fast recovery
                                 (and during RTO recovery, which is slow start again)
    on_congestion(conn, now)     entering fast recovery (3 dupacks / SACK loss)
    on_recovery_exit(conn, now)  the ACK covering the recovery point arrived (fast recovery)
    on_rto(conn, now)            retransmission timeout

NewReno (RFC 5681 / 6582, byte counting RFC 3465 with L = 2) is the default; CUBIC (RFC 9438)
is selectable per connection with `cc=Cubic()`.
"""

from __future__ import annotations


class NewReno:
    name = "newreno"

    def __init__(self) -> None:
        self.acked_ca = 0                   # bytes acked since the last +1 MSS in avoidance

    def on_ack(self, conn, acked: int, now: float) -> None:
        mss = conn.mss
        if conn.cwnd < conn.ssthresh:
            conn.cwnd += acked if acked < 2 * mss else 2 * mss
        else:
            self.acked_ca += acked
            if self.acked_ca >= conn.cwnd:
                self.acked_ca -= conn.cwnd
                conn.cwnd += mss

    def on_congestion(self, conn, now: float) -> None:
        conn.ssthresh = max((conn.snd_max - conn.snd_una) // 2, 2 * conn.mss)
        conn.cwnd = conn.ssthresh
        self.acked_ca = 0

    def on_recovery_exit(self, conn, now: float) -> None:
        conn.cwnd = max(conn.ssthresh, 2 * conn.mss)

    def on_rto(self, conn, now: float) -> None:
        conn.ssthresh = max((conn.snd_max - conn.snd_una) // 2, 2 * conn.mss)
        conn.cwnd = conn.mss
        self.acked_ca = 0


class Cubic:
    """RFC 9438 in bytes: W_cubic(t) = C*(t-K)^3 + W_max (in segments), beta 0.7, with the
    Reno-friendly estimate W_est as a floor.  Time comes from the `now` the connection passes."""

    name = "cubic"
    C = 0.4
    BETA = 0.7

    def __init__(self) -> None:
        self.w_max = 0.0                    # segments, cwnd before the last reduction
        self.k = 0.0
        self.epoch: float | None = None     # start of the current avoidance epoch
        self.w_est = 0.0                    # segments
        self.acked_ca = 0

    def on_ack(self, conn, acked: int, now: float) -> None:
        mss = conn.mss
        if conn.cwnd < conn.ssthresh:       # slow start exactly as NewReno
            conn.cwnd += acked if acked < 2 * mss else 2 * mss
            return
        seg = conn.cwnd / mss
        if self.epoch is None:
            self.epoch = now
            if self.w_max < seg:            # no loss seen yet above this point
                self.w_max, self.k = seg, 0.0
            else:
                self.k = ((self.w_max - seg) / self.C) ** (1 / 3)
            self.w_est = seg
        t = now - self.epoch
        target = self.C * (t - self.k) ** 3 + self.w_max
        if target > 1.5 * seg:
            target = 1.5 * seg              # RFC 9438 4.2: at most +50% per RTT worth of ACKs
        # Reno-friendly region (4.3): alpha = 3*(1-beta)/(1+beta) segments per cwnd acked
        self.w_est += 3 * (1 - self.BETA) / (1 + self.BETA) * acked / conn.cwnd
        if self.w_est > target:
            target = self.w_est
        if target > seg:
            # grow by (target - cwnd)/cwnd segments per acked segment
            conn.cwnd += max(1, int((target - seg) / seg * acked))
        else:
            self.acked_ca += acked          # plateau: very slow growth (1 MSS per 100 RTTs)
            if self.acked_ca >= 100 * conn.cwnd:
                self.acked_ca = 0
                conn.cwnd += mss

    def _reduce(self, conn) -> None:
        seg = conn.cwnd / conn.mss
        # fast convergence (4.7): release bandwidth when the plateau keeps falling
        self.w_max = seg * (1 + self.BETA) / 2 if seg < self.w_max else seg
        conn.ssthresh = max(int((conn.snd_max - conn.snd_una) * self.BETA), 2 * conn.mss)
        self.epoch = None
        self.acked_ca = 0

    def on_congestion(self, conn, now: float) -> None:
        self._reduce(conn)
        conn.cwnd = conn.ssthresh

    def on_recovery_exit(self, conn, now: float) -> None:
        conn.cwnd = max(conn.ssthresh, 2 * conn.mss)

    def on_rto(self, conn, now: float) -> None:
        self._reduce(conn)
        conn.cwnd = conn.mss


CONTROLLERS = {"newreno": NewReno, "cubic": Cubic}
