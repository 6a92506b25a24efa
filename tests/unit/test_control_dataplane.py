"""Netmap diffs applied to a real WgDevice: routes appear, change and disappear."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tsproxy.control import messages as msg
from tsproxy.control.dataplane import apply_peer_diff, tailnet_prefixes
from tsproxy.control.netmap import MapSession, diff_peers
from tsproxy.keys import DiscoPrivate, NodePrivate
from tsproxy.wg.device import WgDevice

pytestmark = pytest.mark.timeout(30)
NOW = 1_760_000_000.0
K = [NodePrivate(bytes([i]) * 32).public() for i in range(1, 6)]
D = DiscoPrivate(bytes([77]) * 32).public()


def node(i, ip, **kw):
    n = {"ID": i, "Name": f"n{i}.t.ts.net.", "Key": K[i].text(), "DiscoKey": D.text(),
         "Addresses": [f"100.64.0.{ip}/32"], "HomeDERP": 1, "MachineAuthorized": True}
    n.update(kw)
    return n


def ipv4_packet(dst: str) -> bytes:
    src = ipaddress.ip_address("100.64.0.1").packed
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, src,
                      ipaddress.ip_address(dst).packed)
    return hdr + bytes(8)


def apply(session, obj):
    return session.apply(msg.parse_map_response(obj), NOW)


def test_diffs_drive_wireguard_routes():
    dev = WgDevice(NodePrivate(bytes([99]) * 32), now=NOW)
    s = MapSession()
    nm1 = apply(s, {"Node": node(1, 1), "Peers": [node(2, 2), node(3, 3)]})
    apply_peer_diff(dev, diff_peers(None, nm1))
    assert set(dev.peers) == {K[2], K[3]}
    assert dev.send_packet(ipv4_packet("100.64.0.2"), NOW)
    assert not dev.send_packet(ipv4_packet("10.9.9.9"), NOW)

    # peer 3 gains a subnet route; peer 2 expires; peer 4 joins
    nm2 = apply(s, {"PeersChanged": [
        node(3, 3, AllowedIPs=["100.64.0.3/32", "10.9.9.0/24"]),
        node(2, 2, KeyExpiry="2000-01-01T00:00:00Z"), node(4, 4)]})
    d = diff_peers(nm1, nm2)
    apply_peer_diff(dev, d, accept_routes=True)
    assert set(dev.peers) == {K[3], K[4]}
    assert dev.send_packet(ipv4_packet("10.9.9.9"), NOW)
    assert not dev.send_packet(ipv4_packet("100.64.0.2"), NOW)
    status = {p["public_key"]: p for p in dev.peer_status()}
    assert status[K[3].b64()]["allowed_ips"] == ["100.64.0.3/32", "10.9.9.0/24"]
    assert [str(p) for p in tailnet_prefixes(nm2, accept_routes=True)] == \
        ["10.9.9.0/24", "100.64.0.1/32", "100.64.0.3/32", "100.64.0.4/32"]

    # no change -> nothing to do
    nm3 = apply(s, {"OnlineChange": {"3": True}})
    d = diff_peers(nm2, nm3)
    assert (d.added, d.changed, d.removed) == ([], [], [])
