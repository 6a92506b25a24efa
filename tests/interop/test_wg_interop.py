"""Our WgDevice + wg/aio.py (root namespace) against a real wireguard-go peer in a namespace:
handshake, hand-built ICMP/ICMPv6 echo through the tunnel, `wg show` on the peer agrees."""

import asyncio
import ipaddress
import os
import struct

import pytest

from tsproxy.testing.wgpeer import CLIENT_IP4, CLIENT_IP6, PEER_IP4, PEER_IP6, WG_PORT
from tsproxy.wg.aio import WgUdpTransport
from tsproxy.wg.device import WgDevice

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmp4_echo(src: str, dst: str, ident: int, seq: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0x1234, 0, 64, 1, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + icmp


def icmp6_echo(src: str, dst: str, ident: int, seq: int, payload: bytes) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    icmp = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + payload
    pseudo = s + d + struct.pack("!I3xB", len(icmp), 58)
    icmp = icmp[:2] + struct.pack("!H", _csum(pseudo + icmp)) + icmp[4:]
    return struct.pack("!IHBB", 0x60000000, len(icmp), 58, 64) + s + d + icmp


def parse_echo_reply(pkt: bytes):
    """(src, type, ident, seq, payload) of an ICMP/ICMPv6 echo reply, else None."""
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 15) * 4
        if pkt[9] != 1 or _csum(pkt[ihl:]) != 0:
            return None
        t, _, _, ident, seq = struct.unpack_from("!BBHHH", pkt, ihl)
        return str(ipaddress.IPv4Address(pkt[12:16])), t, ident, seq, pkt[ihl + 8:]
    if pkt[0] >> 4 == 6 and pkt[6] == 58:
        body = pkt[40:]
        pseudo = pkt[8:40] + struct.pack("!I3xB", len(body), 58)
        if _csum(pseudo + body) != 0:
            return None
        t, _, _, ident, seq = struct.unpack_from("!BBHHH", body)
        return str(ipaddress.IPv6Address(pkt[8:24])), t, ident, seq, body[8:]
    return None


async def _ping_through(peer, packets_and_expect, psk=None):
    loop = asyncio.get_running_loop()
    dev = WgDevice(peer.client_key, now=loop.time())
    dev.add_peer(peer.key.public(), endpoint=(str(peer.veth_ip), WG_PORT), preshared_key=psk,
                 allowed_ips=[ipaddress.ip_network("100.64.0.0/10"),
                              ipaddress.ip_network("fd7a:115c:a1e0::/48")])
    got: asyncio.Queue = asyncio.Queue()
    transport = await WgUdpTransport.create(dev, host=peer.root_ip,
                                            on_packets=lambda pkts: [got.put_nowait(p) for p in pkts])
    try:
        replies = []
        for pkt, expect in packets_and_expect:
            transport.send_packets([pkt])
            while True:
                reply = parse_echo_reply(await asyncio.wait_for(got.get(), 10))
                if reply is not None:
                    break
            assert reply == expect
            replies.append(reply)
        return dev, transport.port, replies
    finally:
        await transport.aclose()


def test_handshake_and_icmp_echo_v4_v6(wg_peer):
    payload4, payload6 = os.urandom(56), os.urandom(1000)
    cases = [
        (icmp4_echo(CLIENT_IP4, PEER_IP4, 0x4242, 1, payload4), (PEER_IP4, 0, 0x4242, 1, payload4)),
        (icmp6_echo(CLIENT_IP6, PEER_IP6, 0x4343, 2, payload6), (PEER_IP6, 129, 0x4343, 2, payload6)),
    ]
    dev, port, replies = asyncio.run(_ping_through(wg_peer, cases))
    assert len(replies) == 2
    assert dev.counters["handshake_completed"] >= 1
    assert dev.counters["rx_data"] >= 2
    status = dev.peer_status()[0]
    assert status["last_handshake"] is not None and status["rx_bytes"] > 0 and status["tx_bytes"] > 0
    ours = wg_peer.client_key.public().b64()
    dump = {p["public_key"]: p for p in wg_peer.wg_dump()}
    assert ours in dump, dump
    assert dump[ours]["latest_handshake"] > 0
    assert dump[ours]["endpoint"] == f"{wg_peer.root_ip}:{port}"
    assert dump[ours]["rx"] > 0 and dump[ours]["tx"] > 0


def test_preshared_key_handshake_with_wireguard_go(wg_peer):
    """Runs after the test above: a fresh device with a PSK both sides know."""
    psk = os.urandom(32)
    wg_peer.set_psk(psk)
    payload = os.urandom(100)
    case = [(icmp4_echo(CLIENT_IP4, PEER_IP4, 0x5151, 3, payload), (PEER_IP4, 0, 0x5151, 3, payload))]
    dev, _port, replies = asyncio.run(_ping_through(wg_peer, case, psk=psk))
    assert len(replies) == 1 and dev.counters["handshake_completed"] == 1


def test_wrong_preshared_key_never_completes(wg_peer):
    wg_peer.set_psk(os.urandom(32))

    async def main():
        loop = asyncio.get_running_loop()
        dev = WgDevice(wg_peer.client_key, now=loop.time())
        dev.add_peer(wg_peer.key.public(), endpoint=(str(wg_peer.veth_ip), WG_PORT),
                     preshared_key=os.urandom(32), allowed_ips=[ipaddress.ip_network("100.64.0.0/10")])
        got = []
        t = await WgUdpTransport.create(dev, host=wg_peer.root_ip, on_packets=got.extend)
        try:
            t.send_packets([icmp4_echo(CLIENT_IP4, PEER_IP4, 1, 1, b"x" * 8)])
            # Observed: right after the earlier tests' sessions wireguard-go sometimes leaves the
            # first initiation unanswered (cause not found); our REKEY_TIMEOUT retransmit (5 s)
            # then gets the response, so allow for one retransmission.
            for _ in range(1300):
                if dev.counters["handshake_decrypt_failed"]:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            return dev, got
        finally:
            await t.aclose()

    dev, got = asyncio.run(main())
    assert dev.counters["rx_response"] >= 1, dev.counters  # wireguard-go answered ...
    assert dev.counters["handshake_decrypt_failed"] >= 1  # ... and the response did not open
    assert dev.counters["handshake_completed"] == 0 and got == []
