#!/usr/bin/env python3
"""Many short connections to ONE server: N SOCKS5 CONNECTs, C at a time, each a 1-byte echo
that the client closes first, through tsproxy and then through sing-box (same wireguard-go
peer, same run).

    .venv/bin/python bench/bench_churn.py                    # 20000 connections, c=50
    .venv/bin/python bench/bench_churn.py --conns 40000 --concurrency 100

The proxy's stack closes first on the tunnel side, so every connection leaves a TIME-WAIT
4-tuple for 2 x MSL (60 s) on the same remote address and port: past ~16k connections a minute
(the ephemeral port range) a stack that only waits runs out of local ports.  Reports per
contender: completed and failed connections (with the first error), the rate and p50/p99
latency, and tsproxy's RSS before and after and its TIME-WAIT counters.  Writes
bench/results/churn-<UTC>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS_DIR, _git_commit, conn_rate, reference_env, rss_kb  # noqa: E402
from bench.suite_wg import SB, TSP, Clients  # noqa: E402
from tests.conftest import Daemon, free_port  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--no-anchor", action="store_true", help="tsproxy only, no sing-box")
    args = ap.parse_args(argv)
    from tsproxy.testing.servers import DEFAULT_PORTS
    from tsproxy.testing.wgpeer import PEER_IP4
    echo = DEFAULT_PORTS["echo"]
    work = tempfile.mkdtemp(prefix="bench-churn-")
    os.chmod(work, 0o755)
    out: dict = {}
    try:
        with reference_env(os.path.join(work, "peer"), singbox=not args.no_anchor) as (peer, ref):
            socks, fwd = free_port(), free_port()
            d = Daemon(os.path.join(work, "tsp"), ["--wg-config", peer.write_client_conf(),
                       "--listen", f"127.0.0.1:{socks}"]).start(timeout=60)
            try:
                cl = Clients(peer, ref, d, socks, fwd) if ref is not None else None
                who = [TSP] + ([] if ref is None else [SB])
                for w in who:
                    port = socks if w == TSP else cl.proxy[w]
                    ns = None if w == TSP else cl.ns[w]
                    conn_rate(port, 100, 10, PEER_IP4, echo, ns=ns)       # warm-up
                    before = rss_kb(d.proc.pid) if w == TSP else None
                    r = conn_rate(port, args.conns, args.concurrency, PEER_IP4, echo, ns=ns,
                                  timeout=1800, check=False)
                    row = {"ok": args.conns - r["failed"], "failed": r["failed"],
                           "first_error": (r["error"] or [None])[0], "rate": r["rate"],
                           "p50_ms": r["p50"], "p99_ms": r["p99"]}
                    if w == TSP:
                        counters = d.status()["counters"]
                        row["rss_mb"] = [before / 1024, rss_kb(d.proc.pid) / 1024]
                        row["counters"] = {k: v for k, v in counters.items() if "time_wait" in k}
                    out[w] = row
                    print(f"{w:9s} ok {row['ok']:6d} failed {row['failed']:6d} "
                          f"{row['rate']:7.0f} conn/s p50 {row['p50_ms'] or 0:6.1f} ms "
                          f"p99 {row['p99_ms'] or 0:6.1f} ms"
                          + (f"  RSS {row['rss_mb'][0]:.1f} -> {row['rss_mb'][1]:.1f} MB "
                             f"{row['counters']}" if w == TSP else "")
                          + (f"  first error: {row['first_error']}" if row["failed"] else ""),
                          flush=True)
            finally:
                d.stop()
    finally:
        subprocess.run(["rm", "-rf", work])
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS_DIR, f"churn-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"bench": "churn", "utc": stamp, "commit": _git_commit(), "cpus": os.cpu_count(),
                   "conns": args.conns, "concurrency": args.concurrency, "results": out}, f, indent=1)
    print("wrote", path)
    return 0 if all(r["failed"] == 0 for r in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
