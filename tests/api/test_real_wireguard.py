"""Node(wg_config=...) against the real wireguard-go peer (root, namespaces; fixture wg_peer)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

import tsproxy
from tsproxy.testing.servers import pattern_chunks, pattern_sha256
from tsproxy.testing.wgpeer import DNS_NAME, PEER_IP4

pytestmark = pytest.mark.interop
MB = 1_000_000


async def _http(node, host, request: bytes, body=None) -> bytes:
    reader, writer = await node.open_connection(host, 80, timeout=30)
    writer.write(request)
    if body is not None:
        for chunk in body:
            writer.write(chunk)
            await writer.drain()
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def test_wg_config_node_moves_100mb_both_ways(wg_peer):
    async with tsproxy.Node(wg_config=wg_peer.client_conf(dns=True)) as node:
        await node.wait_running(10)
        assert node.state == "Running" and node.status()["mode"] == "wireguard"
        size = 100 * MB
        reader, writer = await _http(node, PEER_IP4,
                                     f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        h, n = hashlib.sha256(), 0
        while chunk := await reader.read(256 * 1024):
            h.update(chunk)
            n += len(chunk)
        writer.close()
        assert n == size and h.hexdigest() == pattern_sha256(size)
        # upload, to the peer by the name its DNS server (reached over the tunnel) gives
        reader, writer = await _http(
            node, DNS_NAME,
            f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode(),
            body=pattern_chunks(size))
        assert (await reader.read()).decode().split() == [pattern_sha256(size), str(size)]
        writer.close()


async def test_wg_config_node_udp_echo_and_refusal(wg_peer, tmp_path):
    path = tmp_path / "wg0.conf"
    path.write_text(wg_peer.client_conf())
    async with tsproxy.Node(wg_config=str(path)) as node:
        udp = await node.open_udp()
        for attempt in range(10):
            await udp.sendto(b"echo me", (PEER_IP4, 7))
            try:
                data, addr = await asyncio.wait_for(udp.recvfrom(), 2)
                break
            except TimeoutError:
                continue
        assert data == b"echo me" and addr == (PEER_IP4, 7)
        with pytest.raises(tsproxy.errors.NotAllowed):
            await node.open_connection("127.0.0.1", 80)     # not in AllowedIPs: refused, not dialed
        port = node.status()["wireguard_port"]
        assert isinstance(port, int) and port > 0
    assert node.status()["state"] == "Stopped" and node.status()["wireguard_port"] is None
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))                  # the node freed its WireGuard port
    s.close()
