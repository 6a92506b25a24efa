"""The real tailscaled (1.96.4, capability version 133) and tsproxy on a tailnet run by our test
control server (plain HTTP here; test_tls_tailnet.py covers HTTPS control and a verified relay),
reaching each other both ways, first over DERP only (UDP blocked in tailscaled's namespace),
then over the direct UDP path disco finds once UDP is open:

- tsproxy -> tailscaled: a page served on 127.0.0.1 inside tailscaled's namespace, which
  tailscaled's userspace netstack forwards incoming tailnet connections to;
- tailscaled -> tsproxy: tailscaled's own SOCKS5 proxy (`--socks5-server`) fetches tsproxy's
  reverse forward.

tailscaled runs unprivileged (nobody), with its own HOME and --no-logs-no-support, in a
namespace with no route out (tsproxy/testing/tailscaled.py)."""

import json
import os
import shutil
import sys
import tempfile

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import eventually, path_of, peer_status, socks_curl, start_page_server
from tsproxy.testing.peers import require

pytestmark = [pytest.mark.timeout(600)]
TSP_PAGE = "hello from tsp-b\n"               # tests.tailnet_helpers' page server on /
TSD_PAGE = "hello from tailscaled's side\n"
TSD_PORT = 8099                               # the page server inside tailscaled's namespace
BIG = 300_000                                 # a file spanning many packets, both directions


@pytest.fixture(scope="module")
def local_page():
    srv = start_page_server()
    yield srv.server_address[1]
    srv.shutdown()


@pytest.fixture(scope="module")
def tsp(tailnet, local_page, tmp_path_factory):
    port = free_port()
    d = Daemon(str(tmp_path_factory.mktemp("tsp")),
               ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                "--hostname", "tsp-io", "--listen", f"127.0.0.1:{port}",
                "--reverse", f"8080:127.0.0.1:{local_page}"])
    d.proxy_port = port
    d.start(timeout=60)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def tsd_page(go_ns):
    """A plain HTTP server on 127.0.0.1:TSD_PORT inside tailscaled's namespace."""
    root = tempfile.mkdtemp(prefix="tsp-tsd-page-")
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write(TSD_PAGE)
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(bytes(i % 251 for i in range(BIG)))
    proc = go_ns.spawn([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                        "--directory", root, str(TSD_PORT)])
    eventually(lambda: go_ns.exec(["curl", "-sS", "--max-time", "2",
                                   f"http://127.0.0.1:{TSD_PORT}/"], check=False).stdout
               == TSD_PAGE, 20, "page server in the namespace")
    try:
        yield TSD_PORT
    finally:
        from tsproxy.testing.netns import stop_group
        stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tsd(go_ns, tailnet, tsp, tsd_page):
    require("tailscaled", "tailscale", "curl", "nft", "setpriv")
    from tsproxy.testing.tailscaled import Tailscaled
    from tsproxy.testing.tsgo import block_udp, unblock_udp
    block_udp(go_ns)                          # DERP first: the only way until the test opens UDP
    node = Tailscaled(go_ns, control_url=tailnet.control_url, auth_key=tailnet.auth_key,
                      hostname="tsd-io")
    try:
        node.start()
        node.join(tailnet)
        yield node
    finally:
        unblock_udp(go_ns)
        node.stop()


def tsd_status(node) -> dict:
    r = node.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def tsd_peer(node, hostname: str) -> dict | None:
    for p in (tsd_status(node).get("Peer") or {}).values():
        if p.get("HostName") == hostname:
            return p
    return None


def fetch_from_tsd(tsp, path: str = "/"):
    return socks_curl(tsp.proxy_port, f"http://tsd-io:{TSD_PORT}{path}", timeout=10)


def test_tailscaled_registers_with_our_control_and_runs(tsd, tsp, tailnet):
    st = tsd_status(tsd)
    assert st["BackendState"] == "Running", st.get("BackendState")
    assert st["Self"]["HostName"] == "tsd-io"
    assert st["Self"]["TailscaleIPs"][0].startswith("100.64.")
    n = tailnet.node("tsd-io")
    assert n.cap >= 133, n.cap                 # tailscaled 1.96 speaks capability version 133
    assert n.home_derp == 900
    # each sees the other in its netmap
    eventually(lambda: peer_status(tsp, "tsd-io"), 30, "tailscaled in tsproxy's netmap")
    eventually(lambda: tsd_peer(tsd, "tsp-io"), 30, "tsproxy in tailscaled's netmap")


def test_both_ways_over_derp_only(tsd, tsp, tailnet):
    # tsproxy -> a page on tailscaled's side (its netstack forwards to the namespace's loopback)
    eventually(lambda: fetch_from_tsd(tsp).stdout == TSD_PAGE, 90, "tsproxy -> tailscaled")
    r = socks_curl(tsp.proxy_port, f"http://tsd-io.tailnet.test:{TSD_PORT}/big.bin",
                   "-o", "/dev/null", "-w", "%{size_download}", timeout=30)
    assert r.stdout == str(BIG), (r.stdout, r.stderr)
    assert path_of(tsp, "tsd-io").startswith("derp"), peer_status(tsp, "tsd-io")
    # tailscaled's SOCKS5 proxy -> tsproxy's reverse forward
    me = tsp.status()["addresses"][0]
    eventually(lambda: tsd.curl(f"http://{me}:8080/", timeout=10).stdout == TSP_PAGE, 60,
               "tailscaled -> tsproxy reverse forward")
    big = tsd.curl(f"http://tsp-io.tailnet.test:8080/bytes/{BIG}", "-o", "/dev/null",
                   "-w", "%{size_download}", timeout=30)
    assert big.stdout == str(BIG), (big.stdout, big.stderr)
    p = peer_status(tsp, "tsd-io")
    assert p["path"].startswith("derp") and p["handshakes"] >= 1, p
    assert not (tsd_peer(tsd, "tsp-io") or {}).get("CurAddr")      # tailscaled: relayed too
    assert tailnet.call(lambda: tailnet.derps[0].counters["packets_forwarded"]) > 0


def test_both_ways_over_the_direct_path(tsd, tsp, go_ns):
    from tsproxy.testing.tsgo import unblock_udp
    unblock_udp(go_ns)

    def direct():
        fetch_from_tsd(tsp)
        return path_of(tsp, "tsd-io").startswith("direct")
    eventually(direct, 90, "tsproxy's direct path to tailscaled")
    assert go_ns.ns_ip in path_of(tsp, "tsd-io")
    eventually(lambda: (tsd_peer(tsd, "tsp-io") or {}).get("CurAddr"), 60,
               "tailscaled's direct path to tsproxy")
    before = peer_status(tsp, "tsd-io")
    assert fetch_from_tsd(tsp).stdout == TSD_PAGE
    r = socks_curl(tsp.proxy_port, f"http://tsd-io:{TSD_PORT}/big.bin", "-o", "/dev/null",
                   "-w", "%{size_download}", timeout=30)
    assert r.stdout == str(BIG), (r.stdout, r.stderr)
    me = tsp.status()["addresses"][0]
    assert tsd.curl(f"http://{me}:8080/", timeout=10).stdout == TSP_PAGE
    big = tsd.curl(f"http://tsp-io:8080/bytes/{BIG}", "-o", "/dev/null",
                   "-w", "%{size_download}", timeout=30)
    assert big.stdout == str(BIG), (big.stdout, big.stderr)
    after = peer_status(tsp, "tsd-io")
    assert after["path"].startswith("direct"), after
    assert after["rx_bytes"] - before["rx_bytes"] >= BIG        # the file came over this path


def test_tailscaled_advertises_routes_our_control_approves_and_tsproxy_sees(tsd, tsp, tailnet):
    """The control server's route handling against the real client: Hostinfo.RoutableIPs
    arrives, nothing happens until approval, then the subnet is tailscaled's primary route
    and the /0s make it an exit node in tsproxy's netmap; Hostinfo services (peer API ports)
    pass through."""
    subnet = "198.51.100.0/24"
    r = tsd.cli("set", f"--advertise-routes={subnet}", "--advertise-exit-node")
    assert r.returncode == 0, r.stderr
    n = tailnet.wait(lambda: (n := tailnet.control.node("tsd-io")) and
                     set(n.advertised()) >= {subnet, "0.0.0.0/0", "::/0"} and n, 30,
                     "RoutableIPs from tailscaled")
    p = peer_status(tsp, "tsd-io")
    assert subnet not in p["allowed_ips"] and "0.0.0.0/0" not in p["allowed_ips"], p
    services = {s.get("Proto"): s.get("Port") for s in n.hostinfo.get("Services") or ()}
    assert services.get("peerapi4"), n.hostinfo.get("Services")   # for DoH via an exit node
    tailnet.call(tailnet.control.approve_routes, n.id, [subnet, "0.0.0.0/0"])
    p = eventually(lambda: (p := peer_status(tsp, "tsd-io")) and subnet in p["allowed_ips"]
                   and "::/0" in p["allowed_ips"] and p, 30, "approved routes in our netmap")
    assert "0.0.0.0/0" in p["allowed_ips"]
    assert tailnet.call(tailnet.control.primary_routes) == {subnet: n.id}
    eventually(lambda: subnet in (tsd_status(tsd)["Self"].get("PrimaryRoutes") or []), 30,
               "tailscaled sees itself as the primary router")
    # without --accept-routes / --exit-node, tsproxy's WireGuard peer keeps only its addresses
    assert sorted(p["routes"]) == sorted([f"{n.ipv4}/32", f"{n.ipv6}/128"]), p
    r = tsd.cli("set", "--advertise-routes=", "--advertise-exit-node=false")
    assert r.returncode == 0, r.stderr
    eventually(lambda: (p := peer_status(tsp, "tsd-io")) and subnet not in p["allowed_ips"]
               and "0.0.0.0/0" not in p["allowed_ips"], 30, "withdrawn routes leave")
    assert tailnet.call(tailnet.control.primary_routes) == {}
