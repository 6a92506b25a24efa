"""TIME-WAIT as a small record: what is left of a connection that closed first.

A connection in TIME-WAIT has nothing more to deliver; for 2*MSL it only answers the peer's
retransmitted FIN (its last ACK may have been lost) and keeps the 4-tuple from a new
incarnation.  The stack (stack.py) swaps such a connection for a `TimeWait`: a few numbers
instead of the whole connection (about 300 bytes against 3 KB, and a burst of short
connections leaves them behind by the ten thousand), kept in arrival order because they all last the
same 2*MSL, so expiry needs no heap.

The answers are those the connection itself gives in TIME-WAIT (tcp.py, RFC 9293 3.10.7.4 with
RFC 5961): an unacceptable segment earns an ACK, unless it is a RST; a RST at RCV.NXT ends the
record, any other acceptable RST or a SYN earns a challenge ACK; data or a FIN is acked.

Reuse (RFC 6191 in spirit, as Linux's tcp_tw_reuse): an active open whose 4-tuple is held by a
record at least REUSE_AFTER old takes the 4-tuple over, with an ISS beyond everything the old
incarnation sent, so many short connections to one server never run out of local ports.
"""

from __future__ import annotations

from tsproxy.netstack.tcp_seq import ACK, FIN, M32, RST, SYN, unwrap
from tsproxy.netstack.wire.tcp import Packetizer

REUSE_AFTER = 1.0              # seconds in TIME-WAIT before the 4-tuple may be taken over
ISS_GAP = 1 << 16              # a reusing connection's ISS is at least this far past SND.NXT
END = "end"                    # segment(): the record ends (a RST at RCV.NXT)


class TimeWait:
    __slots__ = ("key", "snd_nxt", "rcv_nxt", "wnd", "win_field", "since", "expires", "done")

    def __init__(self, key, *, snd_nxt: int, rcv_nxt: int, wnd: int, win_field: int,
                 since: float, expires: float):
        self.key = key                  # (raddr, rport, laddr, lport), as the stack's demux
        self.snd_nxt = snd_nxt          # unwrapped, as in tcp.py
        self.rcv_nxt = rcv_nxt
        self.wnd = wnd                  # receive window in bytes (acceptability)
        self.win_field = win_field      # the window field our ACKs carry
        self.since = since
        self.expires = expires
        self.done = False               # ended early (RST, reuse, overflow): the FIFO skips it

    @classmethod
    def of(cls, conn, now: float) -> "TimeWait":
        wnd = conn.rcv_adv - conn.rcv_nxt
        if wnd < 0:
            wnd = 0
        field = wnd >> conn.rcv_wscale
        return cls(conn.key, snd_nxt=conn.snd_nxt, rcv_nxt=conn.rcv_nxt, wnd=wnd,
                   win_field=field if field < 65535 else 65535, since=now,
                   expires=conn.time_wait_at if conn.time_wait_at is not None else now)

    def segment(self, seq: int, flags: int, plen: int):
        """A segment for this 4-tuple: the packet to answer with, None, or END."""
        rn = self.rcv_nxt
        seq = unwrap(rn, seq)
        wnd = self.wnd
        seg_len = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        if seg_len == 0:
            ok = seq == rn if wnd == 0 else rn <= seq < rn + wnd
        else:
            ok = wnd > 0 and (rn <= seq < rn + wnd or rn <= seq + seg_len - 1 < rn + wnd)
        if flags & RST:
            if not ok:
                return None
            return END if seq == rn else self.ack()          # RFC 5961 3.2: challenge ACK
        if not ok or flags & SYN or seg_len:
            return self.ack()            # a retransmitted FIN, data after it, a SYN, an old one
        return None                      # a pure ACK at RCV.NXT: nothing to say

    def ack(self) -> bytearray:
        # a packetizer is made when one is needed (rarely): kept, it would double the record
        raddr, rport, laddr, lport = self.key
        return Packetizer(laddr, raddr, lport, rport).build(self.snd_nxt, self.rcv_nxt, ACK,
                                                            self.win_field)

    def reuse_iss(self, iss: int) -> int:
        """The ISS for a new incarnation of this 4-tuple: `iss` when it is ahead of SND.NXT by
        ISS_GAP, else just that far ahead (sequence space the old segments never used)."""
        floor = (self.snd_nxt + ISS_GAP) & M32
        return iss if (iss - floor) & M32 < 1 << 31 else floor
