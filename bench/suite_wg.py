"""Plain WireGuard mode against sing-box, both talking to the same wireguard-go peer in one run.

    root namespace: tsproxy (--wg-config, --listen 127.0.0.1:P, --forward F:100.64.0.2:80)
    tspc namespace: sing-box (mixed inbound :11080, direct inbound :18080 -> 100.64.0.2:80)
    tspp namespace: wireguard-go + servers.py (HTTP :80, TCP echo :7)

Case groups (`--only`): wg-rss, wg-transfer (SOCKS5 / HTTP CONNECT / port forward, download and
upload, CPU seconds per GB), wg-streams, wg-conn, wg-loss.  Every case alternates the two
clients run by run (common.alternate).
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from bench.common import (MB, alternate, conn_rate, cpu_seconds, curl_rate,
                          curl_upload_args, idle_connections, parallel_rate, reference_env,
                          rss_kb, to_summary, write_pattern_file)
from bench.report import Case, Target, failure_case

GROUP = "WireGuard mode vs sing-box (same wireguard-go peer)"
GROUPS = ("wg-rss", "wg-transfer", "wg-streams", "wg-conn", "wg-loss")
TSP, SB = "tsproxy", "sing-box"


class Clients:
    """Where each client's proxy, forward and process live."""

    def __init__(self, peer, ref, daemon, socks_port: int, fwd_port: int):
        from tsproxy.testing.singbox import DIRECT_PORT, MIXED_PORT
        self.peer, self.ref, self.daemon = peer, ref, daemon
        self.ns = {TSP: None, SB: ref.ns.name}
        self.proxy = {TSP: socks_port, SB: MIXED_PORT}
        self.forward = {TSP: fwd_port, SB: DIRECT_PORT}
        self.pid = {TSP: daemon.proc.pid, SB: ref.proc.pid}


def _pair(key, title, out, unit, *, pick=None, higher=True, target=None, note="") -> Case:
    return Case(key, GROUP, title, to_summary(f"{TSP} {title}", unit, out[TSP], pick),
                to_summary(f"{SB} {title}", unit, out[SB], pick), higher_is_better=higher,
                target=target, note=note)


def _front_end_args(front: str, port: int, path: str) -> tuple[list[str], str]:
    """curl arguments (minus the body) and the URL for one front end."""
    from tsproxy.testing.wgpeer import PEER_IP4
    if front == "socks5":
        return ["--socks5-hostname", f"127.0.0.1:{port}"], f"http://{PEER_IP4}{path}"
    if front == "http-connect":
        return ["-p", "-x", f"http://127.0.0.1:{port}"], f"http://{PEER_IP4}{path}"
    return [], f"http://127.0.0.1:{port}{path}"             # port forward


def rss_cases(cl: Clients, idle: int) -> list[Case]:
    """VmRSS after one request, then with `idle` proxied connections held open (one round:
    RSS is a level, not a rate; the per-connection figure is the difference / idle)."""
    from tsproxy.testing.wgpeer import PEER_IP4
    idle_mb: dict[str, list] = {TSP: [], SB: []}
    held_mb: dict[str, list] = {TSP: [], SB: []}
    per_conn: dict[str, list] = {TSP: [], SB: []}
    for who in (TSP, SB):
        try:
            curl_rate(["--socks5-hostname", f"127.0.0.1:{cl.proxy[who]}", f"http://{PEER_IP4}/"],
                      ns=cl.ns[who])
            base = rss_kb(cl.pid[who])
            idle_mb[who].append(base / 1024)
            with idle_connections(cl.proxy[who], idle, PEER_IP4, 7, ns=cl.ns[who]) as n:
                if n != idle:
                    raise RuntimeError(f"only {n} of {idle} idle connections opened")
                held = rss_kb(cl.pid[who])
            held_mb[who].append(held / 1024)
            per_conn[who].append((held - base) / idle)
        except Exception as e:                               # noqa: BLE001 - counted
            for series in (idle_mb, held_mb, per_conn):
                if len(series[who]) < 1:
                    series[who].append(e)
    return [
        _pair("wg.rss.idle", "RSS idle", idle_mb, "MB", higher=False,
              target=Target("<=", 50, "abs")),
        _pair("wg.rss.held", f"RSS with {idle} idle connections", held_mb, "MB", higher=False),
        _pair("wg.rss.per_conn", "RSS per idle connection", per_conn, "KB", higher=False,
              target=Target("<=", 16, "abs"), note=f"(RSS with {idle} - idle) / {idle}"),
    ]


def transfer_cases(cl: Clients, size: int, runs: int, upfile: str) -> list[Case]:
    """Single-stream download and upload through each front end, and CPU s/GB for each
    client process over all of them (utime + stime from /proc around every transfer)."""
    cases, cpu = [], {TSP: [], SB: []}

    def measured(who, fn):
        def run():
            c0 = cpu_seconds(cl.pid[who])
            rate = fn()
            cpu[who].append((cpu_seconds(cl.pid[who]) - c0) / (size / 1e9))
            return rate
        return run

    for front in ("socks5", "http-connect", "forward"):
        for direction in ("download", "upload"):
            def fn_for(who, front=front, direction=direction):
                port = cl.proxy[who] if front != "forward" else cl.forward[who]
                path = f"/bytes/{size}" if direction == "download" else "/upload"
                args, url = _front_end_args(front, port, path)
                if direction == "upload":
                    args = [*args, *curl_upload_args(upfile)]
                return measured(who, lambda: curl_rate([*args, url], ns=cl.ns[who], expect_bytes=size,
                                                       upload=direction == "upload"))
            out = alternate({TSP: fn_for(TSP), SB: fn_for(SB)}, runs)
            target = Target(">=", 1.0, label="sing-box") if front == "socks5" else None
            cases.append(_pair(f"wg.{front}.{direction[:2]}", f"{front} {direction}", out, "MB/s",
                               target=target, note=f"{size // MB} MB, 1 stream"))
    cases.append(_pair("wg.cpu_per_gb", "CPU seconds per GB", cpu, "s/GB", higher=False,
                       note="client process utime+stime over every transfer above"))
    return cases


def streams_case(cl: Clients, size: int, runs: int, streams: int = 8) -> Case:
    from tsproxy.testing.wgpeer import PEER_IP4
    each = max(size // streams, 1)

    def fn_for(who):
        args = ["--socks5-hostname", f"127.0.0.1:{cl.proxy[who]}", f"http://{PEER_IP4}/bytes/{each}"]
        return lambda: parallel_rate([args] * streams, ns=cl.ns[who], expect_bytes=each)
    out = alternate({TSP: fn_for(TSP), SB: fn_for(SB)}, runs)
    return _pair("wg.streams8", f"{streams} parallel streams (socks5)", out, "MB/s",
                 target=Target(">=", 1.0, "wg.socks5.do", "single stream"),
                 note=f"aggregate, {streams} x {each / MB:g} MB")


def conn_cases(cl: Clients, conns: int, runs: int) -> list[Case]:
    from tsproxy.testing.wgpeer import PEER_IP4
    cases = []
    for c in (1, 50):
        out = alternate({w: (lambda w=w: conn_rate(cl.proxy[w], conns, c, PEER_IP4, 7, ns=cl.ns[w]))
                         for w in (TSP, SB)}, runs)
        note = f"{conns} SOCKS5 CONNECTs + 1-byte echo"
        cases += [
            _pair(f"wg.conn.c{c}", f"conn/s c={c}", out, "conn/s", pick=lambda r: r["rate"],
                  target=Target(">=", 1.0, label="sing-box"), note=note),
            _pair(f"wg.conn.c{c}.p50", f"latency p50 c={c}", out, "ms", pick=lambda r: r["p50"],
                  higher=False),
            _pair(f"wg.conn.c{c}.p99", f"latency p99 c={c}", out, "ms", pick=lambda r: r["p99"],
                  higher=False, target=Target("<=", 1.5, label="sing-box")),
        ]
    return cases


def loss_case(cl: Clients, size: int, runs: int, permille: int = 10) -> Case:
    from tsproxy.testing import impair
    from tsproxy.testing.wgpeer import PEER_IP4, WG_PORT

    def fn_for(who):
        args = ["--socks5-hostname", f"127.0.0.1:{cl.proxy[who]}", f"http://{PEER_IP4}/bytes/{size}"]
        return lambda: curl_rate(args, ns=cl.ns[who], expect_bytes=size)
    impair.set_loss(cl.peer, permille, WG_PORT)
    try:
        out = alternate({TSP: fn_for(TSP), SB: fn_for(SB)}, runs)
        dropped = impair.loss_counters(cl.peer)
    finally:
        impair.clear_loss(cl.peer)
    return _pair("wg.loss1", f"socks5 download, {permille / 10:g}% loss", out, "MB/s",
                 target=Target(">=", 0.8, label="sing-box"),
                 note=f"{size // MB} MB; {dropped} datagrams dropped at the peer")


def run(groups: set[str], cases: list[Case], *, size: int, runs: int, conns: int, idle: int,
        log=print) -> None:
    """Set up the peer, sing-box and tsproxy, append the selected groups' cases to `cases`
    (a group that fails leaves a failed row and the others still run), tear everything down."""
    from tests.conftest import Daemon, free_port
    from tsproxy.testing.wgpeer import PEER_IP4
    work = tempfile.mkdtemp(prefix="tsp-bench-wg-")
    upfile = os.path.join(work, "up.bin")
    steps = {
        "wg-rss": ("RSS idle and with idle connections", lambda cl: rss_cases(cl, idle)),
        "wg-transfer": (f"single-stream transfers, {size // MB} MB x {runs} runs each",
                        lambda cl: transfer_cases(cl, size, runs, write_pattern_file(upfile, size))),
        "wg-streams": ("8 parallel streams", lambda cl: [streams_case(cl, size, runs)]),
        "wg-conn": (f"connections per second ({conns} per run)", lambda cl: conn_cases(cl, conns, runs)),
        "wg-loss": ("1% loss", lambda cl: [loss_case(cl, max(size // 4, MB), runs)]),
    }
    todo = [g for g in GROUPS if g in groups]
    try:
        with reference_env(os.path.join(work, "peer")) as (peer, ref):
            socks, fwd = free_port(), free_port()
            d = Daemon(os.path.join(work, "tsp"), [
                "--wg-config", peer.write_client_conf(), "--listen", f"127.0.0.1:{socks}",
                "--forward", f"{fwd}:{PEER_IP4}:80"]).start(timeout=60)
            try:
                cl = Clients(peer, ref, d, socks, fwd)
                while todo:
                    g = todo[0]
                    what, fn = steps[g]
                    log(f"wg: {what}")
                    try:
                        cases += fn(cl)
                    except Exception as e:                   # noqa: BLE001 - reported as MISS
                        log(f"wg: {g} failed: {e}")
                        cases.append(failure_case(f"wg.{g}", GROUP, g, e, TSP, SB))
                    todo.pop(0)
            finally:
                d.stop()
    except Exception as e:                                   # noqa: BLE001 - setup failed
        log(f"wg: setup failed: {e}")
        cases += [failure_case(f"wg.{g}", GROUP, g, e, TSP, SB) for g in todo]
    finally:
        subprocess.run(["rm", "-rf", work], check=False)
