#!/usr/bin/env python3
"""tsproxy.Node throughput: `open_connection()` next to the SOCKS5 path of the same node.

Two Nodes in this process (one event loop on a thread) on the loopback test tailnet (test control
server + DERP relay; no root):

    api-b  start_server on tailnet port 80: a tiny HTTP server sending N bytes
    api-a  (1) open_connection("api-b", 80) from Python, read N bytes        -> "open_connection"
           (2) serve_proxy("127.0.0.1:0"); curl --socks5-hostname through it  -> "socks5+curl"

Both paths cross the same two userspace stacks and WireGuard tunnel; (2) adds the proxy relay
and the host's loopback sockets.  The API should not be slower than the proxy.

    .venv/bin/python bench/bench_api.py [--runs 5] [--mb 50]
"""

import argparse
import asyncio
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import MB, curl_rate, ratio_line, run_repeated, save_results  # noqa: E402

import tsproxy  # noqa: E402
from tsproxy.testing.tailnet import TestTailnet  # noqa: E402

BLOCK = os.urandom(256 * 1024)


async def _serve(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    n = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[-1])
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % n)
    sent = 0
    while sent < n:
        chunk = BLOCK[: n - sent]
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
    writer.close()


async def _api_fetch(node, n: int) -> float:
    t0 = time.perf_counter()
    reader, writer = await node.open_connection("api-b", 80)
    writer.write(b"GET /bytes/%d HTTP/1.1\r\nHost: api-b\r\n\r\n" % n)
    await reader.readuntil(b"\r\n\r\n")
    got = 0
    while chunk := await reader.read(256 * 1024):
        got += len(chunk)
    writer.close()
    if got != n:
        raise RuntimeError(f"read {got} bytes, expected {n}")
    return n / (time.perf_counter() - t0) / MB


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mb", type=int, default=50)
    args = ap.parse_args()
    n = args.mb * MB
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro, timeout=600):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    with TestTailnet(host="127.0.0.1") as net:
        async def up():
            a = tsproxy.Node(control_url=net.control_url, auth_key=net.auth_key, hostname="api-a")
            b = tsproxy.Node(control_url=net.control_url, auth_key=net.auth_key, hostname="api-b")
            for node in (a, b):
                await node.start()
                await node.wait_running(60)
            await b.start_server(_serve, 80)
            while await a.whois(b.addresses[0]) is None:
                await asyncio.sleep(0.05)
            host, port = await a.serve_proxy("127.0.0.1:0")
            return a, b, port
        a, b, port = run(up())
        try:
            url = f"http://api-b/bytes/{n}"
            results = []
            for _ in range(args.runs):      # interleaved, so load on the machine hits both alike
                results.append(("api", run_repeated("open_connection", "MB/s",
                                                    lambda: run(_api_fetch(a, n)), runs=1)))
                results.append(("socks", run_repeated("socks5+curl", "MB/s", lambda: curl_rate(
                    ["--socks5-hostname", f"127.0.0.1:{port}", url], expect_bytes=n), runs=1)))
        finally:
            run(a.aclose())
            run(b.aclose())
    api = results[0][1]
    socks = results[1][1]
    for kind, s in results[2:]:
        target = api if kind == "api" else socks
        target.values += s.values
        target.errors += s.errors
    print(api.line())
    print(socks.line())
    print(ratio_line(api, socks))
    save_results("api-vs-socks5", [api, socks], {"mb": args.mb})
    loop.call_soon_threadsafe(loop.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
