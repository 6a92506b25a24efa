"""Two tsproxy daemons (real CLI, real sockets) in Tailscale mode on a test tailnet served by our
control server and DERP relay over loopback: they reach each other, and the control-plane
lifecycle (restart with stored keys, interactive login, rejected key, unreachable server, key
expiry, control restart, malformed map message) never breaks a working tunnel."""

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.conftest import REPO, Daemon, free_port, stub_resolver
from tsproxy.daemon import ipc, statedir
from tests.tailnet_helpers import eventually, peer_status
from tsproxy.testing.servers import pattern_sha256

pytestmark = [pytest.mark.timeout(300)]
MB = 1_000_000


@pytest.fixture(scope="module")
def dns_server():
    """A DNS server on loopback, published on the tailnet by tsp-b's UDP reverse forward."""
    from tsproxy.testing.servers import dns_answer
    records, queries = {}, []          # queries: every datagram it received, in order
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                q, addr = s.recvfrom(2048)
            except OSError:
                return
            queries.append(q)
            try:
                s.sendto(dns_answer(q, records), addr)
            except (ValueError, IndexError, OSError):
                pass
    threading.Thread(target=serve, daemon=True).start()
    yield s.getsockname()[1], records, queries
    s.close()


@pytest.fixture(scope="module")
def tailnet():
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host="127.0.0.1", ephemeral_idle=2.0) as net:
        yield net


@pytest.fixture(scope="module")
def pair(tailnet, web, dns_server, tmp_path_factory):
    b = Daemon(str(tmp_path_factory.mktemp("b")),
               ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                "--hostname", "tsp-b", "--listen", "off", "--reverse", f"8080:127.0.0.1:{web}",
                "--reverse", f"udp:53:127.0.0.1:{dns_server[0]}"])
    a_port = free_port()
    a = Daemon(str(tmp_path_factory.mktemp("a")),
               ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                "--hostname", "tsp-a", "--listen", f"127.0.0.1:{a_port}"])
    a.proxy_port = a_port
    try:
        b.start(timeout=60)
        a.start(timeout=60)
        yield a, b
    finally:
        a.stop()
        b.stop()


def socks_get(port, url, timeout=60):
    """GET through the SOCKS5 proxy with curl; returns (sha256, length, max gap between reads)."""
    p = subprocess.Popen(["curl", "-sS", "--max-time", str(timeout), "--socks5-hostname",
                          f"127.0.0.1:{port}", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    h = hashlib.sha256()
    n, last, gap = 0, time.monotonic(), 0.0
    while chunk := p.stdout.read1(1 << 16):
        now = time.monotonic()
        gap = max(gap, now - last)
        last = now
        h.update(chunk)
        n += len(chunk)
    err = p.stderr.read().decode()
    assert p.wait() == 0, err
    return h.hexdigest(), n, gap


def test_two_nodes_reach_each_other_by_name(pair):
    a, b = pair
    st = a.status()
    assert st["mode"] == "tailscale" and st["self"]["name"] == "tsp-a.tailnet.test"
    assert st["home_derp"] == 900
    eventually(lambda: peer_status(a, "tsp-b"), 20, "tsp-b in tsp-a's netmap")
    digest, n, _ = socks_get(a.proxy_port, "http://tsp-b:8080/bytes/3000000")
    assert (digest, n) == (pattern_sha256(3 * MB), 3 * MB)
    digest, n, _ = socks_get(a.proxy_port, "http://tsp-b.tailnet.test:8080/bytes/1000")
    assert n == 1000
    p = eventually(lambda: (lambda p: p if p and p["path"].startswith("direct") else None)(
        peer_status(a, "tsp-b")), 30, "direct path between the two nodes")
    assert p["handshakes"] >= 1 and p["rx_bytes"] > 3 * MB
    # the CLI's human status shows the peer and its path
    out = subprocess.run([sys.executable, "-m", "tsproxy", "status", "--state-dir", a.state_dir],
                         capture_output=True, text=True, cwd=REPO, timeout=30).stdout
    assert "tsp-b" in out and "direct" in out and "DERP home: 900" in out


def test_split_dns_route_resolved_over_the_tailnet(pair, tailnet, dns_server):
    """DNSConfig.Routes sends *.corp.test to a resolver at tsp-b's tailnet address (a UDP
    reverse forward to a local DNS server); the name then dials through the tailnet."""
    a, b = pair
    b_ip = b.status()["addresses"][0]
    dns_server[1]["db.corp.test"] = [b_ip]
    tailnet.call(tailnet.control.set_dns, {"Resolvers": [], "Domains": ["tailnet.test"],
                                           "Proxied": True,
                                           "Routes": {"corp.test.": [{"Addr": b_ip}]}})
    r = eventually(lambda: (lambda r: r if r.returncode == 0 else None)(subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{a.proxy_port}",
         "http://db.corp.test:8080/"], capture_output=True, text=True)), 30, "split DNS name")
    assert r.stdout == "hello from tsp-b\n"
    rev = [x for x in b.status()["reverse"] if x["proto"] == "udp"][0]
    assert rev["connections"] >= 1
    from tsproxy.dns.message import encode_name
    queries = dns_server[2]
    assert any(encode_name("db.corp.test") in q for q in queries)     # the log sees routed names
    # a name under no route is sent neither to that resolver nor to the host's: with
    # --non-tailnet refuse the SOCKS server answers 0x02 (not allowed by ruleset)
    before = a.counters()
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "--socks5-hostname",
                        f"127.0.0.1:{a.proxy_port}", "http://nothing.other.test:8080/"],
                       capture_output=True, text=True)
    assert r.returncode == 97 and r.stderr.rstrip().endswith(". (2)"), r.stderr   # SOCKS reply 2
    after = a.counters()
    assert after["dialer.dial_refused_policy"] == before["dialer.dial_refused_policy"] + 1
    assert after["dialer.host_resolve"] == 0 and after["dialer.dial_direct"] == 0
    stub = stub_resolver()
    assert stub is None or not [n for n in stub.names() if "nothing.other" in n]
    # ... and the route's resolver never saw it: it got only corp.test queries
    assert not [q for q in queries if b"\x07nothing\x05other" in q]
    assert all(b"\x04corp\x04test\x00" in q for q in queries), queries
    # a name under the route that its resolver does not know: host unreachable (0x04), and
    # it was asked of the route's resolver only, never the host
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "--socks5-hostname",
                        f"127.0.0.1:{a.proxy_port}", "http://nosuch.corp.test:8080/"],
                       capture_output=True, text=True)
    assert r.returncode == 97 and r.stderr.rstrip().endswith(". (4)"), r.stderr   # host unreachable
    assert any(encode_name("nosuch.corp.test") in q for q in queries)
    assert a.counters()["dialer.host_resolve"] == 0


def test_tailnet_names_and_addresses_never_leave_through_the_host(pair, tailnet, tmp_path):
    """issue 12: a MagicDNS name no node has and a tailnet address no node holds get a
    precise error from SOCKS5 (0x04 host unreachable) and the HTTP proxy (502 with the
    reason), even with --non-tailnet direct, and nothing reaches the host resolver (the stub)
    or the host's routes (dial_direct stays 0)."""
    port = free_port()
    d = Daemon(str(tmp_path / "direct"), [
        "--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
        "--hostname", "tsp-direct", "--listen", f"127.0.0.1:{port}", "--non-tailnet", "direct"])
    try:
        d.start(timeout=60)
        eventually(lambda: "tsp-b" in str(d.status().get("peers")), 30, "tsp-b in the netmap")
        for url, shown in (("http://nosuch.tailnet.test:8080/", "nosuch.tailnet.test"),
                           ("http://100.64.0.99:8080/", "100.64.0.99"),
                           ("http://[fd7a:115c:a1e0::99]:8080/", "fd7a:115c:a1e0::99")):
            r = subprocess.run(["curl", "-sS", "--max-time", "10", "--socks5-hostname",
                                f"127.0.0.1:{port}", url], capture_output=True, text=True)
            assert r.returncode == 97 and r.stderr.rstrip().endswith(". (4)"), (url, r.stderr)
            r = subprocess.run(["curl", "-sS", "--max-time", "10", "-i", "--proxy",
                                f"http://127.0.0.1:{port}", url], capture_output=True, text=True)
            assert r.stdout.startswith("HTTP/1.1 502 "), (url, r.stdout)
            assert f"{shown}: no such node on the tailnet" in r.stdout, r.stdout
        c = d.counters()
        assert c["dialer.dial_no_such_node"] == 6
        assert c["dialer.dial_direct"] == 0 and c["dialer.host_resolve"] == 0
        stub = stub_resolver()
        assert stub is None or not [n for n in stub.names() if "nosuch" in n]
    finally:
        d.stop()


def test_pac_file_follows_the_netmap(pair, tailnet, tmp_path):
    a, b = pair

    def pac():
        return urllib.request.urlopen(f"http://127.0.0.1:{a.proxy_port}/proxy.pac",
                                      timeout=10).read().decode()
    text = pac()
    assert 'host == "tsp-b"' in text and 'dnsDomainIs(host, ".tailnet.test")' in text
    assert "latecomer" not in text
    late = Daemon(str(tmp_path / "late"), ["--login-server", tailnet.control_url, "--auth-key",
                                           tailnet.auth_key, "--hostname", "latecomer",
                                           "--listen", "off"]).start(timeout=60)
    try:
        eventually(lambda: 'host == "latecomer"' in pac(), 30, "new peer in the PAC file")
    finally:
        late.stop()


def test_control_restart_mid_transfer_keeps_the_tunnel(pair, tailnet):
    a, b = pair
    streams = tailnet.call(lambda: tailnet.control.counters["map_stream"])
    import asyncio
    import urllib.parse
    curl = subprocess.Popen(["curl", "-sS", "--max-time", "120", "--socks5-hostname",
                             f"127.0.0.1:{a.proxy_port}", f"http://tsp-b:8080/drip/{4 * MB}/8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    h, got = hashlib.sha256(), [0]

    def read():
        while chunk := curl.stdout.read1(1 << 16):
            h.update(chunk)
            got[0] += len(chunk)
    t = threading.Thread(target=read)
    t.start()
    u = urllib.parse.urlsplit(tailnet.control_url)

    def control_down():
        try:
            socket.create_connection((u.hostname, u.port), timeout=2).close()
            return False
        except OSError:               # refused, or reset by a listener closing under us
            return True
    down = None
    try:
        eventually(lambda: got[0] >= 256 * 1024, 30, "transfer under way")
        down = asyncio.run_coroutine_threadsafe(tailnet.control.restart(downtime=10.0), tailnet.loop)
        eventually(control_down, 10, "control server down")
        at_down = got[0]
        # the tunnel keeps carrying data while control is away (no timing: a byte count)
        eventually(lambda: got[0] >= at_down + MB or down.done(), 30, "data while control is down")
        assert not down.done() and got[0] >= at_down + MB, (at_down, got[0])
        down.result(60)
        t.join(60)
    finally:
        if curl.poll() is None:
            curl.kill()
        curl.wait(10)
        if down is not None:
            down.result(60)           # never leave the shared control server down for the next test
    assert curl.returncode == 0, curl.stderr.read()
    assert (h.hexdigest(), got[0]) == (pattern_sha256(4 * MB), 4 * MB)
    # both clients came back: new map streams, and Running again
    tailnet.wait(lambda: tailnet.control.counters["map_stream"] >= streams + 2, 60, "map resumed")
    for d in (a, b):
        eventually(lambda d=d: d.status()["control"]["state"] == "Running", 60, "control Running")


def test_malformed_map_message_drops_stream_keeps_netmap(pair, tailnet):
    a, b = pair
    node = tailnet.node("tsp-a")
    # a previous test may have restarted control: wait until a's map stream is back
    tailnet.wait(lambda: tailnet.control.node("tsp-a").streams > 0, 60, "a's map stream up")
    streams = tailnet.call(lambda: tailnet.control.counters["map_stream"])
    assert tailnet.call(tailnet.control.inject_raw, node.id, b"\x08\x00\x00\x00not zstd")
    tailnet.wait(lambda: tailnet.control.counters["map_stream"] > streams, 60, "a reconnects")
    assert peer_status(a, "tsp-b") is not None
    digest, n, _ = socks_get(a.proxy_port, "http://tsp-b:8080/bytes/100000")
    assert n == 100000
    with open(os.path.join(a.state_dir, "test-daemon.log")) as f:
        assert "map" in f.read()                 # the broken stream was logged


def test_key_expiry_reregisters_and_tunnel_recovers(pair, tailnet):
    a, b = pair
    before = tailnet.node("tsp-b")
    old_key, node_id, addr = before.node_key, before.id, before.ipv4
    tailnet.call(tailnet.control.expire_node, node_id)
    after = tailnet.wait(lambda: (lambda n: n if n and n.node_key != old_key
                                  and not n.expired(time.time()) else None)(
        tailnet.control.node("tsp-b")), 60, "tsp-b re-registered with a new node key")
    assert (after.id, after.ipv4) == (node_id, addr)
    reg = [r for k, r in tailnet.call(lambda: list(tailnet.control.registry.log))
           if k == "register" and r.get("OldNodeKey") == old_key]
    assert reg and reg[-1]["NodeKey"] == after.node_key
    # tsp-a learns the new key from a delta and renegotiates WireGuard with it
    eventually(lambda: (lambda p: p and p["node_key"] == after.node_key and not p["expired"])(
        peer_status(a, "tsp-b")), 30, "tsp-a sees tsp-b's new key")
    digest, n, _ = socks_get(a.proxy_port, f"http://tsp-b:8080/bytes/{2 * MB}")
    assert (digest, n) == (pattern_sha256(2 * MB), 2 * MB)
    assert b.status()["self"]["node_key"] == after.node_key


def test_restart_with_stored_identity_needs_no_auth_key(tailnet, tmp_path):
    state = str(tmp_path / "r")
    d = Daemon(state, ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                       "--hostname", "restarter", "--listen", "off"]).start(timeout=60)
    first = d.status()["self"]
    d.stop()
    assert tailnet.auth_key not in d.log()              # secrets never reach the log
    mode = os.stat(os.path.join(state, "control-state.json")).st_mode & 0o777
    assert mode == 0o600 and os.stat(state).st_mode & 0o777 == 0o700
    assert tailnet.auth_key not in open(os.path.join(state, "control-state.json")).read()
    d2 = Daemon(state, ["--login-server", tailnet.control_url, "--hostname", "restarter",
                        "--listen", "off"]).start(timeout=60)
    try:
        again = d2.status()["self"]
        assert again["node_key"] == first["node_key"] and again["addresses"] == first["addresses"]
        assert tailnet.auth_key not in d2.log()
    finally:
        d2.stop()


def test_ephemeral_node_keeps_no_state_and_is_removed_after_it_leaves(tailnet, tmp_path):
    state = str(tmp_path / "e")
    d = Daemon(state, ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key,
                       "--hostname", "ephem", "--ephemeral", "--advertise-tags", "tag:ci",
                       "--listen", "off"]).start(timeout=60)
    try:
        node = tailnet.node("ephem")
        assert node.ephemeral and node.online
        reg = [r for k, r in tailnet.call(lambda: list(tailnet.control.registry.log))
               if k == "register" and r.get("NodeKey") == node.node_key][0]
        assert reg["Ephemeral"] is True and reg["Hostinfo"]["RequestTags"] == ["tag:ci"]
        assert not os.path.exists(os.path.join(state, "control-state.json"))
    finally:
        d.stop()
    tailnet.wait(lambda: tailnet.control.node("ephem") is None, 30, "ephemeral node deleted")


def test_interactive_login_prints_url_and_waits(tailnet, tmp_path):
    state = str(tmp_path / "i")
    p = subprocess.Popen([sys.executable, "-m", "tsproxy", "up", "--login-server",
                          tailnet.control_url, "--hostname", "interactive", "--listen", "off",
                          "--state-dir", state], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=REPO)
    try:
        lines = []
        while not any("/register/" in ln for ln in lines):
            line = p.stdout.readline()
            assert line, (lines, p.stderr.read())
            lines.append(line)
        url = re.search(r"(http://\S+/register/\S+)", "".join(lines)).group(1)
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "interactive" in page
        urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=10)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "tsproxy is up as interactive.tailnet.test" in out
    finally:
        if p.poll() is None:
            p.kill()
        try:
            ipc.call(statedir.socket_path(state), {"op": "down"})
        except (ipc.DaemonNotRunning, OSError):
            pass


def test_rejected_auth_key_exits_1_with_one_line_no_retry_storm(tailnet, tmp_path):
    before = tailnet.call(lambda: tailnet.control.counters["register"])
    for extra in (["--foreground"], []):
        r = subprocess.run([sys.executable, "-m", "tsproxy", "up", *extra, "--login-server",
                            tailnet.control_url, "--auth-key", "tskey-auth-bogus",
                            "--hostname", "rejected", "--listen", "off", "--state-dir",
                            str(tmp_path / f"x{len(extra)}")],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 1
        last = r.stderr.strip().splitlines()[-1]
        assert last == "tsproxy: the control server rejected the auth key: invalid authkey", r.stderr
        assert "tskey-auth-bogus" not in r.stderr + r.stdout
    assert tailnet.call(lambda: tailnet.control.counters["register"]) - before == 2


def test_unreachable_control_server_is_retried_and_shown(tmp_path):
    port = free_port()
    state = str(tmp_path / "u")
    os.makedirs(state, mode=0o700)
    p = subprocess.Popen([sys.executable, "-m", "tsproxy", "up", "--foreground",
                          "--login-server", f"http://127.0.0.1:{port}", "--auth-key", "tskey-x",
                          "--listen", "off", "--state-dir", state],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        def failing():
            try:
                st = ipc.call(statedir.socket_path(state), {"op": "status"})
            except (ipc.DaemonNotRunning, OSError, ValueError):
                return None
            return st if st["control"]["failures"] >= 2 else None
        st = eventually(failing, 30, "control failures in status")
        assert st["state"] != "Running" and "refused" in st["control"]["last_error"].lower()
        time.sleep(3)
        st2 = ipc.call(statedir.socket_path(state), {"op": "status"})
        # backoff: a handful of attempts, not a storm
        assert st2["control"]["failures"] < 10, st2["control"]
        out = subprocess.run([sys.executable, "-m", "tsproxy", "status", "--state-dir", state],
                             capture_output=True, text=True, cwd=REPO, timeout=30).stdout
        assert "last error" in out
    finally:
        p.terminate()
        p.wait(15)
