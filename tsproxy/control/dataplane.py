"""Netmap -> data plane glue (PROTOCOL.md 3.18, issue #4 item 5), free of I/O.

apply_peer_diff() reconfigures a WireGuard device (the WgDevice shape of shared interface A,
duck-typed: control must not import wg) from diff_peers(); expired peers and peers with
neither disco key nor home DERP are already absent from NetMap.wireguard_peers(), so they are
removed here.  A key change is a remove + add.  Nothing is touched when the netmap did not
change the peer set, so a control outage (no new netmaps) never disturbs working tunnels.

peer_routes() decides which of a peer's AllowedIPs we route to it, as Go's wgcfg/nmcfg does: a
/0 (an exit node's default route) only when that peer is the selected exit node, a subnet route
(anything but the peer's own single addresses) only with accept_routes.  Copying AllowedIPs
verbatim would send every internet destination to the first exit node in the tailnet.
"""

from __future__ import annotations

import ipaddress

from tsproxy.control.netmap import NetMap, PeerDiff


def _is_exit_node(node, exit_node) -> bool:
    return exit_node is not None and exit_node in (node.stable_id, node.id) and exit_node != ""


def peer_routes(node, *, exit_node=None, accept_routes: bool = False) -> list:
    """The prefixes of `node.allowed_ips` that go into WireGuard and routing.

    `exit_node` is the selected exit node's StableID (or NodeID), None for none."""
    own = set(node.addresses)
    out = []
    for p in node.allowed_ips:
        if p.prefixlen == 0:
            if not _is_exit_node(node, exit_node):
                continue
        elif p not in own or p.num_addresses != 1:     # a subnet route (Go cidrIsSubnet)
            if not accept_routes:
                continue
        out.append(p)
    return out


def apply_peer_diff(device, diff: PeerDiff, *, endpoint_for=None, exit_node=None,
                    accept_routes: bool = False, routes: dict | None = None) -> None:
    """`endpoint_for(node)` returns the opaque endpoint for a peer (magicsock's per-peer
    object); None leaves it to be learned from authenticated packets.  `routes` (node key ->
    prefixes, from control.routing.assign_routes) overrides the per-node peer_routes rule, so
    subnets two peers claim are given to one of them only."""
    def allowed(node):
        if routes is not None:
            return routes.get(node.key, [])
        return peer_routes(node, exit_node=exit_node, accept_routes=accept_routes)

    for key in diff.removed:
        device.remove_peer(key)
    for node in diff.added:
        device.add_peer(node.key, allowed_ips=allowed(node),
                        endpoint=endpoint_for(node) if endpoint_for else None)
    for node in diff.changed:
        ep = endpoint_for(node) if endpoint_for else None
        device.update_peer(node.key, allowed_ips=allowed(node), endpoint=ep)


def apply_routes(device, routes: dict) -> int:
    """Give every device peer the prefixes `routes` (node key -> prefixes) names, where they
    differ from what it has: a new exit node selection or --accept-routes takes effect without
    waiting for a netmap that changes the peer.  Returns how many peers changed."""
    current = {p["public_key"]: p["allowed_ips"] for p in device.peer_status()}
    changed = 0
    for key, prefixes in routes.items():
        if key not in device.peers:
            continue
        if sorted(current.get(key.b64(), [])) != sorted(str(p) for p in prefixes):
            device.update_peer(key, allowed_ips=list(prefixes))
            changed += 1
    return changed


def tailnet_prefixes(nm: NetMap, *, exit_node=None, accept_routes: bool = False) -> list:
    """Every prefix the tailnet routes: our addresses and each usable peer's routes as
    peer_routes() decides, collapsed (for the dialer's tailnet-vs-internet decision)."""
    nets = list(nm.self_node.addresses)
    for node in nm.wireguard_peers().values():
        nets.extend(peer_routes(node, exit_node=exit_node, accept_routes=accept_routes))
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    return list(ipaddress.collapse_addresses(v4)) + list(ipaddress.collapse_addresses(v6))
