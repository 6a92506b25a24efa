"""asyncio STUN helpers: region latency measurement for home-region choice (PROTOCOL.md 5.6, 6.6)."""
import asyncio
import os
import time

from tsproxy.disco import stun


class _StunProbe(asyncio.DatagramProtocol):
    def __init__(self, txid, fut):
        self.txid, self.fut = txid, fut

    def datagram_received(self, data, addr):
        r = stun.parse_response(data)
        if r is not None and r[0] == self.txid and not self.fut.done():
            self.fut.set_result(r[1])


async def measure_region_latency(region: dict, *, timeout: float = 3.0, clock=time.monotonic):
    """STUN round trip to the region's first STUN-capable node -> (seconds, reflexive addr), or
    (None, None). Falls back to HTTPS-ish latency (TCP connect) when STUN is disabled or silent."""
    loop = asyncio.get_running_loop()
    for node in region.get("Nodes", []):
        port = node.get("STUNPort", 0)
        ip = node.get("STUNTestIP") or (node.get("IPv4") if node.get("IPv4") not in (None, "", "none") else None)
        if port is not None and port < 0 or not ip:
            continue
        txid = os.urandom(12)
        fut = loop.create_future()
        tr, _ = await loop.create_datagram_endpoint(lambda: _StunProbe(txid, fut), remote_addr=(ip, port or 3478))
        try:
            t0 = clock()
            tr.sendto(stun.build_request(txid))
            try:
                addr = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                continue
            return clock() - t0, addr
        finally:
            tr.close()
    for node in region.get("Nodes", []):
        if node.get("STUNOnly"):
            continue
        host = node.get("IPv4") if node.get("IPv4") not in (None, "", "none") else node.get("HostName")
        port = node.get("DERPPort") or 443
        t0 = clock()
        try:
            async with asyncio.timeout(timeout):
                _, w = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            continue
        w.close()
        return clock() - t0, None
    return None, None
