"""The real tailscaled (1.96.4) as an exit node and a subnet router for tsproxy (issue #13).

    root ns: tsproxy daemons, control + DERP ── veth ── tsd ns: tailscaled (userspace
    networking, --advertise-exit-node, --advertise-routes 198.51.100.0/24) ── veth ── far ns:
    a page on 198.51.100.10:80 and a DNS server answering page.exit.test -> 198.51.100.10

The far namespace is reachable only from tailscaled's namespace (whose resolv.conf names the far
DNS server, so the exit node's DoH answers from it), and the root namespace has a blackhole
route for 198.51.100.0/24: a dial from the host fails locally and never leaves the machine, so
a page seen through tsproxy came through tailscaled.  The control server approves the routes
(set_routes: the subnet, 0.0.0.0/0 and ::/0).  The last test stops tailscaled.
"""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status, socks_curl
from tsproxy.testing.peers import require

pytestmark = [pytest.mark.timeout(600)]
SUBNET = "198.51.100.0/24"
FAR_IP = "198.51.100.10"
FAR_NAME = "page.exit.test"
PAGE = "hello from far\n"


def http_curl(port: int, url: str, timeout: float = 20):
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), "-x", f"http://127.0.0.1:{port}",
                           "-w", "\n%{http_code}", url], capture_output=True, text=True,
                          timeout=timeout + 5)


def tsproxy_cli(daemon, *args):
    return subprocess.run([sys.executable, "-m", "tsproxy", *args, "--state-dir", daemon.state_dir],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.fixture(scope="module")
def blackhole():
    subprocess.run(["ip", "route", "add", "blackhole", SUBNET], check=True)
    try:
        got = subprocess.run(["ip", "route", "show", SUBNET], capture_output=True, text=True).stdout
        assert got.startswith("blackhole"), got
        yield
    finally:
        subprocess.run(["ip", "route", "del", "blackhole", SUBNET], check=False)


@pytest.fixture(scope="module")
def far(go_ns, blackhole):
    """The far namespace behind tailscaled's: page + DNS on 198.51.100.10."""
    from tsproxy.testing.netns import Namespace, veth_between
    ns = Namespace("tsfar")
    try:
        _, far_if, tsd_side, far_side = veth_between(go_ns, ns)
        ns.exec(["ip", "addr", "add", f"{FAR_IP}/32", "dev", "lo"])
        go_ns.exec(["ip", "route", "add", SUBNET, "via", str(far_side)])
        ns.assert_no_default_route()
        go_ns.assert_no_default_route()
        ns.spawn([sys.executable, "-m", "tsproxy.testing.servers", "--bind", FAR_IP, "--name", "far",
                  "--dns", f"{FAR_NAME}={FAR_IP}"], log_path=os.path.join(ns.etc, "servers.log"),
                 env={"PYTHONPATH": REPO})
        eventually(lambda: go_ns.exec(["curl", "-sS", "--max-time", "2", f"http://{FAR_IP}/"],
                                      check=False).stdout == PAGE, 30, "far page from tsd's ns")
        # tailscaled answers DoH from /etc/resolv.conf's first nameserver (Go stubResolverForOS);
        # `ip netns exec` mounts this file over /etc/resolv.conf for everything it starts
        with open(os.path.join(go_ns.etc, "resolv.conf"), "w") as f:
            f.write(f"nameserver {FAR_IP}\n")
        yield ns
    finally:
        with open(os.path.join(go_ns.etc, "resolv.conf"), "w") as f:
            f.write("nameserver 127.0.0.1\n")
        go_ns.exec(["ip", "route", "del", SUBNET], check=False)
        ns.close()


@pytest.fixture(scope="module")
def tsd(go_ns, tailnet, far):
    require("tailscaled", "tailscale", "curl", "setpriv")
    from tsproxy.testing.tailscaled import Tailscaled
    node = Tailscaled(go_ns, control_url=tailnet.control_url, auth_key=tailnet.auth_key,
                      hostname="tsd")
    node.start()
    try:
        n = node.join(tailnet)
        r = node.cli("set", "--advertise-exit-node", f"--advertise-routes={SUBNET}")
        assert r.returncode == 0, (r.stdout, r.stderr)
        # what tailscaled asked for, as its Hostinfo tells the control server
        hi = tailnet.wait(lambda: (h := tailnet.control.node("tsd").hostinfo).get("RoutableIPs")
                          and h, 30, "tsd advertises routes")
        assert sorted(hi["RoutableIPs"]) == sorted(["0.0.0.0/0", "::/0", SUBNET]), hi
        assert any(s.get("Proto") == "peerapi4" for s in hi.get("Services") or []), hi
        tailnet.call(tailnet.control.set_routes, n.id, [SUBNET, "0.0.0.0/0", "::/0"])
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def exit_tsp(tailnet, tsd, tmp_path_factory):
    """tsproxy with --exit-node tsd (and --non-tailnet refuse: nothing direct)."""
    port = free_port()
    d = Daemon(str(tmp_path_factory.mktemp("tsp-exit")),
               ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                "--hostname", "tsp-exit", "--listen", f"127.0.0.1:{port}", "--exit-node", "tsd"])
    d.proxy_port = port
    d.start(timeout=60)
    try:
        eventually(lambda: ((d.status().get("routing") or {}).get("exit_node") or {}).get("usable"),
                   60, "exit node tsd usable")
        yield d
    finally:
        d.stop()


def test_page_by_address_and_name_through_the_exit_node(exit_tsp):
    d = exit_tsp
    before = d.counters()
    for url in (f"http://{FAR_IP}/", f"http://{FAR_NAME}/"):
        r = eventually(lambda: (lambda r: r if r.stdout == PAGE else None)(
            socks_curl(d.proxy_port, url, timeout=10)), 60, f"SOCKS5 {url} via tsd")
        r = http_curl(d.proxy_port, url)
        assert r.stdout == PAGE + "\n200", (url, r.stdout, r.stderr)
    c = d.counters()
    assert c["dialer.dial_exit"] >= before["dialer.dial_exit"] + 4, c
    assert c["dialer.exit_dns_lookups"] > before["dialer.exit_dns_lookups"]
    assert c["dialer.dial_direct"] == 0 and c["dialer.host_resolve"] == 0
    p = peer_status(d, "tsd")
    assert "0.0.0.0/0" in p["routes"] and "::/0" in p["routes"], p
    assert SUBNET not in p["routes"], p                    # no --accept-routes here
    st = tsproxy_cli(d, "status")
    assert st.returncode == 0 and "exit node: tsd (100." in st.stdout and " in use" in st.stdout, st
    pac = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{d.proxy_port}/proxy.pac"],
                         capture_output=True, text=True, timeout=10).stdout
    assert pac.rstrip().endswith("return P;\n}"), pac


def test_udp_through_the_exit_node(exit_tsp):
    """A UDP forward to the far DNS server: datagrams go through the exit node too."""
    import socket

    from tsproxy.dns import message
    d = exit_tsp
    port = free_port()
    r = tsproxy_cli(d, "forward", f"udp:{port}:{FAR_IP}:53")
    assert r.returncode == 0, r.stderr
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)

            def ask():
                s.sendto(message.build_query(0x4242, FAR_NAME, message.TYPE_A), ("127.0.0.1", port))
                try:
                    return message.parse_response(s.recv(1500))
                except (TimeoutError, OSError):
                    return None
            rid, rcode, _, answers = eventually(ask, 30, "a DNS answer over UDP via tsd")
        assert rid == 0x4242 and rcode == 0
        assert [str(a[3]) for a in answers] == [FAR_IP]
    finally:
        tsproxy_cli(d, "forward", "--remove", f"udp:{port}")
    c = d.counters()
    assert c["dialer.dial_direct"] == 0 and c["dialer.host_resolve"] == 0


def test_exit_node_switched_off_at_runtime_fails_clearly(exit_tsp):
    d = exit_tsp
    r = tsproxy_cli(d, "set", "--exit-node", "")
    assert r.returncode == 0 and "exit node: none" in r.stdout, (r.stdout, r.stderr)
    try:
        p = peer_status(d, "tsd")
        assert "0.0.0.0/0" not in p["routes"], p          # WireGuard no longer routes it there
        r = socks_curl(d.proxy_port, f"http://{FAR_IP}/", timeout=10)
        assert r.returncode != 0 and r.stderr.rstrip().endswith("(2)"), r.stderr   # SOCKS 0x02
        r = http_curl(d.proxy_port, f"http://{FAR_NAME}/")
        assert r.stdout.endswith("403"), r.stdout
        assert "not on the tunnel and --non-tailnet is refuse" in r.stdout, r.stdout
        st = tsproxy_cli(d, "status")
        assert "exit node: none" in st.stdout, st.stdout
    finally:
        r = tsproxy_cli(d, "set", "--exit-node", "tsd")
        assert r.returncode == 0 and "in use" in r.stdout, (r.stdout, r.stderr)
    r = eventually(lambda: (lambda r: r if r.stdout == PAGE else None)(
        socks_curl(d.proxy_port, f"http://{FAR_NAME}/", timeout=10)), 30, "exit node back")


def test_switching_off_resets_a_download_in_flight(exit_tsp, tmp_path):
    """A connection through the exit node is reset when it stops being used, not left to stall."""
    d = exit_tsp
    out = tmp_path / "drip"
    before = d.counters().get("routing.rerouted_reset", 0)
    proc = subprocess.Popen(["curl", "-sS", "--max-time", "90", "-o", str(out), "--socks5-hostname",
                             f"127.0.0.1:{d.proxy_port}", f"http://{FAR_NAME}/drip/4000000/60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        eventually(lambda: out.exists() and out.stat().st_size > 0, 30, "download under way")
        r = tsproxy_cli(d, "set", "--exit-node", "")
        assert r.returncode == 0, r.stderr
        _, err = proc.communicate(timeout=60)
        assert proc.returncode not in (0, 28), (proc.returncode, err)    # reset, not a timeout
        assert out.stat().st_size < 4000000
        assert d.counters()["routing.rerouted_reset"] >= before + 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        tsproxy_cli(d, "set", "--exit-node", "tsd")


def test_unknown_exit_node_fails_closed(exit_tsp):
    d = exit_tsp
    r = tsproxy_cli(d, "set", "--exit-node", "nosuch")
    try:
        assert r.returncode == 0 and "NOT usable" in r.stdout, r.stdout
        assert "not in the tailnet" in r.stderr, r.stderr
        r = http_curl(d.proxy_port, f"http://{FAR_IP}/")
        assert r.stdout.endswith("502") and "exit node 'nosuch' is not in the tailnet" in r.stdout, r.stdout
        r = socks_curl(d.proxy_port, f"http://{FAR_NAME}/", timeout=10)
        assert r.returncode != 0 and r.stderr.rstrip().endswith("(4)"), r.stderr   # host unreachable
        assert d.counters()["dialer.dial_direct"] == 0
    finally:
        tsproxy_cli(d, "set", "--exit-node", "tsd")


def test_subnet_route_only_with_accept_routes(tailnet, tsd, exit_tsp, tmp_path):
    port = free_port()
    d = Daemon(str(tmp_path / "tsp-routes"),
               ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                "--hostname", "tsp-routes", "--listen", f"127.0.0.1:{port}", "--accept-routes"])
    d.start(timeout=60)
    try:
        eventually(lambda: (p := peer_status(d, "tsd")) and SUBNET in p["routes"], 60,
                   "tsd's subnet in our WireGuard routes")
        assert "0.0.0.0/0" not in peer_status(d, "tsd")["routes"]      # not selected
        r = eventually(lambda: (lambda r: r if r.stdout == PAGE else None)(
            socks_curl(port, f"http://{FAR_IP}/", timeout=10)), 60, "page over the subnet route")
        assert http_curl(port, f"http://{FAR_IP}/").stdout == PAGE + "\n200"
        c = d.counters()
        assert c["dialer.dial_subnet"] >= 2 and c["dialer.dial_direct"] == 0, c
        assert f"{SUBNET} via tsd" in tsproxy_cli(d, "status").stdout
        # without accept-routes (switched off at runtime) the same request is refused
        r = tsproxy_cli(d, "set", "--accept-routes", "false")
        assert r.returncode == 0 and "not accepting subnet routes" in r.stdout, r.stdout
        assert SUBNET not in peer_status(d, "tsd")["routes"]
        r = socks_curl(port, f"http://{FAR_IP}/", timeout=10)
        assert r.returncode != 0 and r.stdout == "", (r.stdout, r.stderr)
    finally:
        d.stop()
    # and a daemon started without --accept-routes never reaches it (exit node cleared)
    r = tsproxy_cli(exit_tsp, "set", "--exit-node", "")
    try:
        assert SUBNET not in peer_status(exit_tsp, "tsd")["routes"]
        r = socks_curl(exit_tsp.proxy_port, f"http://{FAR_IP}/", timeout=10)
        assert r.returncode != 0 and r.stdout == "", (r.stdout, r.stderr)
    finally:
        tsproxy_cli(exit_tsp, "set", "--exit-node", "tsd")


def test_exit_node_going_away_fails_closed(tailnet, tsd, exit_tsp):
    """Last in the module: it stops the shared tailscaled."""
    d = exit_tsp
    eventually(lambda: socks_curl(d.proxy_port, f"http://{FAR_IP}/", timeout=10).stdout == PAGE,
               30, "exit node working before it stops")
    tsd.stop()
    eventually(lambda: (lambda ex: ex and not ex["usable"] and "offline" in (ex["problem"] or ""))(
        (d.status().get("routing") or {}).get("exit_node")), 60, "exit node seen offline")
    r = http_curl(d.proxy_port, f"http://{FAR_IP}/")
    assert r.stdout.endswith("502") and "exit node tsd is offline" in r.stdout, r.stdout
    r = socks_curl(d.proxy_port, f"http://{FAR_NAME}/", timeout=10)
    assert r.returncode != 0 and r.stderr.rstrip().endswith("(4)"), r.stderr   # host unreachable
    assert "0.0.0.0/0" not in peer_status(d, "tsd")["routes"]
    c = d.counters()
    assert c["dialer.dial_direct"] == 0 and c["dialer.host_resolve"] == 0, c
