"""Client-side netmap state for one map stream (PROTOCOL.md 3.7, 3.14, 3.18) and its products.

MapSession.apply(msg, now) merges one MapResponse in Go's order:
    self Node -> Peers (full replace, then stop) | PeersRemoved -> PeersChanged ->
    PeerSeenChange -> OnlineChange -> PeersChangedPatch -> DERPMap, DNS, filters, the rest
and returns a NetMap snapshot.  A new stream starts a new MapSession (the first message of
every stream is a full map).  The NetMap has what the data plane needs: WireGuard peers
(expired peers and peers with neither disco key nor home DERP skipped), our addresses,
MagicDNS names, split-DNS routes, packet filter, DERP map.  diff_peers() tells the daemon
which WireGuard peers to add, update and remove.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, field

from tsproxy.control.filter import PacketFilter
from tsproxy.control.messages import DERPMap, DNSConfig, MapResponse, Node
from tsproxy.errors import RemoteProtocolError

ONLY_TCP_443 = "only-tcp-443"
# Node attributes (self CapMap keys) tsproxy acts on, and those it knows and leaves alone
# because they concern what it does not have (SSH, Taildrop, auto-update, the OS resolver and
# hosts file, Linux firewall rules, Android, Go runtime metrics, netmap caching, UPnP...;
# docs/protocol-notes.md).  Anything else is unknown: ignored, counted, logged once.
HANDLED_NODE_ATTRS = frozenset({ONLY_TCP_443})
KNOWN_NOOP_NODE_ATTRS = frozenset({
    "https://tailscale.com/cap/is-admin", "https://tailscale.com/cap/is-owner",
    "https://tailscale.com/cap/ssh", "https://tailscale.com/cap/file-sharing",
    "https://tailscale.com/cap/tailnet-lock", "https", "funnel",
    "default-auto-update",                       # 131
    "disable-hosts-file-updates",                # 132
    "force-register-magicdns-ipv4-only",         # 133
    "disable-android-bind-to-active-network",    # 134
    "cache-network-maps", "disable-cache-network-maps",   # 135
    "disable-linux-cgnat-drop-rule",             # 136
    "emit-runtime-metrics",                      # 139
    "debug-disable-upnp", "disable-captive-portal-detection", "linux-netfilter?v=iptables",
    "linux-netfilter?v=nftables", "suggest-exit-node", "disable-web-client",
})


def unknown_node_attrs(cap_map: dict) -> list[str]:
    """Self CapMap keys tsproxy neither acts on nor knowingly ignores."""
    return sorted(k for k in cap_map if k not in HANDLED_NODE_ATTRS
                  and k not in KNOWN_NOOP_NODE_ATTRS)


@dataclass
class NetMap:
    self_node: Node
    peers: dict                         # id -> Node (all known, including expired)
    derp_map: DERPMap
    dns: DNSConfig
    domain: str
    filter_rules: list                  # concatenated raw FilterRules
    packet_filter: PacketFilter
    user_profiles: dict
    control_time: float | None
    names: dict = field(default_factory=dict)   # lower-case name -> [ip addresses]

    @property
    def addresses(self) -> list:
        return [p.network_address for p in self.self_node.addresses]

    @property
    def magicdns_suffix(self) -> str:
        name = self.self_node.name.rstrip(".")
        return name.split(".", 1)[1] if "." in name else ""

    def has_cap(self, cap: str) -> bool:
        """A node attribute of ours (self CapMap, e.g. "only-tcp-443")."""
        return cap in self.self_node.cap_map

    @property
    def only_tcp_443(self) -> bool:
        """Go nodecap.OnlyTCP443: no outbound traffic but TCP to port 443, so no UDP at all
        (no STUN, no direct paths): everything goes over DERP."""
        return self.has_cap(ONLY_TCP_443)

    def wireguard_peers(self) -> dict:
        """Peers for the WireGuard device: node key -> Node (PROTOCOL.md 3.18)."""
        out = {}
        for p in self.peers.values():
            if p.key is None or p.expired:
                continue
            if p.disco_key is None and not p.home_derp and not p.is_wireguard_only:
                continue
            out[p.key] = p
        return out

    def split_dns_routes(self) -> dict:
        return dict(self.dns.routes)

    def resolve(self, name: str) -> list:
        return self.names.get(name.rstrip(".").lower(), [])


@dataclass
class PeerDiff:
    added: list          # Nodes
    changed: list        # Nodes whose WireGuard-relevant fields changed
    removed: list        # NodePublic keys


def _wg_view(n: Node):
    return (tuple(map(str, n.allowed_ips)), n.disco_key, n.home_derp, tuple(n.endpoints))


def diff_peers(old: NetMap | None, new: NetMap) -> PeerDiff:
    before = old.wireguard_peers() if old is not None else {}
    after = new.wireguard_peers()
    added = [n for k, n in after.items() if k not in before]
    changed = [n for k, n in after.items() if k in before and _wg_view(before[k]) != _wg_view(n)]
    removed = [k for k in before if k not in after]
    return PeerDiff(added, changed, removed)


class MapSession:
    """State of one long-poll stream."""

    def __init__(self):
        self.self_node: Node | None = None
        self.peers: dict[int, Node] = {}
        self.derp = DERPMap()
        self.dns = DNSConfig()
        self.domain = ""
        self.filters: dict[str, list] = {}
        self.user_profiles: dict[int, dict] = {}
        self.control_time: float | None = None
        self.clock_delta = 0.0            # control time - local time, for expiry checks
        self.collect_services: bool | None = None
        self.messages = 0

    def apply(self, m: MapResponse, now: float) -> NetMap | None:
        """Merge one message; returns the new NetMap, or None for a pure keep-alive.
        Raises RemoteProtocolError (and changes nothing) if the first real message lacks Node."""
        if m.control_time is not None:
            self.control_time = m.control_time
            self.clock_delta = m.control_time - now
        if m.keep_alive:
            return None
        if self.self_node is None and m.node is None:
            raise RemoteProtocolError("initial MapResponse lacked Node")
        self.messages += 1
        if m.node is not None:
            self.self_node = m.node
        self._apply_peers(m, now)
        if m.derp_present:
            if m.derp_regions is not None:
                self.derp.regions = m.derp_regions
            if m.derp_home_params is not None:
                self.derp.home_params = m.derp_home_params
        if m.dns_config is not None:
            self.dns = m.dns_config
        if m.domain:
            self.domain = m.domain
        if m.packet_filter is not None:
            self.filters["base"] = m.packet_filter
        if m.packet_filters is not None:
            if "*" in m.packet_filters and m.packet_filters["*"] is None:
                self.filters.clear()
            for k, v in m.packet_filters.items():
                if k == "*" and v is None:
                    continue
                if v is None:
                    self.filters.pop(k, None)
                else:
                    self.filters[k] = v
        for u in m.user_profiles or ():
            uid = u.get("ID")
            if isinstance(uid, int):
                self.user_profiles[uid] = u
        if m.collect_services is not None:
            self.collect_services = m.collect_services
        return self.netmap(now)

    def _apply_peers(self, m: MapResponse, now: float) -> None:
        if m.peers:                                   # full replacement; deltas ignored
            self.peers = {p.id: p for p in m.peers}
            return
        for nid in m.peers_removed or ():
            self.peers.pop(nid, None)
        for p in m.peers_changed or ():
            self.peers[p.id] = p
        for nid, seen in (m.peer_seen_change or {}).items():
            p = self.peers.get(nid)
            if p is not None:
                p.last_seen = now + self.clock_delta if seen else None
        for nid, online in (m.online_change or {}).items():
            p = self.peers.get(nid)
            if p is not None:
                p.online = online
        for c in m.peers_changed_patch or ():
            p = self.peers.get(c.node_id)
            if p is None:
                continue                              # unknown IDs are ignored
            if c.derp_region is not None:
                p.home_derp = c.derp_region
            if c.cap is not None:
                p.cap = c.cap
            if c.cap_map is not None:
                p.cap_map = c.cap_map
            if c.endpoints is not None:
                p.endpoints = c.endpoints
            if c.key is not None:
                p.key = c.key
            if c.disco_key is not None:
                p.disco_key = c.disco_key
            if c.online is not None:
                p.online = c.online
            if c.last_seen is not None:
                p.last_seen = c.last_seen
            if c.key_expiry_set:
                p.key_expiry = c.key_expiry      # None: the zero time, "never expires"

    def netmap(self, now: float) -> NetMap:
        adjusted = now + self.clock_delta
        peers = {}
        for nid, p in sorted(self.peers.items()):
            q = copy.copy(p)
            if q.key_expiry is not None and q.key_expiry <= adjusted:
                q.expired = True
                q.endpoints = []
                q.home_derp = 0
            peers[nid] = q
        rules = [r for k in sorted(self.filters) for r in self.filters[k]]
        nm = NetMap(self_node=self.self_node, peers=peers, derp_map=copy.deepcopy(self.derp),
                    dns=self.dns, domain=self.domain, filter_rules=rules,
                    packet_filter=PacketFilter(rules), user_profiles=dict(self.user_profiles),
                    control_time=self.control_time)
        nm.names = build_names(nm)
        return nm

    def self_expired(self, now: float) -> bool:
        n = self.self_node
        return n is not None and n.key_expiry is not None and n.key_expiry <= now + self.clock_delta


def build_names(nm: NetMap) -> dict:
    """MagicDNS map (PROTOCOL.md 8.1): full and short names -> addresses, plus ExtraRecords."""
    suffix = nm.magicdns_suffix
    self_has_v4 = any(a.version == 4 for a in nm.addresses)
    names: dict[str, list] = {}

    def add(node: Node, addrs):
        if not node.name or not addrs:
            return
        full = node.name.rstrip(".").lower()
        names.setdefault(full, list(addrs))
        names.setdefault(node.short_name(suffix).lower(), list(addrs))

    add(nm.self_node, nm.addresses)
    for p in nm.peers.values():
        if p.expired:
            continue
        addrs = [a.network_address for a in p.addresses]
        if not self_has_v4:
            addrs = [a for a in addrs if a.version == 6]
        # first address first (normally the IPv4 100.x), the rest after it
        add(p, addrs)
    for name, typ, value in nm.dns.extra_records:
        if typ not in ("", "A", "AAAA") or not name:
            continue
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            continue
        names.setdefault(name.lower(), []).append(ip)
    return names
