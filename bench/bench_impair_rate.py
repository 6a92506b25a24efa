#!/usr/bin/env python3
"""The rate impairment fixture (`tsproxy.testing.impair.set_rate`, a tbf qdisc) really slows the
peer's veth: download time over the raw veth with and without a 20 Mbit/s bottleneck. Moved
here from the test suite, which checks only that the qdisc is installed and removed (speed
is not asserted in tests).

    .venv/bin/python bench/bench_impair_rate.py [--runs 3] [--mbit 20]
"""

import argparse
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import MB, ratio_line, reference_env, run_repeated, save_results, timed  # noqa: E402
from tsproxy.testing import impair  # noqa: E402


def fetch(peer, n: int) -> None:
    with socket.create_connection((str(peer.veth_ip), 80), timeout=60) as s:
        s.sendall(b"GET /bytes/%d HTTP/1.1\r\nConnection: close\r\n\r\n" % n)
        got = 0
        while chunk := s.recv(1 << 16):
            got += len(chunk)
    if got <= n:
        raise RuntimeError(f"short transfer: {got} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mbit", type=float, default=20.0)
    ap.add_argument("--mb", type=float, default=2.5)
    a = ap.parse_args()
    n = int(a.mb * MB)
    with reference_env(singbox=False) as (peer, _):
        impair.set_rate(peer, peer.ns_if, a.mbit)
        try:
            shaped = run_repeated(f"shaped {a.mbit:g} Mbit/s", "MB/s",
                                  lambda: n / timed(lambda: fetch(peer, n)) / MB, runs=a.runs)
        finally:
            impair.clear_rate(peer, peer.ns_if)
        plain = run_repeated("unshaped", "MB/s", lambda: n / timed(lambda: fetch(peer, n)) / MB,
                             runs=a.runs)
    print(shaped.line())
    print(plain.line())
    print(ratio_line(shaped, plain))
    print(f"expected for the shaped link: ~{a.mbit / 8:.1f} MB/s")
    print(save_results("impair-rate", [shaped, plain], {"mbit": a.mbit, "bytes": n}))


if __name__ == "__main__":
    main()
