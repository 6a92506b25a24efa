"""A receive budget shared by every TCP connection of one stack (sans-IO).

Each connection's receive window invites its peer to send that many bytes, and they all land
in the process's one UDP socket.  Left alone, a thousand 4 MiB windows invite gigabytes that
the socket cannot hold while the process drains it: the kernel drops datagrams
(RcvbufErrors), the senders time out and back off, and some connections stall for seconds.

The budget bounds the sum, over all connections, of what each *holds*: the bytes it has
buffered for its application plus the window it has advertised and not yet received

    held = rcv_adv - (rcv_nxt - len(rcv_buf))            (rcv_adv - the application's read point)

A connection grows `held` only through `grant()` when it advertises a further right edge, and
reports the new figure with `set_held()`; reading by the application lowers it again.  So the
bytes arriving at the socket at any moment never exceed `total` (plus the floors below), and
neither does the memory the receive buffers use.

Fair service:
  * `share()` = total / connections: no connection extends its window beyond its share, so one
    fast stream cannot take what the others need (a share that shrinks because connections
    joined is reached by reading, never by shrinking an advertised window: RFC 9293 3.8.6).
  * every connection may always hold `floor` bytes (a few segments) whatever the budget says:
    a window is never closed by the budget, so nobody waits on the peer's zero-window probes.
  * a connection held back because the budget as a whole was spent queues as a waiter; when
    bytes are returned, `take_ready()` hands the waiters back in FIFO order (round-robin: a
    waiter still short is queued again at the back) and the stack sends them window updates.
"""

from __future__ import annotations

import collections

# the UDP socket asks for 16 MiB of receive buffer (tsproxy/aio.py UDP_BUFFER; forced as
# root), which the kernel doubles and charges per datagram's truesize (~2.3 KB for a 1.4 KB
# datagram): about 19 MB of payload, so 16 MiB of windows fit.  Larger windows than the 4 MiB
# used before also mean more segments per connection in one input batch, hence fewer ACKs:
# 1,000 downloads of 1 MB sent about 110,000 datagrams to the peer instead of 414,000.
# (Without root the socket is capped by net.core.rmem_max: the budget does not follow it.)
DEFAULT_TOTAL = 16 * 1024 * 1024
DEFAULT_FLOOR = 4 * 1024


class ReceiveBudget:
    __slots__ = ("total", "floor", "used", "members", "_waiters", "_waiting", "wakeups")

    def __init__(self, total: int = DEFAULT_TOTAL, floor: int = DEFAULT_FLOOR):
        if total <= 0 or floor < 0:
            raise ValueError("budget total must be positive and floor not negative")
        self.total = total
        self.floor = floor
        self.used = 0                       # sum of what members hold
        self.members = 0                    # connections attached
        self._waiters: collections.deque = collections.deque()
        self._waiting: set = set()
        self.wakeups = 0                    # waiters handed back (a counter for status/tests)

    # -- membership -------------------------------------------------------------------------
    def attach(self, conn) -> None:
        if getattr(conn, "budget_held", None) is None:
            conn.budget_held = 0
            self.members += 1

    def detach(self, conn) -> None:
        """The connection is finished: return all it holds."""
        held = getattr(conn, "budget_held", None)
        if held is None:
            return
        self.used -= held
        conn.budget_held = None
        self.members -= 1
        if conn in self._waiting:
            self._waiting.discard(conn)     # its deque entry is skipped by take_ready

    # -- windows ----------------------------------------------------------------------------
    def share(self) -> int:
        s = self.total // (self.members or 1)
        return s if s > self.floor else self.floor

    def available(self) -> int:
        a = self.total - self.used
        return a if a > 0 else 0

    def grant(self, conn, held: int, want: int, *, wait: bool = True) -> int:
        """How many of `want` more bytes `conn` (holding `held`) may advertise now.  Short of
        `want` because the whole budget is spent (not because of its share): queued as a waiter
        when `wait`."""
        if want <= 0:
            return 0
        by_share = self.share() - held
        room = want if want < by_share else by_share
        avail = self.total - self.used
        if avail < room:
            room = avail
            if wait and conn not in self._waiting and getattr(conn, "budget_held", None) is not None:
                self._waiting.add(conn)
                self._waiters.append(conn)
        floor_room = self.floor - held
        if room < floor_room:
            room = want if want < floor_room else floor_room
        return room if room > 0 else 0

    def set_held(self, conn, held: int) -> None:
        old = conn.budget_held
        if old is None:
            return                          # detached (closed): nothing to account
        if held < 0:
            held = 0
        self.used += held - old
        conn.budget_held = held

    def take_ready(self) -> list:
        """Waiters to offer a window update now, oldest first, while the budget has room."""
        if not self._waiters or self.total - self.used <= 0:
            return []
        out = []
        waiters, waiting = self._waiters, self._waiting
        for _ in range(len(waiters)):
            if self.total - self.used <= 0:
                break
            conn = waiters.popleft()
            if conn in waiting:
                waiting.discard(conn)
                out.append(conn)
        self.wakeups += len(out)
        return out

    def waiting(self) -> int:
        return len(self._waiting)


DEFAULT_BURST = 1024            # new-data segments per flush, all connections together


class SendQuota:
    """Bounds the new-data segments all connections put out between two flushes of the
    stack's outbox, so a burst of many senders cannot overrun the process's own UDP socket
    (the kernel drops what does not fit in its send buffer, and the senders take it for
    congestion).  A connection that finds the quota spent parks; the stack refills the quota
    at each flush and resumes the parked connections first, in the order they parked
    (round-robin between busy senders).  Retransmissions and ACKs are never held back."""

    __slots__ = ("burst", "left", "since", "_parked", "_parked_set", "parks")

    def __init__(self, burst: int = DEFAULT_BURST):
        if burst <= 0:
            raise ValueError("burst must be positive")
        self.burst = burst
        self.left = burst
        self.since: float | None = None     # when the oldest parked connection parked
        self._parked: collections.deque = collections.deque()
        self._parked_set: set = set()
        self.parks = 0

    def refill(self) -> None:
        self.left = self.burst

    def park(self, conn, now: float) -> None:
        if conn not in self._parked_set:
            self._parked_set.add(conn)
            self._parked.append(conn)
            self.parks += 1
            if self.since is None:
                self.since = now

    def take_parked(self) -> list:
        out = list(self._parked)
        self._parked.clear()
        self._parked_set.clear()
        self.since = None
        return out
