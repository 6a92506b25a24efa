"""Forward/reverse spec parsing, and TCP/UDP local forwards and reverse forwards on loopback
(the tunnel side is the loopback-backed NetstackRuntime stand-in of test_proxy_loopback)."""

import asyncio
import socket

import pytest

from tests.integration.test_proxy_loopback import TUN_IP, LoopbackTailnet, _echo, _UdpEcho
from tsproxy.errors import ConfigError
from tsproxy.proxy.aio.dialer import Dialer
from tsproxy.proxy.aio.forward import ForwardServer
from tsproxy.proxy.aio.reverse import ReverseForward
from tsproxy.proxy.specs import parse_forward, parse_reverse

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("text,expect", [
    ("16579:peer-a:22", ("tcp", "127.0.0.1", 16579, "peer-a", 22)),
    ("udp:5353:100.64.0.2:53", ("udp", "127.0.0.1", 5353, "100.64.0.2", 53)),
    ("0.0.0.0:8080:[fd7a:115c:a1e0::2]:80", ("tcp", "0.0.0.0", 8080, "fd7a:115c:a1e0::2", 80)),
    ("TCP:0:Peer.Tunnel.Test.:443", ("tcp", "127.0.0.1", 0, "peer.tunnel.test", 443)),
])
def test_parse_forward(text, expect):
    s = parse_forward(text)
    assert (s.proto, s.listen_host, s.listen_port, s.host, s.port) == expect


@pytest.mark.parametrize("text", ["", "80", "80:host", "x:host:80", "80:host:0", "80:host:65536",
                                  "80:ho st:22", "80:[::1:22", "1.2.3:80:h:22", "a:b:c:d:e", "udp:80::53"])
def test_parse_forward_rejects_with_one_line(text):
    with pytest.raises(ConfigError) as e:
        parse_forward(text)
    assert "\n" not in str(e.value)


def test_parse_reverse():
    r = parse_reverse("8022:127.0.0.1:22")
    assert (r.tunnel_port, r.local_host, r.local_port, r.proto) == (8022, "127.0.0.1", 22, "tcp")
    r = parse_reverse("udp:53:127.0.0.1:5353")
    assert (r.tunnel_port, r.local_port, r.proto) == (53, 5353, "udp")
    for bad in ("8022:127.0.0.1", "0:127.0.0.1:22", "8022:127.0.0.1:x", "a:b:c:d", "udp:53:127.0.0.1"):
        with pytest.raises(ConfigError):
            parse_reverse(bad)


async def test_tcp_and_udp_forwards_through_the_dialer():
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    eport = echo.sockets[0].getsockname()[1]
    udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    uport = udp.get_extra_info("sockname")[1]
    tailnet = LoopbackTailnet()
    dialer = Dialer(tailnet, names={"peer": [TUN_IP]}, tunnel_prefixes=["100.64.0.0/10"], policy="refuse")
    tcp_fw = ForwardServer(dialer, parse_forward(f"0:peer:{eport}"))
    udp_fw = ForwardServer(dialer, parse_forward(f"udp:0:{TUN_IP}:{uport}"))
    bad_fw = ForwardServer(dialer, parse_forward("0:192.0.2.1:80"))      # outside + refuse
    for f in (tcp_fw, udp_fw, bad_fw):
        await f.start()
    try:
        r, w = await asyncio.open_connection(*tcp_fw.bound)
        w.write(b"through the forward" * 1000)
        w.write_eof()
        assert await r.read() == b"through the forward" * 1000
        w.close()
        assert tailnet.opened == 1

        r, w = await asyncio.open_connection(*bad_fw.bound)
        assert await asyncio.wait_for(r.read(), 5) == b""                 # closed, nothing else
        w.close()

        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(s, b"dgram", udp_fw.bound)
        data = await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
        assert data == b"echo:dgram"
        s.close()
    finally:
        for f in (tcp_fw, udp_fw, bad_fw):
            await f.aclose()
        echo.close()
        udp.close()


class _ServerNetstack:
    """start_server(port, cb) like NetstackRuntime: the 'tunnel' side listens on loopback."""

    async def start_server(self, port, cb):
        self.server = await asyncio.start_server(cb, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.server


async def test_reverse_forward_connects_tunnel_clients_to_local_service():
    local = await asyncio.start_server(_echo, "127.0.0.1", 0)
    lport = local.sockets[0].getsockname()[1]
    ns = _ServerNetstack()
    rev = ReverseForward(ns, parse_reverse(f"8022:127.0.0.1:{lport}"))
    await rev.start()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", ns.port)
        w.write(b"from the tailnet")
        w.write_eof()
        assert await r.read() == b"from the tailnet"
        w.close()
        assert rev.stats["connections"] == 1
        local.close()
        await local.wait_closed()
        r, w = await asyncio.open_connection("127.0.0.1", ns.port)
        assert await asyncio.wait_for(r.read(), 5) == b""          # local service gone: closed
        w.close()
        assert rev.stats["failures"] == 1
    finally:
        await rev.aclose()
