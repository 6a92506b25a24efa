"""Back-to-back TCP throughput of the pure-Python netstack (wall-clock MB/s, one direction).

Two sans-IO Stacks over the in-memory Link (full IP/TCP packets with checksums, 5 ms delay),
simulated clock.  Prints MB/s and microseconds per data segment for 0% and 1% loss.

    .venv/bin/python bench/bench_tcp_micro.py [MB]
"""

import os
import sys
import time

from tsproxy.netstack import tcp as T
from tsproxy.netstack.stack import Stack
from tsproxy.testing.link import Link, run_until


def one(size: int, loss: float) -> tuple[float, int, float]:
    a = Stack(["10.0.0.1"], mtu=1420, now=0.0)
    b = Stack(["10.0.0.2"], mtu=1420, now=0.0)
    b.tcp_listen(80)
    c = a.tcp_connect("10.0.0.2", 80, 0.0)
    data = os.urandom(size)
    view = memoryview(data)
    st = {"sent": 0, "got": 0, "peer": None, "ok": True}

    def step(now):
        if st["peer"] is None:
            for conn in b.take_touched():
                if conn.state == T.ESTABLISHED:
                    st["peer"] = conn
            a.take_touched()
        if c.state == T.ESTABLISHED and st["sent"] < size:
            st["sent"] += c.send(view[st["sent"]:st["sent"] + 262144], now)
            a.poke(c)
        p = st["peer"]
        if p is not None:
            got = p.recv(1 << 20, now)
            if got:
                if got != data[st["got"]:st["got"] + len(got)]:
                    st["ok"] = False
                st["got"] += len(got)
                b.poke(p)

    link = Link(delay=0.005, loss=loss, seed=7)
    t0 = time.perf_counter()
    sim = run_until([a, b], link, lambda: st["got"] == size, now=0.0, on_step=step, limit=3600)
    wall = time.perf_counter() - t0
    if not st["ok"]:
        raise SystemExit("data mismatch")
    return wall, link.stats["sent"], sim


def main() -> None:
    mb = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    size = int(mb * 1_000_000)
    for loss in (0.0, 0.01):
        wall, pkts, sim = one(size, loss)
        print(f"loss {loss:4.0%}: {size / wall / 1e6:6.1f} MB/s wall  "
              f"({size / 1e6:.0f} MB in {wall:.2f} s, {pkts} packets both ways, "
              f"{wall / pkts * 1e6:.1f} us/packet incl. link+checksums, simulated {sim:.2f} s)")


if __name__ == "__main__":
    main()
