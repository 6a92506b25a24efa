"""The test relay's impairments do what they say (drop, duplicate, hold one back for the next)."""

import asyncio
import random

from tsproxy.testing.udp_impair import Impairer


def _run(loss, duplicate, reorder, n=2000):
    async def main():
        counters = {f"x_{k}": 0 for k in ("in", "dropped", "duplicated", "reordered")}
        imp = Impairer(random.Random(1), loss, duplicate, reorder, 0.01, counters, "x_")
        out = []
        for i in range(n):
            imp.push(i.to_bytes(4, "big"), out.append)
        await asyncio.sleep(0.05)      # let a datagram still held at the end go out on its timer
        return [int.from_bytes(d, "big") for d in out], counters
    return asyncio.run(main())


def test_clean_relay_is_in_order_and_complete():
    out, c = _run(0, 0, 0)
    assert out == list(range(2000)) and c["x_dropped"] == c["x_duplicated"] == c["x_reordered"] == 0


def test_impairments_happen_and_are_counted():
    out, c = _run(0.05, 0.05, 0.05)
    assert c["x_in"] == 2000
    assert len(out) == 2000 - c["x_dropped"] + c["x_duplicated"]
    assert 50 < c["x_dropped"] < 150 and 50 < c["x_duplicated"] < 150 and 50 < c["x_reordered"] < 150
    swaps = sum(1 for a, b in zip(out, out[1:]) if b < a)
    assert swaps == c["x_reordered"]               # each held datagram lands after a newer one
    assert len(set(out)) == 2000 - c["x_dropped"]   # only dropped datagrams are missing
