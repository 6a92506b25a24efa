#!/usr/bin/env python3
"""Soak (issue 12 item 5): mixed traffic through one tsproxy daemon for --minutes across several
WireGuard rekeys, in plain WireGuard mode against the wireguard-go peer.

    .venv/bin/python bench/bench_soak.py --minutes 10            # rekey every 30 s
    .venv/bin/python bench/bench_soak.py --minutes 10 --rekey-after 0   # protocol's 120 s
    .venv/bin/python bench/bench_soak.py --minutes 3 --trace     # what happened at each stall

Traffic (tsproxy.testing.soak): bulk downloads (20 MB each, again and again, SOCKS5 and HTTP),
many short connections (1 kB; SOCKS5 by name `peer.tunnel.test`, resolved by the daemon through
the tunnel's DNS server, HTTP GET and CONNECT), UDP datagrams to the peer's echo server and DNS
queries to its DNS server through UDP forwards.  Every transfer is checked (length + sha256).
`--rekey-after S` runs the daemon through tsproxy.testing.fastrekey (REKEY_AFTER_TIME = S).

Reports: transfers ok/failed (with errors), the longest gap between two chunks of any transfer
(goal < 1 s), the longest wait for a first byte and the longest connect through the proxy, UDP
answers lost, rekeys (completed handshakes), RSS over time (goal: flat), fds and asyncio tasks,
drops on tsproxy's UDP socket, the soak client's own CPU and longest loop lag.

`--trace`: the daemon records loop lag, GC pauses, handshakes and RTOs (tsproxy.testing.soaktrace),
the peer namespace's TCP/UDP counters and TUN drops are sampled every 0.25 s, and each stall over
0.4 s (and each UDP answer lost) is printed with what was recorded around it.
Writes bench/results/soak-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS_DIR, _git_commit  # noqa: E402
from tests.conftest import Daemon, free_port  # noqa: E402
from tsproxy.testing import loadgen, soak  # noqa: E402
from tsproxy.testing.wgpeer import PEER_IP4, WireGuardPeer  # noqa: E402


def sampler(d: Daemon, udp_port: int):
    def sample() -> dict:
        st = d.status()
        pid = st["pid"]
        return {"rss_MB": round(loadgen.proc_rss(pid) / 1e6, 1), "fds": loadgen.proc_fds(pid),
                "tasks": st["process"]["asyncio_tasks"],
                "handshakes": sum(p.get("handshakes", 0) for p in st["peers"]),
                "rto": st["counters"].get("netstack.tcp_rto", 0),
                "socket_drops": loadgen.udp_socket_drops(udp_port)}
    return sample


_PEER_KEYS = {"Tcp": ("RetransSegs",), "Udp": ("RcvbufErrors", "InErrors", "SndbufErrors"),
              "TcpExt": ("TCPTimeouts", "TCPLossProbes", "TCPSackRecovery", "TCPFastRetrans",
                         "TCPSlowStartRetrans", "TCPLostRetransmit", "TCPSpuriousRTOs",
                         "TCPZeroWindowDrop", "TCPWinProbe", "ListenOverflows", "ListenDrops",
                         "TCPBacklogDrop", "TCPRcvQDrop", "TCPDelivered")}


def _peer_counters(peer: WireGuardPeer) -> dict:
    """TCP/UDP counters of the peer's namespace (its Linux TCP behind wireguard-go)."""
    stats = [f"/sys/class/net/{i}/statistics/{k}" for i in (peer.ifname, peer.ns_if)
             for k in ("rx_dropped", "tx_dropped")]
    text = peer.exec(["cat", "/proc/net/snmp", "/proc/net/netstat", *stats],
                     check=False).stdout.splitlines()
    out = {f"{path.split('/')[4]}.{path.split('/')[6]}": int(v) for path, v in zip(stats, text[-4:])}
    text = text[:-4]
    out.update(_snmp(text))
    return out


def _snmp(text: list[str]) -> dict:
    out = {}
    for head, vals in zip(text[::2], text[1::2]):
        proto, names = head.split(":", 1)
        for k, v in zip(names.split(), vals.split(":", 1)[1].split()):
            if k in _PEER_KEYS.get(proto, ()):
                out[f"{proto}.{k}"] = int(v)
    return out


def peer_tracer(peer: WireGuardPeer, path: str, stop: threading.Event) -> threading.Thread:
    """Every 0.25 s: the peer namespace's counter deltas and its TCP sockets in RTO backoff
    (ss -tin), one JSON line each, on time.monotonic() like the daemon's trace."""
    def run():
        last = _peer_counters(peer)
        with open(path, "a") as f:
            while not stop.wait(0.25):
                t = round(time.monotonic(), 4)
                now = _peer_counters(peer)
                with open("/proc/net/snmp") as g:      # ours: the loopback UDP forwards' sockets
                    now.update({"root." + k: v for k, v in _snmp(g.read().splitlines()).items()})
                d = {k: v - last.get(k, 0) for k, v in now.items() if v != last.get(k, 0)}
                last = now
                if d:
                    f.write(json.dumps({"t": t, "ev": "peer_ctr", "d": d}) + "\n")
                ss = peer.exec(["ss", "-tinH", "state", "established"], check=False).stdout.split("\n")
                for conn, info in zip(ss[::2], ss[1::2]):
                    if "backoff:" in info or "lost:" in info:
                        f.write(json.dumps({"t": t, "ev": "peer_ss", "conn": " ".join(conn.split()[2:4]),
                                            "info": info.strip()[:400]}) + "\n")
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


_ROUTINE = re.compile(r"rx_data|tx_data|rx_datagrams|rx_packets|tx_packets|bytes|segments|"
                      r"accepted|opened|closed|connections|requests|recv_calls|send_calls|batches|"
                      r"_ok$|queries|lookups|answers|Delivered|gso_sends")


def peer_totals(path: str) -> dict:
    tot: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                for k, v in e.get("d", {}).items():
                    tot[k] = tot.get(k, 0) + v
    return tot


def correlate(rep: dict, trace_paths: list[str], over: float = 0.4) -> list[dict]:
    """For each client event over `over` s (a gap, a slow connect or UDP answer) and each UDP
    answer lost, what the daemon, the peer namespace and the soak client's own loop recorded
    from 0.3 s before it began to 0.1 s after it ended (dt: seconds from its start)."""
    trace = [dict(e, ev="client_lag") for e in rep["events"] if e["ev"] == "client_lag"]
    for p in trace_paths:
        if os.path.exists(p):
            with open(p) as f:
                trace += [json.loads(line) for line in f if line.strip()]
    trace.sort(key=lambda e: e["t"])
    out = []
    for ev in rep["events"]:
        kind, s = ev["ev"], ev.get("s", 0.0)
        if kind.endswith("_lost"):
            s = 2.0                                      # the wait for an answer
        elif kind == "client_lag" or s < over:
            continue
        start = ev["t"] - s if kind in ("gap", "connect", "first_byte") else ev["t"]
        near = [dict(e, dt=round(e["t"] - start, 3)) for e in trace
                if start - 0.3 <= e["t"] <= start + s + 0.1]
        out.append({"event": dict(ev, start=start), "trace": near})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rekey-after", type=float, default=30.0,
                    help="seconds between rekeys (0: the protocol's 120 s)")
    ap.add_argument("--bulk", type=int, default=4)
    ap.add_argument("--bulk-mb", type=int, default=20)
    ap.add_argument("--short", type=int, default=6)
    ap.add_argument("--trace", action="store_true",
                    help="trace the daemon (tsproxy.testing.soaktrace) and the peer namespace, and "
                         "list what happened around every gap over 0.8 s")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("benches need root (network namespaces)")
    work = tempfile.mkdtemp(prefix="tsp-bench-soak-")
    peer = WireGuardPeer(os.path.join(work, "wgpeer")).start()
    port, echo, dns = free_port(), free_port(), free_port()
    d = Daemon(os.path.join(work, "daemon"), [
        "--wg-config", peer.write_client_conf(dns=True), "--listen", f"127.0.0.1:{port}",
        "--forward", f"udp:{echo}:{PEER_IP4}:7", "--forward", f"udp:{dns}:{PEER_IP4}:53"])
    d.entry = ["-m", "tsproxy.testing.fastrekey", str(a.rekey_after or 120)]
    traces = [os.path.join(work, "daemon-trace.jsonl"), os.path.join(work, "peer-trace.jsonl")]
    stop_trace = threading.Event()
    if a.trace:
        os.environ["TSPROXY_SOAK_TRACE"] = traces[0]
    try:
        d.start(timeout=60)
        if a.trace:
            peer_tracer(peer, traces[1], stop_trace)
        udp_port = d.status()["wireguard_port"]
        sample = sampler(d, udp_port)
        rep = asyncio.run(soak.run(proxy_port=port, host=PEER_IP4, seconds=a.minutes * 60,
                                   bulk=a.bulk, bulk_size=a.bulk_mb * 1_000_000, short=a.short,
                                   short_host="peer.tunnel.test", echo_port=echo, dns_port=dns,
                                   sample=sample, every=10.0))
        final = sample()
    finally:
        stop_trace.set()
        d.stop()
        peer.stop()
    s = rep["samples"]
    warm = next((x for x in s if x["t"] >= 60), s[0])
    rss = [x["rss_MB"] for x in s]
    rep.update({
        "rekeys": s[-1]["handshakes"] - s[0]["handshakes"], "final": final,
        "rss_MB_first_minute": warm["rss_MB"], "rss_MB_last": s[-1]["rss_MB"], "rss_MB_max": max(rss),
        "socket_drops": s[-1]["socket_drops"] - s[0]["socket_drops"], "rto": s[-1]["rto"] - s[0]["rto"]})
    print(f"soak {a.minutes:g} min, rekey every {a.rekey_after or 120:g} s, "
          f"{a.bulk} bulk x {a.bulk_mb} MB + {a.short} short workers + UDP echo/DNS")
    print(f"  transfers: bulk {rep['bulk_ok']} ok, short {rep['short_ok']} ok, {rep['failed']} failed"
          f"{': ' + str(rep['failures'][:5]) if rep['failed'] else ''}")
    print(f"  bulk bytes {rep['bulk_bytes'] / 1e6:.0f} MB ({rep['bulk_bytes'] / 1e6 / rep['seconds']:.1f} MB/s)")
    print(f"  longest gap between chunks {rep['max_gap_s']:.2f} s (at {rep['max_gap_at_s']} s), "
          f"longest first byte {rep['max_first_byte_s']:.2f} s, "
          f"longest connect through the proxy {rep['max_connect_s']:.2f} s")
    print(f"  UDP echo {rep['udp_echo_ok']}/{rep['udp_echo_sent']} ok ({rep['udp_echo_lost']} lost), "
          f"DNS {rep['udp_dns_ok']}/{rep['udp_dns_sent']} ok ({rep['udp_dns_lost']} lost), "
          f"max RTT {rep['udp_max_rtt_s']:.2f} s")
    print(f"  rekeys (handshakes completed) {rep['rekeys']}, RTOs {rep['rto']}, "
          f"tsproxy socket drops {rep['socket_drops']}")
    print(f"  RSS MB: after 1 min {rep['rss_MB_first_minute']}, last {rep['rss_MB_last']}, "
          f"max {rep['rss_MB_max']}; fds {s[0]['fds']} -> {final['fds']}, tasks {s[0]['tasks']} -> {final['tasks']}")
    print("  RSS over time (s: MB): " + ", ".join(f"{x['t']:.0f}: {x['rss_MB']}" for x in s[::3]))
    print(f"  soak client: longest loop lag {rep.get('client_max_lag_s', 0):.2f} s, "
          f"CPU {rep['client_cpu_s'] / rep['seconds']:.0%} of a core")
    if a.trace:
        rep["correlated"] = correlate(rep, traces)
        for c in rep["correlated"]:
            ev = c["event"]
            print(f"  {ev['ev']} {ev.get('s', 0):.2f} s ({ev.get('via', '')}, "
                  f"from t={ev['start'] - rep['t0_monotonic']:.1f}):")
            for e in c["trace"]:
                if e["ev"] in ("ctr", "peer_ctr"):
                    e = dict(e, d={k: v for k, v in e["d"].items() if not _ROUTINE.search(k)})
                    if not e["d"]:
                        continue
                print(f"      {e['dt']:+.2f} {json.dumps({k: v for k, v in e.items() if k not in ('t', 'dt')})[:300]}")
        rep["peer_totals"] = peer_totals(traces[1])
        print(f"  peer namespace: {rep['peer_totals']}")
        print(f"  traces: {' '.join(traces)}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS_DIR, f"soak-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"bench": "soak", "utc": stamp, "commit": _git_commit(), "cpus": os.cpu_count(),
                   "loadavg": os.getloadavg(), "args": vars(a), **rep}, f, indent=1)
    print(f"wrote {path}")
    return 1 if rep["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
