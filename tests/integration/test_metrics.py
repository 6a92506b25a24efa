"""`--metrics`: Prometheus text parsed by prometheus_client's own parser, byte counters that move
during a transfer, /healthz, and /readyz flipping when the control server goes away and when the
node key expires; `--log-format json`."""

import json
import re
import time
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status
from tests.integration.test_tailnet_daemons import socks_get

pytestmark = [pytest.mark.timeout(300)]
MB = 1_000_000


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port) -> dict:
    status, text = get(port, "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(scope="module")
def nodes(tailnet, web, tmp_path_factory):
    once = tailnet.call(lambda: tailnet.control.create_auth_key(reusable=False).key)
    b = Daemon(str(tmp_path_factory.mktemp("mb")),
               ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                "--hostname", "mb", "--listen", "off", "--reverse", f"8080:127.0.0.1:{web}",
                "--non-tailnet", "refuse"])
    a = Daemon(str(tmp_path_factory.mktemp("ma")),
               ["--login-server", tailnet.control_url, "--auth-key", once, "--hostname", "ma",
                "--listen", f"127.0.0.1:{free_port()}", "--metrics", str(free_port()),
                "--log-format", "json", "--non-tailnet", "refuse", "--forward", f"{free_port()}:mb:8080"])
    a.proxy_port = int(a.args[a.args.index("--listen") + 1].rsplit(":", 1)[1])
    a.metrics_port = int(a.args[a.args.index("--metrics") + 1])
    try:
        b.start(timeout=60)
        a.start(timeout=60)
        eventually(lambda: peer_status(a, "mb"), 30, "mb in ma's netmap")
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_metrics_parse_and_move_during_a_transfer(nodes):
    a, _ = nodes
    assert a.status()["metrics"] == f"127.0.0.1:{a.metrics_port}"
    # the home region is chosen by the first netcheck round, which may end after Running
    eventually(lambda: value(scrape(a.metrics_port), "tsproxy_derp_connected", region="900") == 1,
               20, "DERP home region 900 connected")
    s0 = scrape(a.metrics_port)
    for name in ("tsproxy_info", "tsproxy_peer_handshakes_total", "tsproxy_events_total",
                 "tsproxy_derp_connected", "tsproxy_control_state", "process_resident_memory_bytes",
                 "process_open_fds", "tsproxy_connections_total"):
        assert any(k[0] == name for k in s0), name
    assert value(s0, "tsproxy_control_state", state="Running") == 1
    assert value(s0, "tsproxy_derp_connected", region="900") == 1
    assert value(s0, "process_resident_memory_bytes") > 1_000_000
    assert value(s0, "tsproxy_events_total", component="magicsock", counter="rx_udp") is not None
    before = value(s0, "tsproxy_peer_bytes_total", peer="mb", direction="rx") or 0
    packets_before = value(s0, "tsproxy_peer_packets_total", peer="mb", direction="rx") or 0
    result = {}
    t = threading.Thread(target=lambda: result.update(
        r=socks_get(a.proxy_port, f"http://mb:8080/drip/{3 * MB}/6")))
    t.start()
    try:
        mid = eventually(lambda: (lambda v: v if v and v > before + 100_000 else None)(
            value(scrape(a.metrics_port), "tsproxy_peer_bytes_total", peer="mb", direction="rx")),
            30, "rx bytes moving during the transfer")
        assert t.is_alive()                        # scraped while the transfer was running
    finally:
        t.join(60)
    assert result["r"][1] == 3 * MB
    s1 = scrape(a.metrics_port)
    assert value(s1, "tsproxy_peer_bytes_total", peer="mb", direction="rx") > max(mid, 3 * MB)
    # 3 MB in datagrams of at most the tailnet MTU (1280): at least 3 MB / 1280 of them
    assert value(s1, "tsproxy_peer_packets_total", peer="mb", direction="rx") >= \
        packets_before + 3 * MB // 1280
    assert value(s1, "tsproxy_peer_packets_total", peer="mb", direction="tx") > 0
    assert value(s1, "tsproxy_connections_total", frontend="mixed", target="") >= 1
    eventually(lambda: value(scrape(a.metrics_port), "tsproxy_connections_open", frontend="mixed") == 0,
               10, "the proxy connection closed")
    kinds = {k[1][0][1] for k in s1 if k[0] == "tsproxy_peer_path"}
    assert kinds <= {"direct", "derp", "none"} and kinds


def test_health_and_404(nodes):
    a, _ = nodes
    assert get(a.metrics_port, "/healthz") == (200, "ok\n")
    status, body = get(a.metrics_port, "/readyz")
    assert status == 200 and body.startswith("ready: "), body
    assert get(a.metrics_port, "/nope")[0] == 404


def test_log_format_json(nodes):
    a, _ = nodes
    with open(a.log_path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    recs = [json.loads(ln) for ln in lines]
    assert recs and all({"time", "level", "logger", "msg"} <= r.keys() for r in recs)
    assert any("joining the tailnet" in r["msg"] for r in recs)


def test_readyz_flips_when_control_stops_then_when_the_key_expires(nodes, tailnet):
    a, _ = nodes
    t = threading.Thread(target=lambda: tailnet.run(tailnet.control.restart(downtime=6.0)))
    t.start()
    try:
        body = eventually(lambda: (lambda r: r[1] if r[0] == 503 else None)(get(a.metrics_port, "/readyz")),
                          30, "not ready while control is down")
        assert body.startswith("not ready: control "), body        # Starting, or unreachable
        assert get(a.metrics_port, "/healthz")[0] == 200          # alive all the same
    finally:
        t.join(60)
    eventually(lambda: get(a.metrics_port, "/readyz")[0] == 200, 60, "ready again")
    # the node key expires; its one-time auth key is spent, so it cannot renew: not ready
    node = tailnet.node("ma")
    tailnet.call(tailnet.control.expire_node, node.id)
    # expired in the netmap, or the renewal refused (spent key): either way, not ready; on the
    # way there the client may pass through "control Starting" while it re-registers
    settled = re.compile(r"not ready: (node key expired|control NeedsLogin)")
    body = eventually(lambda: (lambda r: r[1] if r[0] == 503 and settled.match(r[1]) else None)(
        get(a.metrics_port, "/readyz")), 60, "not ready (key expired / NeedsLogin) after the expiry")
    assert get(a.metrics_port, "/healthz")[0] == 200
    s = scrape(a.metrics_port)
    expiry = value(s, "tsproxy_node_key_expiry_timestamp_seconds")
    assert (expiry is not None and expiry <= time.time()) or value(
        s, "tsproxy_control_state", state="NeedsLogin") == 1
