"""Sliding-window replay filter for transport counters (RFC 6479 semantics, big-int bitmap).

Same boundary as wireguard-go's replay.Filter: a counter at most REPLAY_WINDOW (8128) behind
the highest accepted one is still accepted once; one further behind is rejected. The bitmap
therefore holds REPLAY_WINDOW + 1 bits (distances 0..8128).

`seen_or_too_old(c)` is the cheap pre-check before decrypting; `accept(c)` records a counter
after its packet authenticated, so forged packets can never move the window.
"""

from tsproxy.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW

_BITS = REPLAY_WINDOW + 1     # distances 0..REPLAY_WINDOW inclusive
_MASK = (1 << _BITS) - 1


class ReplayFilter:
    __slots__ = ("last", "bits")

    def __init__(self):
        self.last = -1          # highest accepted counter
        self.bits = 0           # bit i set: counter (last - i) was accepted

    def seen_or_too_old(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES:
            return True
        if counter > self.last:
            return False
        diff = self.last - counter
        return diff > REPLAY_WINDOW or bool((self.bits >> diff) & 1)

    def accept(self, counter: int) -> bool:
        """Record counter; False if it is a replay or outside the window."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        last = self.last
        if counter > last:
            shift = counter - last
            self.bits = ((self.bits << shift) | 1) & _MASK if shift < _BITS else 1
            self.last = counter
            return True
        diff = last - counter
        if diff > REPLAY_WINDOW:
            return False
        bit = 1 << diff
        if self.bits & bit:
            return False
        self.bits |= bit
        return True
