#!/usr/bin/env python3
"""Proxy front ends, tsproxy vs sing-box's mixed inbound, same real peer, same run.

Download MB/s through SOCKS5 (remote names), HTTP CONNECT and plain-HTTP forwarding (curl), and
SOCKS5 connection setup rate at c=1 and c=50 (connect, 1-byte echo round trip, close) with
p50/p99 latency.  tsproxy runs in the root namespace with `--listen`; sing-box's SOCKS5/HTTP
port 11080 lives in its own namespace, where its clients run.

    sudo .venv/bin/python bench/bench_proxy.py [--runs 3] [--mb 50] [--conns 200]
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import MB, Summary, curl_rate, ratio_line, reference_env, run_repeated, save_results  # noqa: E402
from tsproxy.testing.wgpeer import PEER_IP4  # noqa: E402

# one connection-rate run: N SOCKS5 CONNECTs to the peer's TCP echo, C at a time
CONN_CLIENT = r'''
import asyncio, json, socket, struct, sys, time
port, n, c, dst = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
async def one(lat):
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(dst) + struct.pack("!H", 7))
    hello = await r.readexactly(2 + 10)
    assert hello[1] == 0 and hello[3] == 0, hello
    w.write(b"x")
    assert await r.readexactly(1) == b"x"
    w.close()
    lat.append(time.perf_counter() - t0)
async def main():
    lat, sem = [], asyncio.Semaphore(c)
    async def guarded():
        async with sem:
            await one(lat)
    t0 = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(n)))
    wall = time.perf_counter() - t0
    lat.sort()
    print(json.dumps({"rate": n / wall, "p50": lat[len(lat) // 2] * 1e3, "p99": lat[int(len(lat) * 0.99) - 1] * 1e3}))
asyncio.run(main())
'''


def conn_rate(port, n, c, ns=None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [sys.executable, "-c", CONN_CLIENT, str(port), str(n),
                                                          str(c), PEER_IP4]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip()[-300:])
    return json.loads(p.stdout)


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
