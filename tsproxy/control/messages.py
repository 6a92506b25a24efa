"""Control RPC messages: RegisterRequest/Response, MapRequest, MapResponse <-> typed objects.

JSON shapes per PROTOCOL.md 3.2-3.14.  Decoding is defensive: any shape error raises
RemoteProtocolError (the caller drops that stream and keeps its last good netmap).  Absent or
null fields decode to None ("unchanged" in a delta) so netmap.py can apply the merge rules.

Map stream framing (3.6): u32 little-endian length | zstd frame (or raw JSON when Compress "").
"""

from __future__ import annotations

import ipaddress
import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone

import zstandard

from tsproxy.errors import RemoteProtocolError
from tsproxy.keys import DiscoPublic, MachinePublic, NodePublic
from tsproxy.version import __version__

# The capability version we advertise (Noise prologue, /key?v=, MapRequest.Version): the
# highest whose obligations tsproxy meets; docs/protocol-notes.md lists what 130-139 ask and
# why 140 (honour the GRO/GSO-disabling node attributes) is not claimed yet.
CAPABILITY_VERSION = 139
IPN_VERSION = f"{__version__}-tsproxy"           # reads as a version to admin consoles
ZERO_TIME = "0001-01-01T00:00:00Z"
LOGOUT_EXPIRY = "1970-01-01T00:02:03Z"          # Unix 123: "expire now" (Go TryLogout)
LEGACY_DERP_PREFIX = "127.3.3.40:"
# Per-message bounds of a map stream.  Go has none (a u32 length, then io.ReadFull); we keep
# memory bounded but big enough for large tailnets: a full map is ~1-2 KB per peer of JSON
# (zstd shrinks it ~5-10x), so 128 MiB decompressed is 60k+ peers.  Parsing costs several
# times the JSON size in Python objects; one message is decoded at a time.
MAX_MAP_MESSAGE = 64 << 20                       # the frame on the wire (compressed)
MAX_MAP_JSON_FACTOR = 2                          # decompressed bound = 2 x the frame bound
MAX_REGISTER_RESPONSE = 1 << 20

_LEN_LE = struct.Struct("<I")


def _err(msg: str):
    raise RemoteProtocolError("map/register message: " + msg)


# ---- scalar decoders ---------------------------------------------------------------------

def parse_time(v) -> float | None:
    """RFC 3339 -> Unix seconds; zero time / null / absent -> None."""
    if v is None or v == ZERO_TIME or v == "":
        return None
    if not isinstance(v, str):
        _err("time is not a string")
    s = v.replace("Z", "+00:00").replace("z", "+00:00")
    main, dot, frac = s.partition(".")
    if dot:                                  # Go emits up to 9 fraction digits; keep 6
        i = 0
        while i < len(frac) and frac[i].isdigit():
            i += 1
        s = main + "." + frac[:min(i, 6)].ljust(6, "0") + frac[i:]
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        _err(f"bad time {v[:40]!r}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    if dt.year <= 1:
        return None
    return dt.timestamp()


def format_time(t: float | None) -> str:
    if t is None:
        return ZERO_TIME
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(cls, v):
    if v is None:
        return None
    try:
        k = cls.from_text(v)
    except ValueError as e:
        _err(f"bad {cls.PREFIX} key: {e}")
    return None if k.is_zero() else k


def _prefixes(v) -> list | None:
    if v is None:
        return None
    if not isinstance(v, list):
        _err("prefix list is not a list")
    out = []
    for p in v:
        try:
            out.append(ipaddress.ip_network(p, strict=False))
        except (ValueError, TypeError):
            _err(f"bad prefix {str(p)[:50]!r}")
    return out


def parse_addrport(v) -> tuple[str, int]:
    if not isinstance(v, str):
        _err("endpoint is not a string")
    host, sep, port = v.rpartition(":")
    if not sep:
        _err(f"bad endpoint {v[:60]!r}")
    if host.startswith("["):
        host = host[1:-1] if host.endswith("]") else _err("bad endpoint")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        p = int(port)
    except ValueError:
        _err(f"bad endpoint {v[:60]!r}")
    if not 0 <= p <= 0xFFFF:
        _err("endpoint port out of range")
    return str(ip), p


def format_addrport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _endpoints(v) -> list | None:
    if v is None:
        return None
    if not isinstance(v, list):
        _err("Endpoints is not a list")
    return [parse_addrport(x) for x in v]


def _int(v, default=0) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        _err("expected an integer")
    return v


def _str(v, default="") -> str:
    if v is None:
        return default
    if not isinstance(v, str):
        _err("expected a string")
    return v


def _bool(v) -> bool | None:
    if v is None:
        return None
    if not isinstance(v, bool):
        _err("expected a bool")
    return v


def _dict(v) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        _err("expected an object")
    return v


def _list(v) -> list | None:
    if v is None:
        return None
    if not isinstance(v, list):
        _err("expected a list")
    return v


# ---- Node ----------------------------------------------------------------------------------

@dataclass
class Node:
    id: int
    stable_id: str = ""
    name: str = ""                       # FQDN with trailing dot
    user: int = 0
    key: NodePublic | None = None
    key_expiry: float | None = None      # None = never
    machine: MachinePublic | None = None
    disco_key: DiscoPublic | None = None
    addresses: list = field(default_factory=list)
    allowed_ips: list = field(default_factory=list)
    endpoints: list = field(default_factory=list)   # [(ip, port)]
    home_derp: int = 0
    hostname: str = ""
    online: bool | None = None
    last_seen: float | None = None
    machine_authorized: bool = False
    tags: list = field(default_factory=list)
    primary_routes: list = field(default_factory=list)
    cap_map: dict = field(default_factory=dict)
    expired: bool = False
    is_wireguard_only: bool = False
    cap: int = 0
    services: list = field(default_factory=list)    # Hostinfo.Services: [(proto, port)]

    def peerapi_port(self, ipv6: bool = False) -> int:
        """The port of its peer API (Hostinfo service peerapi4 / peerapi6), 0 if none."""
        want = "peerapi6" if ipv6 else "peerapi4"
        return next((port for proto, port in self.services if proto == want), 0)

    def short_name(self, suffix: str) -> str:
        name = self.name.rstrip(".")
        if suffix and name.lower().endswith("." + suffix.lower()):
            return name[:-len(suffix) - 1]
        return name.split(".", 1)[0]


def parse_node(obj) -> Node:
    if not isinstance(obj, dict):
        _err("Node is not an object")
    nid = _int(obj.get("ID"))
    if nid <= 0:
        _err("Node without a positive ID")
    addresses = _prefixes(obj.get("Addresses")) or []
    allowed = _prefixes(obj.get("AllowedIPs"))
    home = _int(obj.get("HomeDERP"))
    legacy = obj.get("DERP")
    if not home and isinstance(legacy, str) and legacy.startswith(LEGACY_DERP_PREFIX):
        try:
            home = int(legacy[len(LEGACY_DERP_PREFIX):])
        except ValueError:
            _err("bad legacy DERP string")
    cap_map = dict(_dict(obj.get("CapMap")))
    for c in _list(obj.get("Capabilities")) or ():     # deprecated list folds into CapMap
        if isinstance(c, str):
            cap_map.setdefault(c, None)
    hostinfo = obj.get("Hostinfo")
    hostname = _str(hostinfo.get("Hostname")) if isinstance(hostinfo, dict) else ""
    services = _services(hostinfo.get("Services")) if isinstance(hostinfo, dict) else []
    return Node(
        id=nid,
        stable_id=_str(obj.get("StableID")),
        name=_str(obj.get("Name")),
        user=_int(obj.get("User")),
        key=_key(NodePublic, obj.get("Key")),
        key_expiry=parse_time(obj.get("KeyExpiry")),
        machine=_key(MachinePublic, obj.get("Machine")),
        disco_key=_key(DiscoPublic, obj.get("DiscoKey")),
        addresses=addresses,
        allowed_ips=list(addresses) if allowed is None else allowed,   # capver >= 112 rule
        endpoints=_endpoints(obj.get("Endpoints")) or [],
        home_derp=home,
        hostname=hostname,
        online=_bool(obj.get("Online")),
        last_seen=parse_time(obj.get("LastSeen")),
        machine_authorized=bool(_bool(obj.get("MachineAuthorized"))),
        tags=[t for t in _list(obj.get("Tags")) or () if isinstance(t, str)],
        primary_routes=_prefixes(obj.get("PrimaryRoutes")) or [],
        cap_map=cap_map,
        expired=bool(_bool(obj.get("Expired"))),
        is_wireguard_only=bool(_bool(obj.get("IsWireGuardOnly"))),
        cap=_int(obj.get("Cap")),
        services=services,
    )


def _services(v) -> list:
    """Hostinfo.Services -> [(proto, port)]; malformed entries are skipped (informational,
    never a reason to drop the peer)."""
    out = []
    for sv in v if isinstance(v, list) else ():
        if isinstance(sv, dict) and isinstance(sv.get("Proto"), str) \
                and isinstance(sv.get("Port"), int) and not isinstance(sv.get("Port"), bool) \
                and 0 <= sv["Port"] <= 0xFFFF:
            out.append((sv["Proto"], sv["Port"]))
    return out


@dataclass
class PeerChange:
    """One PeersChangedPatch entry; None fields are unchanged."""
    node_id: int
    derp_region: int | None = None
    cap: int | None = None
    cap_map: dict | None = None
    endpoints: list | None = None
    key: NodePublic | None = None
    disco_key: DiscoPublic | None = None
    online: bool | None = None
    last_seen: float | None = None
    key_expiry: float | None = None
    key_expiry_set: bool = False         # present (a zero time resets it to "never expires")


def parse_peer_change(obj) -> PeerChange:
    if not isinstance(obj, dict):
        _err("PeerChange is not an object")
    nid = _int(obj.get("NodeID"))
    if nid <= 0:
        _err("PeerChange without NodeID")
    region = obj.get("DERPRegion")
    return PeerChange(
        node_id=nid,
        derp_region=_int(region) or None,
        cap=_int(obj.get("Cap")) or None,
        cap_map=_dict(obj["CapMap"]) if obj.get("CapMap") is not None else None,
        endpoints=_endpoints(obj.get("Endpoints")),
        key=_key(NodePublic, obj.get("Key")),
        disco_key=_key(DiscoPublic, obj.get("DiscoKey")),
        online=_bool(obj.get("Online")),
        last_seen=parse_time(obj.get("LastSeen")),
        key_expiry=parse_time(obj.get("KeyExpiry")),
        key_expiry_set=obj.get("KeyExpiry") is not None,
    )


# ---- DERP map --------------------------------------------------------------------------------

@dataclass
class DERPNode:
    name: str
    region_id: int
    host_name: str
    cert_name: str = ""
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0
    stun_only: bool = False
    derp_port: int = 0
    insecure_for_tests: bool = False
    can_port80: bool = False


@dataclass
class DERPRegion:
    region_id: int
    region_code: str = ""
    region_name: str = ""
    nodes: list = field(default_factory=list)
    no_measure_no_home: bool = False


@dataclass
class DERPMap:
    regions: dict = field(default_factory=dict)       # int -> DERPRegion
    home_params: dict | None = None
    omit_default_regions: bool = False


def parse_derp_map(obj) -> tuple[dict | None, dict | None, bool]:
    """(regions or None when `Regions` absent, HomeParams, omitDefaultRegions)."""
    obj = _dict(obj)
    regions_obj = obj.get("Regions")
    regions = None
    if regions_obj is not None:
        regions = {}
        for rid_text, r in _dict(regions_obj).items():
            if r is None:
                continue                       # nil region values are dropped
            try:
                rid = int(rid_text)
            except ValueError:
                _err("DERP region key is not a number")
            r = _dict(r)
            nodes = []
            for n in _list(r.get("Nodes")) or ():
                n = _dict(n)
                nodes.append(DERPNode(
                    name=_str(n.get("Name")), region_id=_int(n.get("RegionID"), rid),
                    host_name=_str(n.get("HostName")), cert_name=_str(n.get("CertName")),
                    ipv4=_str(n.get("IPv4")), ipv6=_str(n.get("IPv6")),
                    stun_port=_int(n.get("STUNPort")), stun_only=bool(n.get("STUNOnly")),
                    derp_port=_int(n.get("DERPPort")),
                    insecure_for_tests=bool(n.get("InsecureForTests")),
                    can_port80=bool(n.get("CanPort80"))))
            regions[rid] = DERPRegion(rid, _str(r.get("RegionCode")), _str(r.get("RegionName")),
                                      nodes, bool(r.get("NoMeasureNoHome")))
    hp = obj.get("HomeParams")
    return regions, (_dict(hp) if hp is not None else None), bool(obj.get("omitDefaultRegions"))


def fix_embedded_derp(derp_map: DERPMap, control_host: str, control_port: int) -> None:
    """Headscale's embedded DERP server may be published with HostName "headscale" and
    DERPPort 0 (its config defaults); dial the control server's host/port instead."""
    for region in derp_map.regions.values():
        for n in region.nodes:
            if n.host_name == "headscale" or (n.host_name == "" and not n.ipv4 and not n.ipv6):
                n.host_name = control_host
                if n.derp_port == 0:
                    n.derp_port = control_port


# ---- DNS config and filter -------------------------------------------------------------------

@dataclass
class DNSConfig:
    resolvers: list = field(default_factory=list)          # ["1.1.1.1", "1.1.1.1:53", ...]
    routes: dict = field(default_factory=dict)             # suffix -> [resolver addr]
    fallback_resolvers: list = field(default_factory=list)
    domains: list = field(default_factory=list)
    proxied: bool = False
    extra_records: list = field(default_factory=list)      # [(name, type, value)]
    cert_domains: list = field(default_factory=list)


def _resolvers(v) -> list:
    out = []
    for r in _list(v) or ():
        if isinstance(r, dict) and isinstance(r.get("Addr"), str):
            out.append(r["Addr"])
    return out


def parse_dns_config(obj) -> DNSConfig:
    obj = _dict(obj)
    routes = {}
    for suffix, rs in _dict(obj.get("Routes")).items():
        routes[suffix.rstrip(".").lower()] = _resolvers(rs)
    extra = []
    for rec in _list(obj.get("ExtraRecords")) or ():
        rec = _dict(rec)
        extra.append((_str(rec.get("Name")).rstrip("."), _str(rec.get("Type")),
                      _str(rec.get("Value"))))
    return DNSConfig(
        resolvers=_resolvers(obj.get("Resolvers")), routes=routes,
        fallback_resolvers=_resolvers(obj.get("FallbackResolvers")),
        domains=[d for d in _list(obj.get("Domains")) or () if isinstance(d, str)],
        proxied=bool(obj.get("Proxied")), extra_records=extra,
        cert_domains=[d for d in _list(obj.get("CertDomains")) or () if isinstance(d, str)])


def parse_filter_rules(v) -> list:
    """Raw FilterRule dicts, validated as lists of objects (compiled by filter.py)."""
    rules = _list(v) or []
    for r in rules:
        if not isinstance(r, dict):
            _err("FilterRule is not an object")
    return rules


# ---- MapResponse -----------------------------------------------------------------------------

@dataclass
class MapResponse:
    keep_alive: bool = False
    node: Node | None = None
    derp_regions: dict | None = None
    derp_present: bool = False
    derp_home_params: dict | None = None
    peers: list | None = None                  # non-empty => full replacement
    peers_changed: list | None = None
    peers_removed: list | None = None
    peers_changed_patch: list | None = None
    peer_seen_change: dict | None = None       # id -> bool
    online_change: dict | None = None          # id -> bool
    dns_config: DNSConfig | None = None
    domain: str = ""
    packet_filter: list | None = None          # None = unchanged
    packet_filters: dict | None = None
    user_profiles: list | None = None
    control_time: float | None = None
    collect_services: bool | None = None
    ssh_policy: dict | None = None
    health: list | None = None
    ping_request: dict | None = None
    pop_browser_url: str = ""
    debug: dict | None = None


def _id_bool_map(v) -> dict | None:
    if v is None:
        return None
    out = {}
    for k, b in _dict(v).items():
        try:
            out[int(k)] = bool(b)
        except ValueError:
            _err("node ID map key is not a number")
    return out


def parse_map_response(obj) -> MapResponse:
    if not isinstance(obj, dict):
        _err("MapResponse is not an object")
    m = MapResponse(keep_alive=bool(obj.get("KeepAlive")))
    m.control_time = parse_time(obj.get("ControlTime"))
    m.ping_request = obj.get("PingRequest") if isinstance(obj.get("PingRequest"), dict) else None
    m.pop_browser_url = _str(obj.get("PopBrowserURL"))
    if m.keep_alive:
        return m
    if obj.get("Node") is not None:
        m.node = parse_node(obj["Node"])
    if obj.get("DERPMap") is not None:
        m.derp_present = True
        m.derp_regions, m.derp_home_params, _ = parse_derp_map(obj["DERPMap"])
    peers = _list(obj.get("Peers"))
    if peers:
        m.peers = [parse_node(p) for p in peers]
    if obj.get("PeersChanged") is not None:
        m.peers_changed = [parse_node(p) for p in _list(obj["PeersChanged"])]
    if obj.get("PeersRemoved") is not None:
        m.peers_removed = [_int(i) for i in _list(obj["PeersRemoved"])]
    if obj.get("PeersChangedPatch") is not None:
        m.peers_changed_patch = [parse_peer_change(p) for p in _list(obj["PeersChangedPatch"])]
    m.peer_seen_change = _id_bool_map(obj.get("PeerSeenChange"))
    m.online_change = _id_bool_map(obj.get("OnlineChange"))
    if obj.get("DNSConfig") is not None:
        m.dns_config = parse_dns_config(obj["DNSConfig"])
    m.domain = _str(obj.get("Domain"))
    if "PacketFilter" in obj and obj["PacketFilter"] is not None:
        m.packet_filter = parse_filter_rules(obj["PacketFilter"])
    if obj.get("PacketFilters") is not None:
        m.packet_filters = {k: (None if v is None else parse_filter_rules(v))
                            for k, v in _dict(obj["PacketFilters"]).items()}
    if obj.get("UserProfiles") is not None:
        m.user_profiles = [_dict(u) for u in _list(obj["UserProfiles"])]
    m.collect_services = obj.get("CollectServices") if isinstance(
        obj.get("CollectServices"), bool) else None
    m.ssh_policy = obj.get("SSHPolicy") if isinstance(obj.get("SSHPolicy"), dict) else None
    m.health = _list(obj.get("Health"))
    m.debug = obj.get("Debug") if isinstance(obj.get("Debug"), dict) else None
    return m


class MapStreamDecoder:
    """Bytes of the /machine/map HTTP/2 response body in, parsed JSON objects out.

    Keep-alives whose compressed bytes equal the first one seen are recognised without
    decompressing (as Go does)."""

    def __init__(self, *, compressed: bool = True, max_message: int = MAX_MAP_MESSAGE):
        self._buf = bytearray()
        self._compressed = compressed
        self._max = max_message
        self._max_json = max_message * MAX_MAP_JSON_FACTOR
        self._dctx = zstandard.ZstdDecompressor()
        self._keepalive_frame: bytes | None = None
        self.messages = 0

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        buf = self._buf
        while len(buf) >= 4:
            (n,) = _LEN_LE.unpack_from(buf)
            if n > self._max:
                raise RemoteProtocolError(f"map message of {n} bytes exceeds limit")
            if len(buf) < 4 + n:
                break
            frame = bytes(buf[4:4 + n])
            del buf[:4 + n]
            self.messages += 1
            if frame == self._keepalive_frame:
                out.append({"KeepAlive": True})
                continue
            obj = self._decode(frame)
            if obj.get("KeepAlive") is True and len(obj) == 1 and self._keepalive_frame is None:
                self._keepalive_frame = frame
            out.append(obj)
        return out

    def _read_zstd(self, frame: bytes) -> bytes:
        # stream_reader.read(n) may return less than n before the end: read to EOF or bound
        reader = self._dctx.stream_reader(frame)
        out = bytearray()
        while len(out) <= self._max_json:
            chunk = reader.read(min(1 << 20, self._max_json + 1 - len(out)))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def _decode(self, frame: bytes) -> dict:
        if self._compressed:
            try:
                raw = self._read_zstd(frame)
            except zstandard.ZstdError as e:
                raise RemoteProtocolError(f"map message: bad zstd frame ({e})") from None
            if len(raw) > self._max_json:
                raise RemoteProtocolError("map message decompresses past the limit")
        else:
            raw = frame
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise RemoteProtocolError("map message is not JSON") from None
        if not isinstance(obj, dict):
            raise RemoteProtocolError("map message is not a JSON object")
        return obj


def encode_map_message(obj: dict, *, compressed: bool = True, level: int = 1) -> bytes:
    """Server side / tests: one length-prefixed (optionally zstd) MapResponse."""
    raw = json.dumps(obj, separators=(",", ":")).encode()
    if compressed:
        raw = zstandard.ZstdCompressor(level=level).compress(raw)
    return _LEN_LE.pack(len(raw)) + raw


# ---- requests --------------------------------------------------------------------------------

def _zero(cls) -> str:
    return cls.PREFIX + "0" * 64


def hostinfo(hostname: str, *, tags=(), preferred_derp: int = 0, version: str = "",
             os_name: str = "linux", backend_log_id: str = "") -> dict:
    hi = {"IPNVersion": version or IPN_VERSION, "OS": os_name, "Hostname": hostname,
          "Package": "tsproxy", "Userspace": True, "UserspaceRouter": True}
    if backend_log_id:
        hi["BackendLogID"] = backend_log_id
    if tags:
        hi["RequestTags"] = list(tags)
    if preferred_derp:
        hi["NetInfo"] = {"PreferredDERP": preferred_derp}
    return hi


def build_register_request(*, node_key: NodePublic, old_node_key: NodePublic | None,
                           hostinfo: dict, auth_key: str | None = None,
                           followup: str = "", expiry: str = ZERO_TIME,
                           ephemeral: bool = False, nl_key: str | None = None,
                           version: int = CAPABILITY_VERSION) -> bytes:
    req = {"Version": version, "NodeKey": node_key.text(),
           "OldNodeKey": old_node_key.text() if old_node_key else _zero(NodePublic),
           "Expiry": expiry, "Followup": followup, "Hostinfo": hostinfo}
    if nl_key:
        req["NLKey"] = nl_key
    if auth_key:
        req["Auth"] = {"AuthKey": auth_key}
    if ephemeral:
        req["Ephemeral"] = True
    return json.dumps(req).encode()


@dataclass
class RegisterResponse:
    machine_authorized: bool
    node_key_expired: bool
    auth_url: str
    error: str
    login_name: str
    user_id: int
    node_key_signature: str


def parse_register_response(body: bytes) -> RegisterResponse:
    if len(body) > MAX_REGISTER_RESPONSE:
        raise RemoteProtocolError("register response too large")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RemoteProtocolError("register response is not JSON") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("register response is not an object")
    login = obj.get("Login") if isinstance(obj.get("Login"), dict) else {}
    user = obj.get("User") if isinstance(obj.get("User"), dict) else {}
    return RegisterResponse(
        machine_authorized=bool(_bool(obj.get("MachineAuthorized"))),
        node_key_expired=bool(_bool(obj.get("NodeKeyExpired"))),
        auth_url=_str(obj.get("AuthURL")), error=_str(obj.get("Error")),
        login_name=_str(login.get("LoginName")), user_id=_int(user.get("ID")),
        node_key_signature=_str(obj.get("NodeKeySignature")))


def build_map_request(*, node_key: NodePublic, disco_key: DiscoPublic, hostinfo: dict,
                      endpoints=(), stream: bool = True, compress: bool = True,
                      version: int = CAPABILITY_VERSION) -> bytes:
    req = {"Version": version, "Compress": "zstd" if compress else "", "KeepAlive": stream,
           "NodeKey": node_key.text(), "DiscoKey": disco_key.text(), "Stream": stream,
           "Hostinfo": hostinfo}
    if endpoints:
        req["Endpoints"] = [format_addrport(h, p) for h, p, *_ in endpoints]
        req["EndpointTypes"] = [e[2] if len(e) > 2 else 0 for e in endpoints]
    if not stream:
        req["OmitPeers"] = True
    return json.dumps(req).encode()
