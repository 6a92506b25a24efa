#!/usr/bin/env python3
"""Proxy front ends, tsproxy vs sing-box's mixed inbound, same real peer, same run.

Download MB/s through SOCKS5 (remote names), HTTP CONNECT and plain-HTTP forwarding (curl), and
SOCKS5 connection setup rate at c=1 and c=50 (connect, 1-byte echo round trip, close) with
p50/p99 latency.  tsproxy runs in the root namespace with `--listen`; sing-box's SOCKS5/HTTP
port 11080 lives in its own namespace, where its clients run.

    sudo .venv/bin/python bench/bench_proxy.py [--runs 3] [--mb 50] [--conns 200]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import MB, Summary, curl_rate, ratio_line, reference_env, run_repeated, save_results  # noqa: E402
from bench.common import conn_rate as common_conn_rate  # noqa: E402
from tsproxy.testing.wgpeer import PEER_IP4  # noqa: E402


def conn_rate(port, n, c, ns=None):
    return common_conn_rate(port, n, c, PEER_IP4, 7, ns=ns)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--conns", type=int, default=200)
    a = ap.parse_args()
    size = a.mb * MB
    url = f"http://{PEER_IP4}/bytes/{size}"
    summaries, lines = [], []
    with reference_env() as (peer, ref):
        from tests.conftest import Daemon, free_port
        import tempfile
        port = free_port()
        d = Daemon(tempfile.mkdtemp(prefix="tsp-bench-proxy-"),
                   ["--wg-config", peer.write_client_conf(), "--listen", f"127.0.0.1:{port}"]).start()
        try:
            modes = {"socks5": ["--socks5-hostname"], "http-connect": ["-p", "-x"], "http-forward": ["-x"]}
            for mode, flag in modes.items():
                def prox(p):
                    return f"http://127.0.0.1:{p}" if "-x" in flag else f"127.0.0.1:{p}"
                ours = run_repeated(f"tsproxy {mode} download", "MB/s", lambda: curl_rate(
                    [*flag, prox(port), url], expect_bytes=size), runs=a.runs)
                theirs = run_repeated(f"sing-box {mode} download", "MB/s", lambda: curl_rate(
                    [*flag, prox(11080), url], ns=ref.ns.name, expect_bytes=size), runs=a.runs)
                summaries += [ours, theirs]
                lines += [ours.line(), theirs.line(), ratio_line(ours, theirs)]
            for c in (1, 50):
                res = {}
                for who, p, ns in (("tsproxy", port, None), ("sing-box", 11080, ref.ns.name)):
                    rs = [conn_rate(p, a.conns, c, ns) for _ in range(a.runs)]
                    s = Summary(f"{who} socks5 conn/s c={c}", "conn/s", [r["rate"] for r in rs])
                    p50 = Summary(f"{who} socks5 p50 c={c}", "ms", [r["p50"] for r in rs])
                    p99 = Summary(f"{who} socks5 p99 c={c}", "ms", [r["p99"] for r in rs])
                    res[who] = s
                    summaries += [s, p50, p99]
                    lines += [s.line(), p50.line(), p99.line()]
                lines.append(ratio_line(res["tsproxy"], res["sing-box"]))
        finally:
            d.stop()
    print("\n".join(lines))
    print("saved", save_results("proxy", summaries))


if __name__ == "__main__":
    main()
