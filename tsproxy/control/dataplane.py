"""Netmap -> data plane glue (PROTOCOL.md 3.18, issue #4 item 5), free of I/O.

apply_peer_diff() reconfigures a WireGuard device (the WgDevice shape of shared interface A,
duck-typed: control must not import wg) from diff_peers(); expired peers and peers with
neither disco key nor home DERP are already absent from NetMap.wireguard_peers(), so they are
removed here.  A key change is a remove + add.  Nothing is touched when the netmap did not
change the peer set, so a control outage (no new netmaps) never disturbs working tunnels.
"""

from __future__ import annotations

import ipaddress

from tsproxy.control.netmap import NetMap, PeerDiff


def apply_peer_diff(device, diff: PeerDiff, *, endpoint_for=None) -> None:
    """`endpoint_for(node)` returns the opaque endpoint for a peer (magicsock's per-peer
    object); None leaves it to be learned from authenticated packets."""
    for key in diff.removed:
        device.remove_peer(key)
    for node in diff.added:
        device.add_peer(node.key, allowed_ips=list(node.allowed_ips),
                        endpoint=endpoint_for(node) if endpoint_for else None)
    for node in diff.changed:
        ep = endpoint_for(node) if endpoint_for else None
        device.update_peer(node.key, allowed_ips=list(node.allowed_ips), endpoint=ep)


def tailnet_prefixes(nm: NetMap) -> list:
    """Every prefix the tailnet routes: our addresses and each usable peer's AllowedIPs,
    collapsed (for the dialer's tailnet-vs-internet decision)."""
    nets = list(nm.self_node.addresses)
    for node in nm.wireguard_peers().values():
        nets.extend(node.allowed_ips)
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    return list(ipaddress.collapse_addresses(v4)) + list(ipaddress.collapse_addresses(v6))
