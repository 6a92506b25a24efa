"""httpx, real sockets, UDP, the proxy listener and resource hygiene of tsproxy.Node."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import http.client
import os
import socket

import httpx
import pytest

import tsproxy

MB = 1 << 20
BODY = os.urandom(MB) * 20


async def http_server(node, port: int):
    """A tiny HTTP/1.1 server on the node's tailnet port: / says hello, /big sends BODY."""
    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                body = BODY if path == b"/big" else b"hello from " + node.hostname.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                writer.write(body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    return await node.start_server(handle, port)


async def test_httpx_by_magicdns_name(tailnet_node):
    server = await tailnet_node("web-a")
    client = await tailnet_node("web-b")
    await http_server(server, 80)
    fqdn = server.status()["self"]["name"]
    async with httpx.AsyncClient(transport=client.httpx_transport()) as http:
        r = await http.get("http://web-a/")
        assert r.status_code == 200 and r.text == "hello from web-a"
        r = await http.get(f"http://{fqdn}/big")
        assert len(r.content) == len(BODY)
        assert hashlib.sha256(r.content).digest() == hashlib.sha256(BODY).digest()
        with pytest.raises(httpx.ConnectError, match="not on the tunnel"):
            await http.get("http://127.0.0.1:9/")


async def test_socket_with_http_client(tailnet_node):
    server = await tailnet_node("sock-a")
    client = await tailnet_node("sock-b")
    await http_server(server, 8080)
    sock = await client.socket("sock-a", 8080)
    assert isinstance(sock, socket.socket) and sock.getblocking()

    class TailnetHTTPConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = sock

    def fetch():
        conn = TailnetHTTPConnection("sock-a", 8080)
        conn.request("GET", "/")
        first = conn.getresponse().read()
        conn.request("GET", "/big")
        big = conn.getresponse().read()
        conn.close()
        return first, big
    first, big = await asyncio.to_thread(fetch)
    assert first == b"hello from sock-a"
    assert big == BODY


async def test_udp_echo(tailnet_node):
    a = await tailnet_node("udp-a")
    b = await tailnet_node("udp-b")
    echo = await b.open_udp(7)

    async def serve():
        while True:
            data, addr = await echo.recvfrom()
            await echo.sendto(data.upper(), addr)
    task = asyncio.create_task(serve())
    try:
        d = await a.open_udp()
        got = set()
        for i in range(20):           # UDP may drop while paths settle: resend until answered
            await d.sendto(b"ping %d" % i, ("udp-b", 7))
            try:
                data, addr = await asyncio.wait_for(d.recvfrom(), 1.0)
            except TimeoutError:
                continue
            assert addr == (b.addresses[0], 7)
            got.add(data)
            if len(got) >= 3:
                break
        assert len(got) >= 3 and all(x.startswith(b"PING ") for x in got)
    finally:
        task.cancel()


async def test_serve_proxy_socks5(tailnet_node):
    from python_socks.async_.asyncio import Proxy
    server = await tailnet_node("px-a")
    client = await tailnet_node("px-b")
    await http_server(server, 80)
    host, port = await client.serve_proxy("127.0.0.1:0")
    assert host == "127.0.0.1" and port > 0
    assert client.status()["listeners"] == [{"kind": "mixed", "address": f"127.0.0.1:{port}"}]
    proxy = Proxy.from_url(f"socks5://127.0.0.1:{port}", rdns=True)
    sock = await proxy.connect("px-a", 80)
    r, w = await asyncio.open_connection(sock=sock)
    w.write(b"GET / HTTP/1.1\r\nHost: px-a\r\n\r\n")
    head = await r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert await r.readexactly(len(b"hello from px-a")) == b"hello from px-a"
    w.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# the nodes' own background work (control polling, lite updates, DERP) comes and goes by itself
BACKGROUND = ("ControlClient.", "NoiseH2.", "H2Response.", "DerpConnection.", "TailnetPlane.",
              "MagicConn.", "StreamReader.read")


def _conn_tasks() -> list:
    return [t for t in asyncio.all_tasks() if not t.done()
            and not t.get_coro().__qualname__.startswith(BACKGROUND)]


async def test_100_connections_leave_fds_and_tasks_at_baseline(tailnet_node):
    server = await tailnet_node("churn-a")
    client = await tailnet_node("churn-b")

    async def hello(reader, writer):
        writer.write(b"x")
        await writer.drain()
        writer.close()
    await server.start_server(hello, 9000)
    r, w = await client.open_connection("churn-a", 9000)     # warm paths and caches
    await r.read()
    w.close()
    await asyncio.sleep(0)
    fds, tasks = _fds(), len(_conn_tasks())
    for _ in range(100):
        r, w = await client.open_connection("churn-a", 9000)
        assert await r.read() == b"x"
        w.close()
        await w.wait_closed()
    for _ in range(10):                                      # sockets via socketpair too
        s = await client.socket("churn-a", 9000)
        assert await asyncio.to_thread(s.recv, 1) == b"x"
        s.close()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(_conn_tasks()) > tasks or _fds() > fds:       # closing finishes asynchronously
        gc.collect()
        assert loop.time() < deadline, (
            f"fds {_fds()} (baseline {fds}), tasks {_conn_tasks()} (baseline {tasks})")
        await asyncio.sleep(0.05)


async def test_leaving_async_with_stops_tasks_and_frees_the_udp_port(tailnet):
    before = set(asyncio.all_tasks())
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    async with tsproxy.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, auth_key=tailnet.auth_key,
                            hostname="bye", port=port) as node:
        await node.wait_running(60)
        assert node.status()["magicsock"] is not None
        assert len(asyncio.all_tasks()) > len(before)
    assert node.state == "Stopped"
    left = {t for t in asyncio.all_tasks() if not t.done()} - before
    if left:                        # cancelled inner tasks (wait_for's) may need a loop turn
        await asyncio.wait(left, timeout=5)
    assert all(t.done() for t in left), left
    again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    again.bind(("0.0.0.0", port))            # would raise EADDRINUSE if the node kept it
    again.close()


async def test_forward_method(tailnet_node):
    server = await tailnet_node("fw-a")
    client = await tailnet_node("fw-b")
    await http_server(server, 80)
    d = await client.forward("0:fw-a:80")
    port = int(d["listen"].rsplit(":", 1)[1])
    assert port > 0 and d["target"] == "fw-a:80"
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: fw-a\r\n\r\n")
    await r.readuntil(b"\r\n\r\n")
    assert await r.readexactly(len(b"hello from fw-a")) == b"hello from fw-a"
    w.close()
    assert client.status()["forwards"][0]["target"] == "fw-a:80"


def _self_signed(name: str, tmp_path):
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    return server_ctx, client_ctx


async def test_httpx_https_over_the_tailnet(tailnet_node, tmp_path):
    server_ctx, client_ctx = _self_signed("tls-a", tmp_path)

    async def page(reader, writer):                 # a local TLS server behind a reverse forward
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
        await writer.drain()
        writer.close()
    local = await asyncio.start_server(page, "127.0.0.1", 0, ssl=server_ctx)
    try:
        server = await tailnet_node("tls-a")
        client = await tailnet_node("tls-b")
        await server.reverse(f"tcp:443:127.0.0.1:{local.sockets[0].getsockname()[1]}")
        async with httpx.AsyncClient(transport=client.httpx_transport(verify=client_ctx)) as http:
            r = await http.get("https://tls-a/")
            assert r.status_code == 200 and r.text == "secret"
        async with httpx.AsyncClient(transport=client.httpx_transport()) as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get("https://tls-a/")     # the system CAs do not trust it
    finally:
        local.close()
