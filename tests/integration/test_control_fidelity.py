"""tsproxy daemons against the test control server driven into what real control planes do
(issue 16): an exit node in the tailnet, Headscale's answers to a bad key, key expiry by an
admin, lite updates that fail, PingRequests, 429 with Retry-After."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import pytest

from tests.conftest import REPO, Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status
from tests.waiting import until

pytestmark = [pytest.mark.timeout(240)]


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"direct from loopback\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def loopback_web():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def test_exit_node_peer_changes_nothing_for_non_tailnet_destinations(tailnet, loopback_web,
                                                                     tmp_path):
    exit_d = Daemon(str(tmp_path / "x"), ["--login-server", tailnet.control_url, "--auth-key",
                                          tailnet.auth_key, "--hostname", "exit-x",
                                          "--listen", "off", "--non-tailnet", "refuse"])
    port = free_port()
    a = Daemon(str(tmp_path / "a"), ["--login-server", tailnet.control_url, "--auth-key",
                                     tailnet.auth_key, "--hostname", "client-a",
                                     "--listen", f"127.0.0.1:{port}", "--non-tailnet", "direct"],
               allow_direct=True)                 # dials a loopback page server from the host
    try:
        exit_d.start(timeout=60)
        a.start(timeout=60)
        x = tailnet.node("exit-x")
        tailnet.call(tailnet.control.set_exit_node, x.id)
        p = eventually(lambda: (lambda p: p if p and "0.0.0.0/0" in p["allowed_ips"] else None)(
            peer_status(a, "exit-x")), 30, "exit-x's /0 in client-a's netmap")
        assert "::/0" in p["allowed_ips"]
        # the WireGuard peer has the node's own addresses and nothing more
        assert sorted(p["routes"]) == sorted([f"{x.ipv4}/32", f"{x.ipv6}/128"]), p
        before = a.counters()
        r = subprocess.run(["curl", "-sS", "--max-time", "20", "--socks5-hostname",
                            f"127.0.0.1:{port}", f"http://127.0.0.1:{loopback_web}/"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout == "direct from loopback\n", r.stderr
        after = a.counters()
        key = next(k for k in after if k.endswith("dial_direct"))
        assert after[key] == before.get(key, 0) + 1
        tun = next(k for k in after if k.endswith("dial_tunnel"))
        assert after[tun] == before.get(tun, 0)
    finally:
        a.stop()
        exit_d.stop()


# -- ControlClient against the test control server in this event loop ------------------------

@pytest.fixture
async def server():
    from tsproxy.testing.control import TestControlServer
    srv = TestControlServer("127.0.0.1", derp_map={"Regions": {}})
    await srv.start()
    yield srv
    await srv.stop()


def _client(srv, tmp_path, key, name="c1", **kw):
    from tsproxy.control.aio import ControlClient
    from tsproxy.daemon.state import StateStore
    c = ControlClient(srv.url, StateStore(str(tmp_path / name)), hostname=name, auth_key=key,
                      **kw)
    c.backoff_min, c.backoff_max = 0.05, 0.2
    return c


class _Running:
    """Run a ControlClient in the background; stop it on exit."""

    def __init__(self, client):
        self.client = client

    async def __aenter__(self):
        import asyncio
        self.task = asyncio.create_task(self.client.run())
        return self.task

    async def __aexit__(self, *exc):
        import asyncio
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.client._drop_conn()


def _registers_after(srv, n):
    return [r for k, r in srv.registry.log[n:] if k == "register"]


async def test_reconnect_never_resends_the_auth_key(server, tmp_path):
    key = server.create_auth_key().key              # single use
    c = _client(server, tmp_path, key)
    async with _Running(c) as task:
        await until(lambda: c.state == "Running", "first login")
        mark = len(server.registry.log)
        streams = server.counters["map_stream"]
        server.drop_streams()
        await until(lambda: server.counters["map_stream"] > streams and c.state == "Running",
                    "reconnected")
        again = _registers_after(server, mark)
        assert again and all("Auth" not in r for r in again), again
        assert not task.done()


async def test_registered_node_whose_key_is_refused_keeps_running_its_control_task(
        server, tmp_path):
    """The server forgot the node (deleted) and the single-use key is spent: reported in
    status and the log, retried without the key, and the control task never stops."""
    key = server.create_auth_key().key
    c = _client(server, tmp_path, key)
    async with _Running(c) as task:
        await until(lambda: c.state == "Running", "first login")
        server.delete_node(server.node("c1").id)
        server.drop_streams()
        await until(lambda: "rejected the auth key" in c.status()["last_error"], "reported")
        await until(lambda: c.state == "NeedsLogin" and c.auth_url, "waits for a login")
        assert not task.done()
        assert key not in c.status()["last_error"]
        # after the refusal the key is never presented again
        refused = max(i for i, (k, r) in enumerate(server.registry.log)
                      if k == "register" and "Auth" in r)
        mark = len(server.registry.log)
        server.drop_streams()
        await until(lambda: _registers_after(server, mark), "registers again")
        assert all("Auth" not in r for r in _registers_after(server, refused + 1))


async def test_admin_expiry_waits_in_needs_login_without_reusing_the_key(server, tmp_path):
    server.registry.renew_expired = False          # as Headscale: expired means log in again
    key = server.create_auth_key(reusable=True).key
    c = _client(server, tmp_path, key)
    async with _Running(c) as task:
        await until(lambda: c.state == "Running", "first login")
        node = server.node("c1")
        mark = len(server.registry.log)
        server.expire_node(node.id)
        await until(lambda: c.state == "NeedsLogin" and c.auth_url, "NeedsLogin with a URL")
        regs = _registers_after(server, mark)
        assert regs and all("Auth" not in r for r in regs), regs
        assert regs[0]["OldNodeKey"] == node.node_key
        assert server.node("c1").expired(server.clock())       # the admin's expiry stands
        assert len(server.registry.nodes) == 1                  # and no new node was minted
        assert not task.done()


@pytest.mark.parametrize("answer", ["error", "http401", "reset"])
async def test_bad_key_in_each_headscale_answer_is_one_rejection(server, tmp_path, answer):
    import asyncio
    from tsproxy.control.aio import AuthKeyRejected
    server.bad_key_answer = answer
    c = _client(server, tmp_path, "tskey-auth-bogus")
    with pytest.raises(AuthKeyRejected) as e:
        await asyncio.wait_for(c.run(), 20)
    assert server.counters["register"] == 1
    assert "tskey-auth-bogus" not in str(e.value)
    assert c.state == "NeedsLogin"


async def test_server_errors_with_a_key_are_retried_not_rejections(server, tmp_path):
    """A first login that meets 'node key in use' style errors keeps trying."""
    key = server.create_auth_key().key
    orig = server.registry.register
    calls = []

    def flaky(req, machine, now):
        from tsproxy.testing.control.registry import RegisterResult
        calls.append(1)
        if len(calls) <= 2:
            return RegisterResult({"Error": "node key already in use"})
        return orig(req, machine, now)
    server.registry.register = flaky
    c = _client(server, tmp_path, key)
    async with _Running(c):
        await until(lambda: c.state == "Running", "logged in after the errors")
    assert len(calls) >= 3


async def test_lite_update_that_fails_is_retried_until_it_lands(server, tmp_path):
    server.stream_updates_node = False             # Headscale 0.23-0.26
    server.fail_lite_updates = 1
    c = _client(server, tmp_path, server.create_auth_key().key)
    c._preferred_derp = 900
    c._endpoints = [("127.0.0.1", 41641)]
    async with _Running(c):
        await until(lambda: c.state == "Running", "login")
        await until(lambda: server.counters.get("map_lite_failed") == 1, "first lite failed")
        node = await until(lambda: (lambda n: n if n and n.home_derp == 900 else None)(
           server.node("c1")), "home DERP learned from a retried lite update")
        assert node.endpoints == ["127.0.0.1:41641"]
        assert c.lite_failures == 1


async def test_register_429_honours_retry_after(server, tmp_path):
    import asyncio
    delays = []

    async def fake_sleep(d):
        delays.append(d)
        await asyncio.sleep(0.01)
    server.rate_limit_registers, server.retry_after = 1, "7"
    c = _client(server, tmp_path, server.create_auth_key(reusable=True).key)
    c._sleep = fake_sleep
    async with _Running(c):
        await until(lambda: c.state == "Running", "login after the 429")
        assert delays[0] == 7.0 and server.counters["register_429"] == 1
        server.rate_limit_registers, server.retry_after = 1, None
        streams = server.counters["map_stream"]
        server.drop_streams()
        await until(lambda: server.counters["register_429"] == 2
                    and server.counters["map_stream"] > streams, "second 429, then back")
    rl = [d for d in delays[1:] if d >= 5.0]
    assert rl and 5.0 <= rl[0] <= 10.0, delays


@pytest.mark.parametrize("kind", ["head-http", "head-noise", "c2n", "c2n-delta"])
async def test_ping_request_answered(server, tmp_path, kind):
    c = _client(server, tmp_path, server.create_auth_key().key)
    async with _Running(c):
        await until(lambda: c.state == "Running", "login")
        nid = server.node("c1").id
        if kind.startswith("head"):
            pid = server.send_ping(nid, noise=kind == "head-noise")
        else:
            req = b"POST /echo HTTP/1.1\r\nHost: node\r\nContent-Length: 4\r\n\r\nping"
            pid = server.send_ping(nid, types="c2n", payload=req, keepalive=kind == "c2n")
        ans = await until(lambda: server.pings.get(pid), "ping answered")
        if kind == "head-http":
            assert (ans["method"], ans["via"]) == ("HEAD", "http")
        elif kind == "head-noise":
            assert (ans["method"], ans["via"]) == ("HEAD", "noise")
        else:
            assert (ans["method"], ans["via"]) == ("POST", "noise")
            assert ans["body"].startswith(b"HTTP/1.1 200 OK\r\n")
            assert ans["body"].endswith(b"\r\n\r\nping")
        assert c.state == "Running"


@pytest.mark.parametrize("answer,line", [
    ("http401", "tsproxy: the control server rejected the auth key: http 401 Unauthorized"),
    ("reset", "tsproxy: the control server reset the register request that carried the auth "
              "key (Headscale 0.25.0 does this for an invalid, expired or used key)"),
])
def test_up_with_a_bad_key_exits_1_with_one_line_for_each_headscale_answer(
        tailnet, tmp_path, answer, line):
    tailnet.call(setattr, tailnet.control, "bad_key_answer", answer)
    before = tailnet.call(lambda: tailnet.control.counters["register"])
    try:
        r = subprocess.run([sys.executable, "-m", "tsproxy", "up", "--login-server",
                            tailnet.control_url, "--auth-key", "tskey-auth-bogus",
                            "--hostname", "rejected", "--listen", "off", "--non-tailnet",
                            "refuse", "--state-dir", str(tmp_path / "s")],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    finally:
        tailnet.call(setattr, tailnet.control, "bad_key_answer", "error")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == line, r.stderr
    assert "tskey-auth-bogus" not in r.stderr + r.stdout
    assert tailnet.call(lambda: tailnet.control.counters["register"]) - before == 1


def test_only_tcp_443_attribute_sends_no_udp_and_keeps_working_over_derp(tailnet, tmp_path):
    from tests.tailnet_helpers import start_page_server, path_of
    web = start_page_server()
    b = Daemon(str(tmp_path / "b"), ["--login-server", tailnet.control_url, "--auth-key",
                                     tailnet.auth_key, "--hostname", "web-b", "--listen", "off",
                                     "--non-tailnet", "refuse", "--reverse",
                                     f"8080:127.0.0.1:{web.server_address[1]}"])
    port = free_port()
    a = Daemon(str(tmp_path / "a"), ["--login-server", tailnet.control_url, "--auth-key",
                                     tailnet.auth_key, "--hostname", "tcp443-a", "--listen",
                                     f"127.0.0.1:{port}", "--non-tailnet", "refuse"])
    try:
        b.start(timeout=60)
        a.start(timeout=60)
        tailnet.call(tailnet.control.set_node_attr, tailnet.node("tcp443-a").id, "only-tcp-443")
        eventually(lambda: "only-tcp-443 set" in open(a.log_path).read(), 30,
                   "tcp443-a applied the attribute")
        udp_before = a.counters()["magicsock.tx_udp"]
        for _ in range(3):
            r = subprocess.run(["curl", "-sS", "--max-time", "20", "--socks5-hostname",
                                f"127.0.0.1:{port}", "http://web-b:8080/bytes/200000"],
                               capture_output=True, timeout=30)
            assert r.returncode == 0 and len(r.stdout) == 200000, r.stderr
        c = a.counters()
        assert c["magicsock.tx_udp"] == udp_before, c
        assert c["magicsock.tx_derp"] > 0 and c["magicsock.tx_udp_blocked"] > 0
        assert path_of(a, "web-b").startswith("derp")
    finally:
        a.stop()
        b.stop()
        web.shutdown()
