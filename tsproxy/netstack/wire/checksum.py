"""Internet checksum (RFC 1071) with big-integer folding.

2**16 == 1 (mod 0xFFFF), so the ones'-complement sum of 16-bit words is congruent to the
whole buffer read as one big integer, mod 0xFFFF: one C-level conversion instead of a Python
loop over 700 words (about 2.3 us for 1400 bytes here).  `ones_sum` returns the folded sum
in 0..0xFFFF (0xFFFF standing for a non-zero multiple), so partial sums can be combined.

`fold` is `s % 0xFFFF` for the big integers of a packet: CPython 3.11 divides a long by a small
int digit by digit (and builds the quotient), about 1.7 us for 1460 bytes; adding the halves
split at a multiple of 16 bits keeps the value mod 0xFFFF (2**16k == 1) with only shifts, masks
and adds, and the final `%` then runs on 90 bits: 1.2 us less per full segment (measured).
"""

_from_bytes = int.from_bytes
# split points in bits: multiples of 16 (2**16k == 1 mod 0xFFFF) and of 30 (CPython's digit)
_M11520, _M5760, _M2880, _M1440 = ((1 << k) - 1 for k in (11520, 5760, 2880, 1440))


def fold(s: int) -> int:
    """s % 0xFFFF for s >= 0, cheaper for large s (see the module docstring)."""
    b = s.bit_length()
    if b > 2880:
        while b > 34560:                              # jumbo: halve at a 240-bit boundary
            k = (b // 480) * 240
            s = (s >> k) + (s & ((1 << k) - 1))
            b = s.bit_length()
        if b > 17280:
            s = (s >> 11520) + (s & _M11520)
        s = (s >> 5760) + (s & _M5760)
        s = (s >> 2880) + (s & _M2880)
        s = (s >> 1440) + (s & _M1440)
    return s % 0xFFFF


def ones_sum(data) -> int:
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = fold(_from_bytes(data, "big"))
    if s == 0 and any(data):
        return 0xFFFF
    return s


def combine(*sums: int) -> int:
    s = sum(sums) % 0xFFFF
    return 0xFFFF if s == 0 and any(sums) else s


def finish(s: int) -> int:
    """Ones' complement of a folded sum: the value to put in a checksum field."""
    return ~s & 0xFFFF


def checksum(data) -> int:
    return finish(ones_sum(data))


def reference_checksum(data: bytes) -> int:
    """The plain RFC 1071 loop, kept for property tests."""
    if len(data) & 1:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
