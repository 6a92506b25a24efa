"""Netmaps for the test control server: the full first message of a stream and the deltas after it.

`StreamView` remembers what one map stream was last sent and turns the registry's current
state into the smallest message that brings the client up to date, using every delta kind a
real server uses (PROTOCOL.md 3.7, 3.14, 3.17):

  new or reshaped peer        -> PeersChanged (full node)
  peer gone                   -> PeersRemoved
  endpoints/DERP/keys/expiry  -> PeersChangedPatch
  online flag / last seen     -> OnlineChange / PeerSeenChange
  self, filter, DNS, DERP map -> Node, PacketFilter, DNSConfig, DERPMap
"""

from __future__ import annotations

from datetime import datetime, timezone

from tsproxy.testing.control.registry import EXIT_ROUTES, NodeRecord, Registry

ZERO_TIME = "0001-01-01T00:00:00Z"
ALLOW_ALL = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]
_PATCH_FIELDS = {"Endpoints": "Endpoints", "HomeDERP": "DERPRegion", "DiscoKey": "DiscoKey",
                 "Key": "Key", "KeyExpiry": "KeyExpiry", "Cap": "Cap"}
_ONLINE_FIELDS = {"Online", "LastSeen"}
# Headscale patches endpoints and home DERP only; a new disco key or key is a full node
_HS_PATCH_FIELDS = {"Endpoints", "HomeDERP", "DERP"}


def format_time(t: float | None) -> str:
    if t is None:
        return ZERO_TIME
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_json(n: NodeRecord, reg: Registry | None = None, *, self_view: bool = False) -> dict:
    """The tailcfg.Node of `n` as its peers (or, with self_view, itself) see it.  AllowedIPs:
    its addresses, the subnets it is primary for, and 0.0.0.0/0 + ::/0 when it is an approved
    exit node (Headscale's tailNode)."""
    addrs = [n.ipv4 + "/32", n.ipv6 + "/128"]
    primary = reg.primary_routes(n.id) if reg is not None else \
        [r for r in n.effective_routes() if r not in EXIT_ROUTES]
    exit_routes = list(EXIT_ROUTES) if n.is_exit_node() else []
    out = {
        "ID": n.id, "StableID": n.stable_id, "Name": n.name, "User": n.user_id,
        "Key": n.node_key, "KeyExpiry": format_time(n.key_expiry), "Machine": n.machine,
        "DiscoKey": n.disco_key or "discokey:" + "0" * 64,
        "Addresses": addrs, "AllowedIPs": addrs + primary + exit_routes,
        "Endpoints": list(n.endpoints),
        "HomeDERP": n.home_derp, "Hostinfo": n.hostinfo or {"Hostname": n.hostname},
        "Created": format_time(n.created), "Cap": n.cap, "MachineAuthorized": True,
    }
    if n.tags:
        out["Tags"] = list(n.tags)
    if primary:
        out["PrimaryRoutes"] = primary
    if n.capabilities:
        out["Capabilities"] = list(n.capabilities)
    hs = reg is not None and reg.headscale
    if hs and n.home_derp:
        out["DERP"] = f"127.3.3.40:{n.home_derp}"        # Headscale 0.25-0.28 send both forms
    if not self_view:
        out["Online"] = n.online
        if not n.online and n.last_seen is not None:
            out["LastSeen"] = format_time(n.last_seen)
        if n.peer_caps:
            out["CapMap"] = dict(n.peer_caps)
    else:
        base = {"https://tailscale.com/cap/is-admin": None}
        if hs:
            base["https://tailscale.com/cap/ssh"] = None
        out["CapMap"] = {**base, **n.attrs}
    return out


class StreamView:
    """What one streaming client has been sent so far."""

    def __init__(self, node_id: int):
        self.node_id = node_id
        self.peers: dict[int, dict] = {}
        self.self_json: dict | None = None
        self.filter = None
        self.dns = None
        self.derp = None
        self.sent_full = False

    def _peer_jsons(self, reg: Registry) -> dict[int, dict]:
        return {nid: node_json(n, reg) for nid, n in sorted(reg.nodes.items())
                if nid != self.node_id}

    def full(self, reg: Registry, *, derp_map: dict, packet_filter: list, dns: dict,
             now: float) -> dict:
        me = reg.nodes[self.node_id]
        self.self_json = node_json(me, reg, self_view=True)
        self.peers = self._peer_jsons(reg)
        self.filter, self.dns, self.derp = packet_filter, dns, derp_map
        self.sent_full = True
        msg = {"Node": self.self_json, "DERPMap": derp_map, "Domain": reg.domain,
               "CollectServices": False, "DNSConfig": dns, "PacketFilter": packet_filter,
               "UserProfiles": list(reg.users.values()), "ControlTime": format_time(now)}
        if self.peers:
            msg["Peers"] = list(self.peers.values())
        return msg

    def delta(self, reg: Registry, *, derp_map: dict, packet_filter: list, dns: dict,
              now: float) -> dict | None:
        """The update since the last message, or None when nothing changed for this client."""
        me = reg.nodes.get(self.node_id)
        if me is None:
            return None
        msg: dict = {}
        sj = node_json(me, reg, self_view=True)
        if sj != self.self_json:
            msg["Node"] = self.self_json = sj
        if packet_filter != self.filter:
            msg["PacketFilter"] = self.filter = packet_filter
        if dns != self.dns:
            msg["DNSConfig"] = self.dns = dns
        if derp_map != self.derp:
            msg["DERPMap"] = self.derp = derp_map
        new = self._peer_jsons(reg)
        removed = [nid for nid in self.peers if nid not in new]
        changed, patches, online, seen = [], [], {}, {}
        for nid, pj in new.items():
            old = self.peers.get(nid)
            if old is None:
                changed.append(pj)
                continue
            diff = {k for k in set(old) | set(pj) if old.get(k) != pj.get(k)}
            if not diff:
                continue
            if diff <= _ONLINE_FIELDS:
                if "Online" in diff:
                    online[str(nid)] = bool(pj.get("Online"))
                if "LastSeen" in diff:
                    seen[str(nid)] = "LastSeen" in pj
            elif diff <= (_HS_PATCH_FIELDS if reg.headscale else set(_PATCH_FIELDS)):
                patch = {"NodeID": nid}
                for k in diff & set(_PATCH_FIELDS):       # (the legacy DERP string rides
                    patch[_PATCH_FIELDS[k]] = pj[k]       # along with DERPRegion)
                patches.append(patch)
            else:
                changed.append(pj)
        self.peers = new
        if removed:
            msg["PeersRemoved"] = removed
        if changed:
            msg["PeersChanged"] = changed
        if patches:
            msg["PeersChangedPatch"] = patches
        if online:
            msg["OnlineChange"] = online
        if seen:
            msg["PeerSeenChange"] = seen
        if not msg:
            return None
        msg["ControlTime"] = format_time(now)
        return msg
