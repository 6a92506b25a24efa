"""The servers that run behind test peers, exercised on loopback with ephemeral ports."""

import asyncio
import hashlib
import struct

import pytest

from tsproxy.testing import servers

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def srv():
    handles, ports = await servers.start_servers(
        ["127.0.0.1"], "unit", {"peer.tunnel.test": ["100.64.0.2", "fd7a:115c:a1e0::2"]},
        ports={k: 0 for k in servers.DEFAULT_PORTS})
    yield ports
    for h in handles:
        h.close()


async def http(port, request: bytes) -> tuple[bytes, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request)
    await w.drain()
    data = await r.read(-1)
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_pattern_is_deterministic_and_sized():
    a = b"".join(servers.pattern_chunks(1_000_003, chunk=4096))
    b = b"".join(servers.pattern_chunks(1_000_003))
    assert a == b and len(a) == 1_000_003
    assert servers.pattern_sha256(1_000_003) == hashlib.sha256(a).hexdigest()
    assert b"".join(servers.pattern_chunks(1000)) != a[:1000]   # seeded by N


async def test_http_root_bytes_404(srv):
    head, body = await http(srv["http"], b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello from unit\n"
    n = 300_001
    head, body = await http(srv["http"], b"GET /bytes/%d HTTP/1.1\r\nConnection: close\r\n\r\n" % n)
    assert b"Content-Length: %d" % n in head
    assert body == b"".join(servers.pattern_chunks(n))
    head, body = await http(srv["http"], b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")


async def test_http_keepalive_two_requests(srv):
    r, w = await asyncio.open_connection("127.0.0.1", srv["http"])
    w.write(b"GET /bytes/10 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    data = await r.read(-1)
    w.close()
    assert data.count(b"HTTP/1.1 200") == 2
    assert b"".join(servers.pattern_chunks(10)) in data and data.endswith(b"hello from unit\n")


async def test_upload_sha256_content_length_and_chunked(srv):
    payload = bytes(range(256)) * 4000
    want = f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
    _, body = await http(srv["http"], b"POST /upload HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(payload) + payload)
    assert body == want
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (payload[:1000], payload[1000:])) + b"0\r\n\r\n"
    _, body = await http(srv["http"], b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n" + chunked)
    assert body == want


async def test_garbage_http_closes_without_killing_server(srv):
    _, body = await http(srv["http"], b"\xff\xfegarbage\r\n\r\n")
    assert body == b""
    head, body = await http(srv["http"], b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert body == b"hello from unit\n"


async def test_tcp_echo_half_close_and_discard(srv):
    r, w = await asyncio.open_connection("127.0.0.1", srv["echo"])
    msg = bytes(range(256)) * 1000
    w.write(msg)
    w.write_eof()
    assert await r.read(-1) == msg
    w.close()
    r, w = await asyncio.open_connection("127.0.0.1", srv["discard"])
    w.write(msg)
    w.write_eof()
    assert await asyncio.wait_for(r.read(-1), 10) == b""
    w.close()


class _Client(asyncio.DatagramProtocol):
    def __init__(self):
        self.q = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.q.put_nowait(data)


async def _udp(port, payloads):
    loop = asyncio.get_running_loop()
    tr, proto = await loop.create_datagram_endpoint(_Client, remote_addr=("127.0.0.1", port))
    out = []
    try:
        for p in payloads:
            tr.sendto(p)
            try:
                out.append(await asyncio.wait_for(proto.q.get(), 1.0))
            except asyncio.TimeoutError:
                out.append(None)
    finally:
        tr.close()
    return out


def dns_query(name: str, qtype: int, txid: int = 0x1234) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


async def test_udp_echo(srv):
    assert await _udp(srv["udp_echo"], [b"a", b"x" * 1400]) == [b"a", b"x" * 1400]


async def test_dns_a_aaaa_nxdomain_and_garbage(srv):
    a, aaaa, nx, garbage, after = await _udp(srv["dns"], [
        dns_query("Peer.Tunnel.Test", 1), dns_query("peer.tunnel.test", 28, 7),
        dns_query("other.test", 1), b"\x00\x01\x02", dns_query("peer.tunnel.test", 1, 9)])
    txid, flags, qd, an = struct.unpack_from("!HHHH", a)
    assert (txid, flags & 0xF, an) == (0x1234, 0, 1) and a.endswith(bytes([100, 64, 0, 2]))
    assert struct.unpack_from("!HHHH", aaaa)[::3] == (7, 1)
    assert aaaa.endswith(bytes.fromhex("fd7a115ca1e00000000000000000" "0002"))
    assert struct.unpack_from("!HH", nx)[1] & 0xF == 3
    assert garbage is None                      # dropped, and the responder still answers:
    assert after is not None and struct.unpack_from("!H", after)[0] == 9
