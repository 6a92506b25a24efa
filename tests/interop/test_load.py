"""Load without loss, CI size (issue 12 item 1; the full 1,000-connection run is
bench/bench_load.py): 200 concurrent 1 MB downloads through one daemon's proxy port (half
SOCKS5, a quarter HTTP GET, a quarter HTTP CONNECT) against the wireguard-go peer, two rounds in
a row.  Every transfer must be complete and byte-exact (length and sha256), and after each round
the daemon's fds, asyncio tasks and proxy connections come back to their baseline.  No timing
is asserted; each transfer only has a generous deadline so a hang fails instead of blocking."""

import asyncio
import time

import pytest

from tests.conftest import Daemon, free_port
from tsproxy.testing import loadgen
from tsproxy.testing.wgpeer import PEER_IP4

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

CONNS, SIZE, ROUNDS = 200, 1_000_000, 2


def _process(d: Daemon) -> dict:
    st = d.status()
    return {"fds": loadgen.proc_fds(st["pid"]), "tasks": st["process"]["asyncio_tasks"],
            "rss": loadgen.proc_rss(st["pid"])}


def _back_to(d: Daemon, base: dict, timeout: float = 60.0) -> dict:
    """The daemon's fds and tasks at (or below) the baseline, waited for under a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        now = _process(d)
        if now["fds"] <= base["fds"] and now["tasks"] <= base["tasks"]:
            return now
        assert time.monotonic() < deadline, f"not back to baseline: {now} vs {base}"
        time.sleep(0.2)


def test_200_concurrent_1mb_downloads_two_rounds_byte_exact(wg_peer, tmp_path):
    loadgen.raise_nofile(4096)
    port = free_port()
    d = Daemon(str(tmp_path / "d"), ["--wg-config", wg_peer.write_client_conf(),
                                     "--listen", f"127.0.0.1:{port}"]).start()
    try:
        warm = asyncio.run(loadgen.download_many(port, PEER_IP4, 80, n=4, size=1000))
        assert all(t.ok for t in warm), [t.error for t in warm]
        time.sleep(0.5)       # let the warm-up's closed connections finish their FIN exchange
        base = _back_to(d, _process(d))
        udp_buffers = d.status()["process"]["udp_buffers"]
        assert udp_buffers["rcvbuf"] > 0 and udp_buffers["sndbuf"] > 0
        for rnd in range(ROUNDS):
            results = asyncio.run(loadgen.download_many(port, PEER_IP4, 80, n=CONNS, size=SIZE,
                                                        timeout=400, idle=120))
            s = loadgen.summarize(results)
            assert s["ok"] == CONNS, f"round {rnd + 1}: {s['failed']} failed: {s['errors']}"
            assert s["body_bytes"] == CONNS * SIZE
            assert {t.kind for t in results} == {"socks5", "http", "connect"}
            _back_to(d, base)
        assert d.counters().get("proxy.mixed.accepted", 0) >= ROUNDS * CONNS
    finally:
        assert d.stop() == 0
