"""The proxy listener end to end on loopback, driven by real clients (curl, python-socks, httpx,
raw sockets).  The "tailnet" is a loopback-backed object with the NetstackRuntime shape: the
tunnel address 100.100.1.1 maps to 127.0.0.1, so the dialer's tunnel branch, the relay and both
front ends run for real; only the WireGuard/netstack layers below are replaced."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import subprocess
import threading

import pytest

from tsproxy.proxy.aio.dialer import Dialer
from tsproxy.proxy.aio.listener import ProxyServer
from tsproxy.proxy.auth import ProxyAuth
from tsproxy.proxy.pac import PacConfig

TUN_IP = "100.100.1.1"
PAGE = b"<html><body><h1 id=t>hello from the tailnet peer</h1></body></html>"
BIG = os.urandom(3 * 1024 * 1024)

pytestmark = pytest.mark.timeout(60)


class LoopbackTailnet:
    """open_connection/open_udp like NetstackRuntime, with TUN_IP served by 127.0.0.1."""

    def __init__(self):
        self.opened = 0

    async def open_connection(self, ip, port, *, timeout=10.0):
        if ip != TUN_IP:
            from tsproxy.errors import HostUnreachable
            raise HostUnreachable(f"{ip} unreachable")
        self.opened += 1
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            from tsproxy.errors import ConnectionRefused
            raise ConnectionRefused("refused") from None

    async def open_udp(self, local_port=0):
        u = _LoopUdp()
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: u, local_addr=("127.0.0.1", 0))
        return u


class _LoopUdp(asyncio.DatagramProtocol):
    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.q.put_nowait((data, (TUN_IP, addr[1])))

    def sendto(self, data, addr):
        self.transport.sendto(data, ("127.0.0.1", addr[1]))

    async def recvfrom(self):
        return await self.q.get()

    def close(self):
        self.transport.close()


async def _origin(reader, writer):
    """A small HTTP/1.1 origin: /, /big, /chunked, POST /sha256 (hash of the body), keep-alive."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ")
            hdrs = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
            body = b""
            if "content-length" in hdrs:
                body = await reader.readexactly(int(hdrs["content-length"]))
            elif hdrs.get("transfer-encoding") == "chunked":
                while True:
                    n = int((await reader.readline()).split(b";")[0], 16)
                    body += await reader.readexactly(n + 2)
                    body = body[:-2]
                    if n == 0:
                        break
            extra = f"X-Seen-Proxy-Auth: {'proxy-authorization' in hdrs}\r\nX-Seen-Path: {path}\r\n"
            if path == "/chunked":
                writer.write(("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + extra + "\r\n").encode())
                for part in (b"alpha-", b"beta-", b"gamma"):
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                writer.write(b"0\r\n\r\n")
            else:
                out = {"/big": BIG, "/sha256": hashlib.sha256(body).hexdigest().encode()}.get(path, PAGE)
                writer.write((f"HTTP/1.1 200 OK\r\nContent-Length: {len(out)}\r\nContent-Type: text/html\r\n"
                              + extra + "\r\n").encode())
                if method != "HEAD":
                    writer.write(out)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, t):
        self.t = t

    def datagram_received(self, data, addr):
        self.t.sendto(b"echo:" + data, addr)


class Env:
    """The proxy and the origin servers on a private event loop in a thread."""

    def __init__(self, auth=None, policy="refuse", handshake_timeout=10.0, protocols="mixed"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tailnet = LoopbackTailnet()
        self.auth = auth
        self.call(self._start(policy, handshake_timeout, protocols))

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, policy, handshake_timeout, protocols):
        self.web = await asyncio.start_server(_origin, "127.0.0.1", 0)
        self.echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        self.udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            _UdpEcho, local_addr=("127.0.0.1", 0))
        self.web_port = self.web.sockets[0].getsockname()[1]
        self.echo_port = self.echo.sockets[0].getsockname()[1]
        self.udp_port = self.udp.get_extra_info("sockname")[1]
        self.dialer = Dialer(self.tailnet, names={"web": [TUN_IP]}, tunnel_prefixes=["100.64.0.0/10"],
                             dns_suffixes=["tail.example"], policy=policy)
        self.proxy = ProxyServer(self.dialer, listen=("127.0.0.1", 0), auth=self.auth,
                                 pac=PacConfig(suffixes=["tail.example"]), protocols=protocols,
                                 handshake_timeout=handshake_timeout)
        await self.proxy.start()
        self.port = self.proxy.address[1]

    async def _tasks(self):
        return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])

    def task_count(self):
        return self.call(self._tasks())

    async def _stop(self):
        await self.proxy.aclose()
        for s in (self.web, self.echo):
            s.close()
        self.udp.close()
        await asyncio.sleep(0.05)               # let the origins see the pooled upstreams close
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def close(self):
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


@pytest.fixture
def authenv():
    e = Env(auth=ProxyAuth("alice", "s3cret pass"))
    yield e
    e.close()


def curl(*args, timeout=30):
    import shutil
    if not shutil.which("curl"):
        if os.environ.get("CI") == "true":
            pytest.fail("curl is missing")
        pytest.skip("curl is not installed")
    p = subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


# ---- curl, every mode -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["--socks5", "--socks5-hostname", "--socks4a", "--socks4"])
def test_curl_socks_modes(env, mode):
    host = TUN_IP if mode in ("--socks5", "--socks4") else "web.tail.example"
    rc, out, err = curl(mode, f"127.0.0.1:{env.port}", f"http://{host}:{env.web_port}/")
    assert rc == 0, err
    assert out == PAGE


def test_curl_http_forward_and_connect(env):
    rc, out, err = curl("-x", f"http://127.0.0.1:{env.port}", f"http://web:{env.web_port}/big")
    assert rc == 0, err
    assert hashlib.sha256(out).digest() == hashlib.sha256(BIG).digest()
    rc, out, err = curl("-x", f"http://127.0.0.1:{env.port}", "--proxytunnel", f"http://web:{env.web_port}/big")
    assert rc == 0, err
    assert out == BIG


def test_curl_http_chunked_upload_and_download_keepalive(env):
    data = os.urandom(300_000)
    path = f"/tmp/tsproxy-upload-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(data)
    try:
        rc, out, err = curl("-v", "-x", f"http://127.0.0.1:{env.port}", "-H", "Transfer-Encoding: chunked",
                            "--data-binary", f"@{path}", f"http://web:{env.web_port}/sha256",
                            "--next", "-x", f"http://127.0.0.1:{env.port}", f"http://web:{env.web_port}/chunked")
    finally:
        os.unlink(path)
    assert rc == 0, err
    assert out == hashlib.sha256(data).hexdigest().encode() + b"alpha-beta-gamma"
    assert b"Re-using existing connection" in err or b"Reusing existing connection" in err


def test_upstream_pool_shared_between_clients(env):
    url = f"http://web:{env.web_port}/"
    for _ in range(4):                       # four separate client connections, one after another
        assert curl("-x", f"http://127.0.0.1:{env.port}", url)[1] == PAGE
    assert env.tailnet.opened == 1
    assert env.proxy.http_pool.counters["reused"] == 3
    # a different port is a different pool key
    curl("-x", f"http://127.0.0.1:{env.port}", f"http://web:{env.echo_port}/", "-m", "2")
    assert env.tailnet.opened == 2


def test_curl_with_auth(authenv):
    e = authenv
    url = f"http://web:{e.web_port}/"
    assert curl("-x", f"socks5h://alice:s3cret%20pass@127.0.0.1:{e.port}", url)[1] == PAGE
    assert curl("--socks5", f"127.0.0.1:{e.port}", "--proxy-user", "alice:s3cret pass",
                f"http://{TUN_IP}:{e.web_port}/")[1] == PAGE
    rc, _, err = curl("--socks5-hostname", f"alice:wrong@127.0.0.1:{e.port}", url)
    # CURLE_PROXY; "(1 1)" is the RFC 1929 reply: version 1, status 1 (failure)
    assert (rc, err) == (97, b"curl: (97) User was rejected by the SOCKS5 server (1 1).\n")
    rc, out, err = curl("-x", f"http://127.0.0.1:{e.port}", "-U", "alice:s3cret pass", url)
    assert out == PAGE, err
    assert b"X-Seen-Proxy-Auth" not in out
    rc, out, err = curl("-x", f"http://127.0.0.1:{e.port}", "-U", "alice:s3cret pass", "-p", url)
    assert out == PAGE, err
    rc, out, _ = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{e.port}", url)
    assert out == b"407"
    rc, _, err = curl("--socks4a", f"127.0.0.1:{e.port}", url)    # SOCKS4 cannot authenticate
    assert rc == 97 and b"(91), request rejected or failed" in err, err     # SOCKS4 reply 91


def test_forward_strips_proxy_authorization(authenv):
    e = authenv
    rc, out, err = curl("-D", "-", "-x", f"http://127.0.0.1:{e.port}", "-U", "alice:s3cret pass",
                        f"http://web:{e.web_port}/x")
    assert b"X-Seen-Proxy-Auth: False" in out and b"X-Seen-Path: /x" in out


# ---- Python client libraries -------------------------------------------------------------------

def test_python_socks_and_httpx(env):
    from python_socks.sync import Proxy
    s = Proxy.from_url(f"socks5://127.0.0.1:{env.port}").connect(dest_host="web", dest_port=env.echo_port)
    s.sendall(b"ping through socks5")
    s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    s.close()
    assert got == b"ping through socks5"

    import httpx
    with httpx.Client(proxy=f"socks5://127.0.0.1:{env.port}") as c:
        r = c.get(f"http://web.tail.example:{env.web_port}/")
        assert r.status_code == 200 and r.content == PAGE
    with httpx.Client(proxy=f"http://127.0.0.1:{env.port}") as c:
        for _ in range(3):
            r = c.post(f"http://web:{env.web_port}/sha256", content=b"abc")
            assert r.text == hashlib.sha256(b"abc").hexdigest()


# ---- SOCKS5 details with a raw socket ----------------------------------------------------------

def _raw(env):
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    return s


def _recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            break
        b += c
    return b


def _socks5_req(env, req: bytes) -> bytes:
    s = _raw(env)
    s.sendall(b"\x05\x01\x00" + req)
    assert _recv_exact(s, 2) == b"\x05\x00"
    rep = _recv_exact(s, 10)
    s.close()
    return rep


def test_socks5_reply_codes(env):
    ip = socket.inet_aton(TUN_IP)
    # refused on the tunnel (nothing listens on port 1)
    assert _socks5_req(env, b"\x05\x01\x00\x01" + ip + struct.pack("!H", 1))[1] == 0x05
    # outside the tailnet with --non-tailnet refuse -> 0x02 not allowed
    assert _socks5_req(env, b"\x05\x01\x00\x01" + socket.inet_aton("192.0.2.1") + b"\x00\x50")[1] == 0x02
    # tunnel prefix but no route -> 0x04
    assert _socks5_req(env, b"\x05\x01\x00\x01" + socket.inet_aton("100.100.9.9") + b"\x00\x50")[1] == 0x04
    # BIND -> 0x07, unknown ATYP -> 0x08
    assert _socks5_req(env, b"\x05\x02\x00\x01" + ip + b"\x00\x50")[1] == 0x07
    assert _socks5_req(env, b"\x05\x01\x00\x09" + ip + b"\x00\x50")[1] == 0x08


def test_socks5_bound_address_and_ipv6_request(env):
    s = _raw(env)
    s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(TUN_IP) + struct.pack("!H", env.echo_port))
    assert _recv_exact(s, 2) == b"\x05\x00"
    rep = _recv_exact(s, 10)
    assert rep[:4] == b"\x05\x00\x00\x01"
    # the bound address is the upstream connection's local end (a real, nonzero port)
    assert socket.inet_ntoa(rep[4:8]) == "127.0.0.1" and struct.unpack("!H", rep[8:])[0] != 0
    s.sendall(b"x" * 1000)
    assert _recv_exact(s, 1000) == b"x" * 1000
    s.close()
    # IPv6 destination outside the tunnel: refused by policy with 0x02
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert _socks5_req(env, b"\x05\x01\x00\x04" + v6 + b"\x00\x50")[1] == 0x02


def test_socks5_udp_associate(env):
    base_fds, base_tasks = _fds(), env.task_count()
    s = _raw(env)
    s.sendall(b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    assert _recv_exact(s, 2) == b"\x05\x00"
    rep = _recv_exact(s, 10)
    assert rep[:4] == b"\x05\x00\x00\x01"
    relay_addr = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:])[0])
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    hdr = b"\x00\x00\x00\x01" + socket.inet_aton(TUN_IP) + struct.pack("!H", env.udp_port)
    u.sendto(b"\x00\x00\x01\x01" + hdr[4:] + b"fragment", relay_addr)    # FRAG != 0: dropped
    u.sendto(hdr + b"dns-ish query", relay_addr)
    data, _ = u.recvfrom(4096)
    assert data == hdr + b"echo:dns-ish query"
    # by name too
    u.sendto(b"\x00\x00\x00\x03\x03web" + struct.pack("!H", env.udp_port) + b"q2", relay_addr)
    data, _ = u.recvfrom(4096)
    assert data == hdr + b"echo:q2"
    s.close()                              # closing the control connection ends the association
    u.close()
    _settle(env, base_fds, base_tasks)


# ---- hostile clients ---------------------------------------------------------------------------

def _fds():
    return len(os.listdir("/proc/self/fd"))


def _closed_after(s, timeout=5) -> bytes:
    s.settimeout(timeout)
    out = b""
    try:
        while c := s.recv(65536):
            out += c
    except ConnectionResetError:
        pass
    return out


@pytest.mark.parametrize("payload,expect", [
    (b"\x05", b""),                                     # truncated greeting, then EOF
    (b"\x05\x00", b""),                                 # no methods
    (b"\x05\x01\x02", b"\x05\xff"),                     # only user/pass offered, no auth configured
    (b"\x05\x01\x00\x04\x01\x00\x01", b"\x05\x00"),     # wrong request version
    (b"\x04\x02\x00\x50\x01\x02\x03\x04\x00", b"\x00\x5b\x00\x00\x00\x00\x00\x00"),  # SOCKS4 BIND
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 400"),   # origin-form
    (b"BLAH\r\n\r\n", b"HTTP/1.1 400"),
    (b"GET http://web/ HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"HTTP/1.1 431"),
    (b"CONNECT nohostport HTTP/1.1\r\n\r\n", b"HTTP/1.1 400"),
    (b"CONNECT 192.0.2.1:443 HTTP/1.1\r\n\r\n", b"HTTP/1.1 403"),
])
def test_hostile_requests_answered_and_closed(env, payload, expect):
    base_fds, base_tasks = _fds(), env.task_count()
    s = _raw(env)
    try:
        s.sendall(payload)
    except ConnectionResetError:
        pass
    if payload == b"\x05":
        s.shutdown(socket.SHUT_WR)
    out = _closed_after(s)
    s.close()
    assert out.startswith(expect), out[:80]
    # the listener still serves others
    assert curl("--socks5-hostname", f"127.0.0.1:{env.port}", f"http://web:{env.web_port}/")[1] == PAGE
    _settle(env, base_fds, base_tasks)


def _settle(env, base_fds, base_tasks):
    import time
    for _ in range(50):
        if _fds() <= base_fds and env.task_count() <= base_tasks:
            return
        time.sleep(0.05)
    assert _fds() <= base_fds and env.task_count() <= base_tasks, (_fds(), base_fds, env.task_count(), base_tasks)


def test_slowloris_is_cut_by_handshake_timeout():
    e = Env(handshake_timeout=0.5)
    try:
        base_fds, base_tasks = _fds(), e.task_count()
        socks_slow, http_slow = _raw(e), _raw(e)
        socks_slow.sendall(b"\x05\x01")
        http_slow.sendall(b"GET http://web/ HTTP/1.1\r\nX: ")
        assert _closed_after(socks_slow) == b""
        assert _closed_after(http_slow).startswith(b"HTTP/1.1 408")
        assert e.proxy.counters["handshake_timeout"] == 2
        socks_slow.close()
        http_slow.close()
        _settle(e, base_fds, base_tasks)
    finally:
        e.close()


def test_client_vanishing_mid_transfer_closes_tunnel_side(env):
    base_fds, base_tasks = _fds(), env.task_count()
    for _ in range(5):
        s = _raw(env)
        s.sendall(b"GET http://web:%d/big HTTP/1.1\r\nHost: web\r\n\r\n" % env.web_port)
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()                                        # RST mid-download
        s = _raw(env)
        s.sendall(b"\x05\x01\x00\x05\x01\x00\x03\x03web" + struct.pack("!H", env.echo_port))
        _recv_exact(s, 12)
        s.sendall(b"y" * 100000)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    _settle(env, base_fds, base_tasks)


def test_separate_socks5_and_http_listeners():
    for kind, good, bad in (("socks5", "--socks5-hostname", "-x"), ("http", "-x", "--socks5-hostname")):
        e = Env(protocols=kind)
        try:
            url = f"http://web:{e.web_port}/"
            proxy = f"http://127.0.0.1:{e.port}" if good == "-x" else f"127.0.0.1:{e.port}"
            assert curl(good, proxy, url)[1] == PAGE
            proxy = f"http://127.0.0.1:{e.port}" if bad == "-x" else f"127.0.0.1:{e.port}"
            rc, out, err = curl(bad, proxy, url)
            # the other protocol's greeting is not answered: the listener just closes
            if kind == "socks5":
                assert (rc, out, err) == (52, b"", b"curl: (52) Empty reply from server\n")
            else:
                assert (rc, out, err) == (97, b"", b"curl: (97) connection to proxy closed\n")
        finally:
            e.close()


def test_pac_served_and_routes_tailnet_only(env):
    rc, out, err = curl(f"http://127.0.0.1:{env.port}/proxy.pac")
    assert rc == 0, err
    pac = out.decode()
    assert f"SOCKS5 127.0.0.1:{env.port}" in pac
    assert 'dnsDomainIs(host, ".tail.example")' in pac
    assert '"100.64.0.0", "255.192.0.0"' in pac


@pytest.mark.parametrize("payload,expect", [
    (b"\x05\x01\x02\x01\x05alice\x05wrong", b"\x05\x02\x01\x01"),         # bad password
    (b"\x05\x01\x02\x01\x03bob\x0as3cret pass", b"\x05\x02\x01\x01"),     # bad user
    (b"\x05\x01\x00", b"\x05\xff"),                                      # no-auth offered only
    (b"\x05\x01\x02\x02\x05alice", b"\x05\x02"),                         # wrong subnegotiation version
    (b"GET http://web/ HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6d3Jvbmc=\r\nConnection: close\r\n\r\n",
     b"HTTP/1.1 407 Proxy Authentication Required"),
])
def test_bad_auth_answered_and_closed(authenv, payload, expect):
    e = authenv
    base_fds, base_tasks = _fds(), e.task_count()
    s = _raw(e)
    s.sendall(payload)
    out = _closed_after(s)
    s.close()
    assert out.startswith(expect), out[:80]
    if expect.startswith(b"HTTP"):
        assert b'Proxy-Authenticate: Basic realm="tsproxy"' in out
    assert e.proxy.counters["auth_failed"] + e.proxy.counters["bad_request"] >= 1
    _settle(e, base_fds, base_tasks)


def _drip(s, data):
    import time
    for i in range(len(data)):
        s.sendall(data[i:i + 1])
        time.sleep(0.002)


def test_handshakes_byte_by_byte_and_pipelined(env):
    req = b"\x05\x01\x00\x05\x01\x00\x03\x03web" + struct.pack("!H", env.echo_port)
    s = _raw(env)
    _drip(s, req)
    assert _recv_exact(s, 12)[:4] == b"\x05\x00\x05\x00"
    s.sendall(b"after")
    assert _recv_exact(s, 5) == b"after"
    s.close()
    s = _raw(env)                                   # greeting + request + data in one segment
    s.sendall(req + b"pipelined")
    assert _recv_exact(s, 12 + 9)[12:] == b"pipelined"
    s.close()
    s = _raw(env)
    _drip(s, b"\x04\x01" + struct.pack("!H", env.echo_port) + b"\0\0\0\x01\0web\0")
    assert _recv_exact(s, 8)[:2] == b"\x00\x5a"
    s.close()
    s = _raw(env)
    _drip(s, b"GET http://web:%d/ HTTP/1.1\r\nHost: web\r\n\r\n" % env.web_port)
    s.sendall(b"GET http://web:%d/x HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n" % env.web_port)
    out = _closed_after(s)
    s.close()
    assert out.count(PAGE) == 2 and b"X-Seen-Path: /x" in out and out.count(b"HTTP/1.1 200") == 2


def test_non_tailnet_direct_policy_dials_from_the_host():
    e = Env(policy="direct")
    try:
        # 127.0.0.1 is not a tunnel address: with `direct` the host dials it itself
        rc, out, err = curl("--socks5", f"127.0.0.1:{e.port}", f"http://127.0.0.1:{e.web_port}/")
        assert rc == 0, err
        assert out == PAGE and e.tailnet.opened == 0 and e.dialer.counters["dial_direct"] == 1
        # a closed local port gives SOCKS5 0x05 connection refused
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        cport = closed.getsockname()[1]
        closed.close()
        assert _socks5_req(e, b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", cport))[1] == 0x05
    finally:
        e.close()


def test_http10_client_gets_dechunked_body_and_bad_upstream_gets_502(env):
    s = _raw(env)
    s.sendall(b"GET http://web:%d/chunked HTTP/1.0\r\n\r\n" % env.web_port)
    out = _closed_after(s)
    s.close()
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\r\n\r\nalpha-beta-gamma")
    assert b"Transfer-Encoding" not in out
    # the TCP echo "server" answers with our own request line: not a status line -> 502
    s = _raw(env)
    s.sendall(b"GET http://web:%d/ HTTP/1.1\r\nHost: web\r\n\r\n" % env.echo_port)
    assert _closed_after(s).startswith(b"HTTP/1.1 502")
    s.close()
