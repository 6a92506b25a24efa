"""The routing decision in one place (issue #13 item 3), free of I/O.

A RouteTable holds what decides where a destination goes: MagicDNS names, the tailnet's DNS
suffixes, split-DNS route suffixes, prefixes (our own addresses, peers' addresses, accepted
subnet routes), the selected exit node, and the --non-tailnet policy.  `decide(host)` answers
"how does this go" for the dialer, the proxies, the PAC file and `status` alike:

    tailnet    an address a peer (or we) hold              -> netstack, peer named
    subnet     inside a peer's accepted subnet route       -> netstack, router named
    exit       outside the tailnet, exit node selected     -> netstack (WireGuard sends it
                                                              to the exit node's /0)
    resolve    a name to look up first: "split-dns" (route resolvers over the tunnel),
               "tunnel" (a wg-quick DNS server), "exit" (the exit node's DoH): then
               after_resolve(name, via, ips) decides on the answer
    direct     dial from the host (--non-tailnet direct; LAN with --exit-node-allow-lan-access)
    refuse     with the reason the user sees; `error` says which DialError it is

Overlaps are resolved as Tailscale does: the longest prefix wins; a subnet several peers
advertise belongs to the peer whose PrimaryRoutes hold it (Go's wgcfg keeps only primary
routes), and a /0 only to the selected exit node.  assign_routes() gives each WireGuard peer
exactly the prefixes this table routes to it, so the device and the dialer never disagree.

An unusable exit node (not in the netmap, offline, expired, no approved /0) fails closed:
destinations outside the tailnet are refused with the reason, never dialed from the host.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

TAILNET_RANGES = (ipaddress.ip_network("100.64.0.0/10"),
                  ipaddress.ip_network("fd7a:115c:a1e0::/48"))
# what --exit-node-allow-lan-access leaves to the host (Go: the host's interface networks;
# here the private and link-local ranges, since a userspace proxy sees no interfaces)
LAN_RANGES = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "fe80::/10", "fc00::/7"))
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128"))
EXIT_V4, EXIT_V6 = ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")

UNREACHABLE, NOT_ALLOWED = "unreachable", "not_allowed"


@functools.lru_cache(maxsize=4096)
def _parse_ip(host: str):
    """The address `host` spells (IPv6 maybe in brackets), or None for a name; cached: the
    same few hosts are dialed again and again."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Decision:
    kind: str                         # tailnet | subnet | exit | resolve | direct | refuse
    targets: tuple = ()               # ip_address objects to dial (a host name for direct)
    peer: str = ""                    # the peer that carries it (name), if any
    via: str = ""                     # for resolve: split-dns | tunnel | exit
    reason: str = ""                  # for refuse: one line for the user
    error: str = ""                   # for refuse: unreachable | not_allowed
    counter: str = ""                 # for refuse: the dialer counter it bumps
    subject: str = ""                 # for refuse: the host the reason starts with

    @property
    def tunnel(self) -> bool:
        return self.kind in ("tailnet", "subnet", "exit")


@dataclass
class ExitNode:
    """The selected exit node as the netmap shows it; `problem` is None when usable."""
    selected: str                     # what the user asked for (NAME, FQDN, IP or StableID)
    name: str = ""
    stable_id: str = ""
    node_key: object = None
    addresses: list = field(default_factory=list)
    v4: bool = False                  # an approved 0.0.0.0/0
    v6: bool = False                  # an approved ::/0
    doh_url: str = ""                 # http://IP:PORT/dns-query on its peer API, "" if none
    problem: str | None = None

    def status(self) -> dict:
        return {"selected": self.selected, "name": self.name or None,
                "addresses": [str(a) for a in self.addresses], "dns": self.doh_url or None,
                "ipv4": self.v4, "ipv6": self.v6, "usable": self.problem is None,
                "problem": self.problem}


def _net(p):
    return p if isinstance(p, (ipaddress.IPv4Network, ipaddress.IPv6Network)) \
        else ipaddress.ip_network(str(p), strict=False)


def _under(name: str, suffix: str) -> bool:
    return bool(suffix) and (name == suffix or name.endswith("." + suffix))


def _clean(suffix: str) -> str:
    return suffix.strip().strip(".").lower()


def is_subnet_route(node, prefix) -> bool:
    """Go cidrIsSubnet: anything in AllowedIPs but the node's own single addresses and /0s."""
    return prefix.prefixlen != 0 and not (prefix in node.addresses and prefix.num_addresses == 1)


def peer_matches(node, selected: str, suffix: str = "") -> bool:
    """Does --exit-node SELECTED name this node (short name, FQDN, host name, address,
    StableID or numeric node ID)?"""
    s = selected.strip().rstrip(".").lower()
    if not s:
        return False
    try:
        ip = ipaddress.ip_address(s.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        return any(a.network_address == ip for a in node.addresses)
    full = node.name.rstrip(".").lower()
    return s in {full, node.short_name(suffix).lower(), (node.hostname or "").lower(),
                 (node.stable_id or "").lower(), str(node.id)} - {""}


def find_exit_node(nm, selected: str | None) -> ExitNode | None:
    """The ExitNode for --exit-node SELECTED in this netmap (None when none is selected)."""
    if not selected:
        return None
    suffix = nm.magicdns_suffix if nm is not None else ""
    ex = ExitNode(selected)
    if nm is None:
        ex.problem = f"exit node {selected!r}: not connected to the tailnet yet"
        return ex
    if peer_matches(nm.self_node, selected, suffix):
        ex.problem = f"exit node {selected!r} is this node"
        return ex
    node = next((n for n in nm.peers.values() if peer_matches(n, selected, suffix)), None)
    if node is None:
        ex.problem = f"exit node {selected!r} is not in the tailnet"
        return ex
    ex.name = node.short_name(suffix) or node.name.rstrip(".")
    ex.stable_id, ex.node_key = node.stable_id, node.key
    ex.addresses = [a.network_address for a in node.addresses if a.num_addresses == 1]
    ex.v4 = EXIT_V4 in node.allowed_ips
    ex.v6 = EXIT_V6 in node.allowed_ips
    ex.doh_url = peerapi_doh_url(node, [a.version for a in nm.addresses])
    if not (ex.v4 or ex.v6):
        ex.problem = (f"{ex.name} is not an exit node (no approved 0.0.0.0/0 or ::/0 route; "
                      f"it must advertise one and the control server approve it)")
    elif node.online is False:
        ex.problem = f"exit node {ex.name} is offline"
    elif node.expired:
        ex.problem = f"exit node {ex.name}'s node key has expired"
    elif node.key not in nm.wireguard_peers():
        ex.problem = f"exit node {ex.name} cannot be reached (no disco key and no home DERP)"
    return ex


def peerapi_doh_url(node, own_versions) -> str:
    """Go peerAPIBase + "/dns-query": the peer's IPv4 peer API when we have IPv4, else IPv6;
    the ports come from its Hostinfo.Services peerapi4 / peerapi6."""
    for version in (4, 6):
        port = node.peerapi_port(ipv6=version == 6)
        if not port or version not in own_versions:
            continue
        ip = next((a.network_address for a in node.addresses
                   if a.version == version and a.num_addresses == 1), None)
        if ip is not None:
            host = f"[{ip}]" if version == 6 else str(ip)
            return f"http://{host}:{port}/dns-query"
    return ""


def assign_routes(nm, *, exit_node: ExitNode | None = None, accept_routes: bool = False) -> dict:
    """node key -> the prefixes WireGuard routes to that peer: its own addresses, accepted
    subnet routes (a subnet two peers claim goes to the one whose PrimaryRoutes hold it, else
    the lowest node ID, so the device has it once), and /0s for the selected exit node."""
    peers = sorted(nm.wireguard_peers().values(), key=lambda n: n.id)
    owner: dict = {}
    if accept_routes:
        for node in peers:
            for p in node.allowed_ips:
                if not is_subnet_route(node, p):
                    continue
                cur = owner.get(p)
                if cur is None or (p in node.primary_routes and p not in cur.primary_routes):
                    owner[p] = node
    exit_key = exit_node.node_key if exit_node is not None and exit_node.problem is None else None
    out = {}
    for node in peers:
        routes = []
        for p in node.allowed_ips:
            if p.prefixlen == 0:
                if node.key != exit_key:
                    continue
            elif is_subnet_route(node, p):
                if owner.get(p) is not node:
                    continue
            routes.append(p)
        out[node.key] = routes
    return out


class RouteTable:
    def __init__(self, *, prefixes=(), names=None, suffixes=(), split_dns=(), policy="direct",
                 tailnet_ranges: bool = False, tunnel_dns: bool = False,
                 exit_node: ExitNode | None = None, allow_lan: bool = False):
        """`prefixes`: (prefix, kind, peer name) with kind tailnet|subnet|self (or bare
        prefixes: tailnet, no name); `names`: name -> [ip]; `suffixes`: MagicDNS suffixes;
        `split_dns`: route suffixes; `tunnel_dns`: a DNS server on the tunnel (wg-quick)."""
        rows = []
        for p in prefixes:
            net, kind, peer = (_net(p[0]), p[1], p[2]) if isinstance(p, tuple) else (_net(p), "tailnet", "")
            if net.prefixlen == 0:
                continue                  # /0s are the exit node's, decided below
            rows.append((net, kind, peer))
        rows.sort(key=lambda r: -r[0].prefixlen)          # longest prefix first
        self.rows = rows
        self.names = {k.lower().rstrip("."): [ipaddress.ip_address(str(a)) for a in v]
                      for k, v in (names or {}).items()}
        self.suffixes = [s for s in map(_clean, suffixes) if s]
        self.split_dns = [s for s in map(_clean, split_dns) if s]
        self.policy = policy
        self.tailnet_ranges = TAILNET_RANGES if tailnet_ranges else ()
        self.tunnel_dns = tunnel_dns
        self.exit_node = exit_node
        self.allow_lan = allow_lan

    @classmethod
    def from_netmap(cls, nm, *, exit_node: ExitNode | None = None, accept_routes: bool = False,
                    allow_lan: bool = False, policy: str = "direct", split_dns=()):
        suffix = nm.magicdns_suffix
        rows = [(ipaddress.ip_network(a), "self", "") for a in nm.addresses]
        wg = nm.wireguard_peers()
        for key, routes in assign_routes(nm, exit_node=exit_node,
                                         accept_routes=accept_routes).items():
            node = wg[key]
            name = node.short_name(suffix) or node.name.rstrip(".")
            for p in routes:
                kind = "subnet" if is_subnet_route(node, p) else "tailnet"
                rows.append((p, kind, name))
        return cls(prefixes=rows, names=nm.names, suffixes=[suffix] if suffix else [],
                   split_dns=split_dns, policy=policy, tailnet_ranges=True,
                   exit_node=exit_node, allow_lan=allow_lan)

    # -- queries ---------------------------------------------------------------------------------
    def lookup(self, ip):
        """(kind, peer) of the longest prefix holding `ip`, or None."""
        for net, kind, peer in self.rows:
            if net.version == ip.version and ip in net:
                return kind, peer
        return None

    def in_tunnel(self, ip) -> bool:
        return self.lookup(ipaddress.ip_address(ip)) is not None

    def networks(self) -> list:
        """Every prefix routed into the tunnel (not /0), for the PAC file."""
        return [net for net, _, _ in self.rows]

    @property
    def exit_active(self) -> bool:
        return self.exit_node is not None

    def decide(self, host: str) -> Decision:
        ip = _parse_ip(host)
        if ip is None:
            return self._decide_name(host.lower().rstrip("."))
        return self.decide_ip(ip)

    def decide_ip(self, ip) -> Decision:
        hit = self.lookup(ip)
        if hit is not None:
            kind, peer = hit
            return Decision("subnet" if kind == "subnet" else "tailnet", (ip,), peer)
        if any(ip.version == n.version and ip in n for n in self.tailnet_ranges):
            return self._no_such(str(ip))
        ex = self.exit_node
        if ex is not None:
            local = any(ip.version == n.version and ip in n for n in LOOPBACK)
            lan = self.allow_lan and any(ip.version == n.version and ip in n for n in LAN_RANGES)
            if not (local or lan):
                return self._via_exit(ip)
        return self._policy(str(ip), (ip,))

    def _via_exit(self, ip) -> Decision:
        ex = self.exit_node
        if ex.problem is not None:
            return Decision("refuse", reason=f"{ip} is outside the tailnet and {ex.problem}",
                            error=UNREACHABLE, counter="dial_exit_unavailable")
        if not (ex.v4 if ip.version == 4 else ex.v6):
            return Decision("refuse", reason=f"{ip}: exit node {ex.name} has no IPv{ip.version} "
                                             f"route", error=UNREACHABLE,
                            counter="dial_exit_unavailable")
        return Decision("exit", (ip,), ex.name)

    def _decide_name(self, name: str) -> Decision:
        if name in self.names:
            return Decision("tailnet", tuple(self.names[name]), name)
        for s in self.suffixes:
            short = name[: -len(s) - 1]
            if name.endswith("." + s) and short in self.names:
                return Decision("tailnet", tuple(self.names[short]), short)
        if self.route_suffix(name):
            return Decision("resolve", via="split-dns")
        if self.tunnel_dns:
            return Decision("resolve", via="tunnel")
        if any(_under(name, s) for s in self.suffixes):
            return self._no_such(name)
        return self._outside_name(name)

    def _outside_name(self, name: str) -> Decision:
        ex = self.exit_node
        if ex is not None:
            if ex.problem is not None:
                return Decision("refuse", reason=f"{name} is outside the tailnet and {ex.problem}",
                                error=UNREACHABLE, counter="dial_exit_unavailable")
            if not ex.doh_url:
                return Decision("refuse", reason=f"cannot resolve {name}: exit node {ex.name} "
                                                 "offers no DNS (no peer API port in its Hostinfo)",
                                error=UNREACHABLE, counter="dial_exit_unavailable")
            return Decision("resolve", via="exit", peer=ex.name)
        return self._policy(name, (name,))

    def route_suffix(self, name: str) -> str | None:
        best = None
        for s in self.split_dns:
            if _under(name, s) and (best is None or len(s) > len(best)):
                best = s
        return best

    def after_resolve(self, name: str, via: str, ips) -> Decision:
        """Decide on what the resolver `via` answered for `name` (ips may be empty)."""
        name = name.lower().rstrip(".")
        ips = [ipaddress.ip_address(str(a)) for a in ips]
        tun = [(a, self.lookup(a)) for a in ips]
        tun = [(a, h) for a, h in tun if h is not None]
        if tun:
            kind, peer = tun[0][1]
            return Decision("subnet" if kind == "subnet" else "tailnet",
                            tuple(a for a, _ in tun), peer)
        if any(a.version == n.version and a in n for a in ips for n in self.tailnet_ranges):
            return self._no_such(name)
        if via == "split-dns":
            if not ips:
                return Decision("refuse", reason=f"{name}: the split-DNS resolvers for "
                                                 f"{self.route_suffix(name)} have no address for it",
                                error=UNREACHABLE, counter="dial_no_such_node")
            return self.decide_ip(ips[0])   # dial that address, never re-ask the host
        if via == "exit":
            if not ips:
                ex = self.exit_node
                return Decision("refuse", reason=f"{name}: name not found (asked exit node "
                                                 f"{ex.name if ex else '?'})",
                                error=UNREACHABLE, counter="dial_failed")
            return self.decide_ip(ips[0])
        # a wg-quick DNS server: an outside answer is dialed as that address unless the
        # policy dials from the host anyway (the host then resolves the name itself)
        if ips and self.policy != "direct":
            return self._policy(name, (ips[0],))
        if any(_under(name, s) for s in self.suffixes):
            return self._no_such(name)
        return self._outside_name(name)

    def _no_such(self, what: str) -> Decision:
        return Decision("refuse", reason=f"{what}: no such node on the tailnet", error=UNREACHABLE,
                        counter="dial_no_such_node")

    def _policy(self, what: str, targets) -> Decision:
        if self.policy == "direct":
            return Decision("direct", tuple(targets))
        if self.policy == "refuse":
            why = "--non-tailnet is refuse"
        elif self.exit_node is None:
            why = "no exit node is selected (--non-tailnet exit-node)"
        else:                     # loopback, or LAN with --exit-node-allow-lan-access
            why = "--non-tailnet is exit-node (loopback and LAN addresses are not sent to it)"
        return Decision("refuse", reason=f"{what} is not on the tunnel and {why}", error=NOT_ALLOWED,
                        counter="dial_refused_policy", subject=what)

    def signature(self) -> tuple:
        """What decides where a connection goes; equal signatures route alike."""
        ex = self.exit_node
        return (tuple((str(n), k, p) for n, k, p in self.rows), self.policy, self.allow_lan,
                (ex.name, ex.problem, ex.v4, ex.v6) if ex is not None else None)

    def status(self) -> dict:
        out = {"policy": self.policy, "exit_node": self.exit_node.status() if self.exit_node else None,
               "allow_lan_access": self.allow_lan,
               "subnets": sorted({f"{net} via {peer}" for net, kind, peer in self.rows
                                  if kind == "subnet"})}
        return out
