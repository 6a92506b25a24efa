"""HTTPS_PROXY / HTTP_PROXY / NO_PROXY choice (Go httpproxy rules) and CONNECT dialing through a
loopback test proxy that checks credentials (issue 16 defect 7)."""

import asyncio
import socket
import ssl

import pytest

from tsproxy.errors import ConfigError, RemoteProtocolError
from tsproxy.netdial import aio as netdial
from tsproxy.netdial.proxy import ProxyConfig, ProxyURL, check_connect_response, connect_request
from tsproxy.testing.connect_proxy import TestConnectProxy
from tsproxy.testing.derp_server import TestDerpServer


def test_scheme_picks_the_variable_and_upper_case_wins():
    env = {"HTTPS_PROXY": "http://p1:3128", "https_proxy": "http://p2:1", "http_proxy": "p3"}
    cfg = ProxyConfig.from_env(env)
    assert cfg.proxy_for("https", "controlplane.example.com", 443) == ProxyURL("p1", 3128)
    assert cfg.proxy_for("http", "hs.example.com", 8080) == ProxyURL("p3", 80)
    assert ProxyConfig.from_env({"https_proxy": "p2:1"}).proxy_for("https", "x.com", 443) \
        == ProxyURL("p2", 1)
    assert ProxyConfig.from_env({"HTTP_PROXY": "p"}).proxy_for("https", "x.com", 443) is None
    assert ProxyConfig.from_env({}).proxy_for("https", "x.com", 443) is None


@pytest.mark.parametrize("host,port,bypass", [
    ("localhost", 443, True), ("127.0.0.1", 443, True), ("::1", 443, True),
    ("example.com", 443, True), ("derp.example.com", 443, True), ("badexample.com", 443, False),
    ("a.corp.test", 443, True), ("corp.test", 443, True),
    ("10.1.2.3", 443, True), ("10.2.0.1", 443, False), ("192.0.2.7", 443, True),
    ("192.0.2.8", 443, False), ("only.port.test", 8443, True), ("only.port.test", 443, False),
    ("2001:db8::5", 443, True), ("controlplane.tailscale.com", 443, False)])
def test_no_proxy_rules(host, port, bypass):
    cfg = ProxyConfig(https_proxy="http://proxy:3128",
                      no_proxy="example.com, *.corp.test,10.1.0.0/16,192.0.2.7,"
                               "only.port.test:8443,2001:db8::/64,bad/cidr")
    assert (cfg.proxy_for("https", host, port) is None) is bypass


def test_no_proxy_star_and_lower_case():
    assert ProxyConfig.from_env({"HTTPS_PROXY": "p:1", "no_proxy": "*"}).proxy_for(
        "https", "x.com", 443) is None


def test_credentials_become_basic_auth_and_never_show():
    p = ProxyURL.parse("http://us%40er:p%3Ass@proxy.corp:8080", "HTTPS_PROXY")
    assert (p.host, p.port) == ("proxy.corp", 8080)
    assert p.authorization == "Basic dXNAZXI6cDpzcw=="          # base64("us@er:p:ss")
    assert "p:ss" not in repr(p) and "dXNAZXI6" not in repr(p) and p.display == "proxy.corp:8080"
    req = connect_request("2001:db8::1", 443, p)
    assert req.startswith(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n")
    assert b"Proxy-Authorization: Basic dXNAZXI6cDpzcw==\r\n" in req and req.endswith(b"\r\n\r\n")
    assert b"Proxy-Authorization" not in connect_request("h", 1, ProxyURL("p", 1))


@pytest.mark.parametrize("text", ["socks5://p:1080", "https://p:443", "http://:3128",
                                  "http://p:notaport"])
def test_unsupported_or_broken_proxy_url_is_a_config_error(text):
    with pytest.raises(ConfigError) as e:
        ProxyConfig(https_proxy=text)
    assert "HTTPS_PROXY" in str(e.value)


def test_connect_response_checks():
    p = ProxyURL("proxy", 3128, "Basic c2VjcmV0")
    check_connect_response(b"HTTP/1.1 200 Connection established\r\n\r\n", p)
    with pytest.raises(RemoteProtocolError, match="requires authentication"):
        check_connect_response(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", p)
    with pytest.raises(RemoteProtocolError, match="refused CONNECT: 403"):
        check_connect_response(b"HTTP/1.0 403 Forbidden\r\n\r\n", p)
    with pytest.raises(RemoteProtocolError, match="not an HTTP answer"):
        check_connect_response(b"SSH-2.0-OpenSSH\r\n\r\n", p)


def test_interleave_alternates_families():
    v4 = (socket.AF_INET, 1, 6, "", ("1.2.3.4", 1))
    v6 = (socket.AF_INET6, 1, 6, "", ("::1", 1, 0, 0))
    assert netdial._interleave([v6, v6, v4, v4]) == [v6, v4, v6, v4]
    assert netdial._interleave([v4, v6, v6]) == [v4, v6, v6]


async def test_tls_runs_end_to_end_over_a_connected_proxy_socket():
    derp = TestDerpServer(tls=True, stun_port=None)
    proxy = TestConnectProxy(credentials=("alice", "s3cr:et"))
    await derp.start()
    await proxy.start()
    try:
        url = ProxyURL.parse(proxy.url_with_credentials, "HTTPS_PROXY")
        sock = await netdial.connect_via_proxy(url, "127.0.0.1", derp.port)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        r, w = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="127.0.0.1")
        w.write(b"GET /derp/probe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        w.close()
        assert proxy.connects == {f"127.0.0.1:{derp.port}": 1}
        # wrong password: one clear error naming the proxy, never the secret
        bad = ProxyURL.parse(f"http://alice:wrong@127.0.0.1:{proxy.port}", "HTTPS_PROXY")
        with pytest.raises(RemoteProtocolError) as e:
            await netdial.connect_via_proxy(bad, "127.0.0.1", derp.port)
        assert "requires authentication" in str(e.value) and "wrong" not in str(e.value)
        assert proxy.counters["auth_failed"] == 1
        # nobody listening at the proxy address: an OSError naming the proxy
        await proxy.stop()
        with pytest.raises(OSError, match=f"cannot reach proxy 127.0.0.1:{proxy.port}"):
            await netdial.connect_via_proxy(url, "127.0.0.1", derp.port)
    finally:
        await proxy.stop()
        await derp.stop()


async def test_direct_open_stream_ignores_proxy_for_loopback():
    derp = TestDerpServer(tls=False, stun_port=None)
    await derp.start()
    try:
        env = {"HTTP_PROXY": "http://127.0.0.1:9"}      # would fail if it were used
        r, w = await netdial.open_stream("127.0.0.1", derp.port, scheme="http", timeout=5,
                                         env=env)
        w.write(b"HEAD /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        w.close()
    finally:
        await derp.stop()
