"""Sliding-window replay filter for transport counters (RFC 6479: a ring of 64-bit blocks).

Same boundary as wireguard-go's replay.Filter: a counter at most REPLAY_WINDOW (8128) behind
the highest accepted one is still accepted once; one further behind is rejected. The bitmap
is a ring of 128 blocks of 64 bits, as in wireguard-go: moving the window clears whole blocks,
so a packet costs a few small-int operations (a single 8129-bit integer shifted per packet
allocated a kilobyte each time).

`seen_or_too_old(c)` is the cheap pre-check before decrypting; `accept(c)` records a counter
after its packet authenticated, so forged packets can never move the window.
"""

from tsproxy.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW

_RING = 128                   # blocks; (128 - 1) * 64 == REPLAY_WINDOW
_RING_MASK = _RING - 1
assert (_RING - 1) * 64 == REPLAY_WINDOW


class ReplayFilter:
    __slots__ = ("last", "ring")

    def __init__(self):
        self.last = -1          # highest accepted counter
        self.ring = [0] * _RING  # bit (c & 63) of block (c >> 6) & 127: counter c was accepted

    def seen_or_too_old(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES:
            return True
        if counter > self.last:
            return False
        if self.last - counter > REPLAY_WINDOW:
            return True
        return bool((self.ring[(counter >> 6) & _RING_MASK] >> (counter & 63)) & 1)

    def accept(self, counter: int) -> bool:
        """Record counter; False if it is a replay or outside the window."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        last = self.last
        ring = self.ring
        block = counter >> 6
        if counter > last:
            cur = last >> 6
            diff = block - cur
            if diff > _RING:
                diff = _RING
            for i in range(cur + 1, cur + diff + 1):
                ring[i & _RING_MASK] = 0
            self.last = counter
        elif last - counter > REPLAY_WINDOW:
            return False
        i = block & _RING_MASK
        bit = 1 << (counter & 63)
        old = ring[i]
        if old & bit:
            return False
        ring[i] = old | bit
        return True
