"""State of the test control server: users, pre-auth keys, nodes, interactive logins.

No I/O and no clock of its own: every call that needs time takes `now` (Unix seconds).  The
server (server.py) turns requests into calls here and pushes netmaps (mapper.py) to streams
whenever `version` moves.

Register rules follow PROTOCOL.md 3.17/4 (Headscale and Go testcontrol):
  past Expiry                  -> logout: ephemeral nodes deleted, others expire now
  known (machine, node key)    -> current state (restart), whatever auth key is sent
  OldNodeKey known (same machine) -> re-key that node (expiry renewal; not if expired and
                                     renew_expired is off: then the login paths below)
  known node key but expired   -> NodeKeyExpired, the client rotates its key
  Followup                     -> wait for approve(), then authorized
  auth key                     -> checked (unknown, used, expired, revoked are errors)
  nothing                      -> AuthURL for an interactive login

Routes (as Headscale and Tailscale handle them): a node advertises prefixes in
Hostinfo.RoutableIPs; an advertised prefix takes effect once approved (approve_routes(), or
`auto_approve_routes`: True for all, or a list of prefixes whose subnets are approved).
0.0.0.0/0 and ::/0 together make an exit node and are approved as one.  Effective routes =
(approved & advertised) + forced ones (set_routes(), approval without advertisement).  Each
subnet has one primary among its online routers (the current one kept while online, else the
lowest node ID): only the primary carries it in PrimaryRoutes and AllowedIPs; exit routes go
into AllowedIPs of every approved exit node.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field

from tsproxy.control.messages import parse_time

V4_BASE = ipaddress.ip_address("100.64.0.0")
V6_BASE = ipaddress.ip_address("fd7a:115c:a1e0::")
EXIT_ROUTES = ("0.0.0.0/0", "::/0")
LOGOUT_BEFORE = 1e9                 # an Expiry before 2001 is a logout (Go sends Unix 123)


@dataclass
class AuthKey:
    key: str
    reusable: bool = False
    ephemeral: bool = False
    tags: list = field(default_factory=list)
    user_id: int = 1
    expires: float | None = None
    used: bool = False
    revoked: bool = False

    def public(self) -> dict:
        return {"reusable": self.reusable, "ephemeral": self.ephemeral, "tags": list(self.tags),
                "used": self.used}


@dataclass
class NodeRecord:
    id: int
    stable_id: str
    machine: str                     # "mkey:<hex>" of the Noise peer
    node_key: str                    # "nodekey:<hex>"
    hostname: str
    name: str                        # FQDN with trailing dot
    ipv4: str
    ipv6: str
    user_id: int
    created: float
    ephemeral: bool = False
    tags: list = field(default_factory=list)
    disco_key: str = ""
    endpoints: list = field(default_factory=list)
    hostinfo: dict = field(default_factory=dict)
    home_derp: int = 0
    key_expiry: float | None = None
    online: bool = False
    last_seen: float | None = None
    cap: int = 0
    streams: int = 0                 # open map streams (a node may briefly have two)
    routes: list = field(default_factory=list)   # forced extra routes (set_routes)
    approved: list = field(default_factory=list)  # approved prefixes (take effect if advertised)
    attrs: dict = field(default_factory=dict)    # extra node attributes in its own CapMap
    peer_caps: dict = field(default_factory=dict)  # CapMap entries its peers see on it
    capabilities: list = field(default_factory=list)  # legacy Capabilities ([]string)

    def advertised(self) -> list[str]:
        """Hostinfo.RoutableIPs, normalised (bad entries dropped)."""
        out = []
        for r in self.hostinfo.get("RoutableIPs") or ():
            try:
                out.append(str(ipaddress.ip_network(r, strict=False)))
            except (TypeError, ValueError):
                continue
        return out

    def effective_routes(self) -> list[str]:
        """Forced routes plus the approved part of the advertised ones, in advertised order."""
        adv = self.advertised()
        out = [r for r in adv if r in self.approved]
        if ("0.0.0.0/0" in out) != ("::/0" in out):   # an exit node is both or neither
            out = [r for r in out if r not in EXIT_ROUTES]
        return out + [r for r in self.routes if r not in out]

    def is_exit_node(self) -> bool:
        return all(r in self.effective_routes() for r in EXIT_ROUTES)

    def expired(self, now: float) -> bool:
        return self.key_expiry is not None and self.key_expiry <= now


@dataclass
class PendingLogin:
    id: str
    node_key: str
    machine: str
    hostname: str
    ephemeral: bool
    approved_user: int | None = None


@dataclass
class RegisterResult:
    body: dict
    wait_for: str | None = None     # interactive login id the caller must wait on
    auth_failure: bool = False      # the auth key was refused (servers differ in the answer)


class RegistryError(Exception):
    pass


def _peer_hostinfo(node: NodeRecord) -> dict:
    """The part of Hostinfo peers see change (NetInfo is the node's own business)."""
    return {k: v for k, v in node.hostinfo.items() if k != "NetInfo"}


def _sanitize(hostname: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-")
    return s[:63] or "node"


class Registry:
    def __init__(self, *, domain: str = "tailnet.test", base_url: str = ""):
        self.domain = domain
        self.base_url = base_url
        self.users = {1: {"ID": 1, "LoginName": "test@example.com", "DisplayName": "Test User"},
                      2: {"ID": 2, "LoginName": "tagged-devices", "DisplayName": "Tagged Devices"}}
        self.auth_keys: dict[str, AuthKey] = {}
        self.nodes: dict[int, NodeRecord] = {}
        self.pending: dict[str, PendingLogin] = {}
        self.version = 0                        # bumped on every change peers may see
        self.log: list[tuple[str, dict]] = []   # (kind, request) for tests
        # an expired node may move to a new key with OldNodeKey alone (Go testcontrol); False:
        # it must log in again (an admin's expiry stands until someone re-authenticates it)
        self.renew_expired = True
        self.honour_old_node_key = True         # False: OldNodeKey never read (Headscale 0.26+)
        self.request_ephemeral = True           # False: only the auth key makes a node ephemeral
        self.headscale = False                  # Headscale's netmap shapes (mapper.py)
        # False, True (approve every advertised route) or a list of prefixes: an advertised
        # route inside one is approved (Headscale autoApprovers; "0.0.0.0/0" covers exit nodes)
        self.auto_approve_routes: bool | list = False
        self.primaries: dict[str, int] = {}     # subnet -> node id of its primary router
        self._next_id = 1

    # -- keys and users ------------------------------------------------------------------------
    def create_auth_key(self, *, reusable: bool = False, ephemeral: bool = False, tags=(),
                        expires: float | None = None, key: str | None = None) -> AuthKey:
        text = key or "tskey-auth-" + secrets.token_hex(12)
        ak = AuthKey(text, reusable, ephemeral, list(tags), 2 if tags else 1, expires)
        self.auth_keys[text] = ak
        return ak

    def revoke_auth_key(self, key: str) -> None:
        self.auth_keys[key].revoked = True

    # -- lookups -------------------------------------------------------------------------------
    def by_node_key(self, node_key: str) -> NodeRecord | None:
        for n in self.nodes.values():
            if n.node_key == node_key:
                return n
        return None

    def by_hostname(self, hostname: str) -> NodeRecord | None:
        for n in self.nodes.values():
            if n.hostname == hostname or n.name.split(".")[0] == hostname:
                return n
        return None

    def _changed(self) -> None:
        self._elect_primaries()
        self.version += 1

    def _elect_primaries(self) -> None:
        """One primary per subnet among its online routers; a primary keeps the role while
        it stays online (no flapping), else the lowest node ID takes over (failover)."""
        routers: dict[str, list[int]] = {}
        for nid in sorted(self.nodes):
            n = self.nodes[nid]
            if not n.online:
                continue
            for r in n.effective_routes():
                if r not in EXIT_ROUTES:
                    routers.setdefault(r, []).append(nid)
        new = {}
        for r, ids in routers.items():
            cur = self.primaries.get(r)
            new[r] = cur if cur in ids else ids[0]
        self.primaries = new

    def primary_routes(self, node_id: int) -> list[str]:
        n = self.nodes.get(node_id)
        if n is None:
            return []
        return [r for r in n.effective_routes() if self.primaries.get(r) == node_id]

    def _auto_approve(self, node: NodeRecord) -> None:
        rule = self.auto_approve_routes
        if not rule:
            return
        adv = node.advertised()
        if rule is True:
            ok = adv
        else:
            # a /0 in the rule approves exit nodes only, not every subnet (Headscale keeps
            # exit-node approvers apart from route approvers)
            nets = [ipaddress.ip_network(p, strict=False) for p in rule]
            subnets = [a for a in nets if a.prefixlen > 0]
            ok = [r for r in adv if r not in EXIT_ROUTES and any(
                (n := ipaddress.ip_network(r)).version == a.version and n.subnet_of(a)
                for a in subnets)]
            if len(subnets) < len(nets):
                ok += [r for r in EXIT_ROUTES if r in adv]
        for r in ok:
            if r not in node.approved:
                node.approved.append(r)

    # -- register ------------------------------------------------------------------------------
    def register(self, req: dict, machine: str, now: float) -> RegisterResult:
        self.log.append(("register", req))
        node_key = req.get("NodeKey")
        if not isinstance(node_key, str) or not node_key.startswith("nodekey:") \
                or node_key == "nodekey:" + "0" * 64:
            raise RegistryError("register: NodeKey missing")
        try:
            expiry = parse_time(req.get("Expiry"))
        except Exception:
            raise RegistryError("register: bad Expiry") from None
        hostinfo = req.get("Hostinfo") if isinstance(req.get("Hostinfo"), dict) else {}
        node = self.by_node_key(node_key)

        if expiry is not None and expiry < LOGOUT_BEFORE:       # logout
            if node is not None and node.machine == machine:
                if node.ephemeral:
                    del self.nodes[node.id]
                else:
                    node.key_expiry = now
                self._changed()
            return RegisterResult({"NodeKeyExpired": True, "MachineAuthorized": False})

        if node is not None:
            if node.machine != machine:
                return RegisterResult({"Error": "node key belongs to another machine"})
            if node.expired(now):
                return RegisterResult({"NodeKeyExpired": True})
            if expiry is not None and expiry > now:              # "expire sooner"
                node.key_expiry = expiry
                self._changed()
            node.hostinfo = hostinfo or node.hostinfo
            self._auto_approve(node)
            self._changed()
            return RegisterResult(self._authorized(node))

        old = req.get("OldNodeKey")
        old_node = self.by_node_key(old) if isinstance(old, str) else None
        if old_node is not None and old_node.machine == machine and self.honour_old_node_key and (
                self.renew_expired or not old_node.expired(now)):   # key rotation / renewal
            old_node.node_key = node_key
            old_node.key_expiry = None
            self._changed()
            return RegisterResult(self._authorized(old_node))

        followup = req.get("Followup") or ""
        if followup:
            pid = followup.rstrip("/").rsplit("/", 1)[-1]
            p = self.pending.get(pid)
            if p is None or p.node_key != node_key or p.machine != machine:
                return self._interactive(node_key, machine, hostinfo, req, now)
            return RegisterResult({}, wait_for=pid)

        auth = req.get("Auth") if isinstance(req.get("Auth"), dict) else {}
        key_text = auth.get("AuthKey") or ""
        if key_text:
            ak = self.auth_keys.get(key_text)
            if ak is None or ak.revoked:
                return RegisterResult({"Error": "invalid authkey"}, auth_failure=True)
            if ak.expires is not None and ak.expires <= now:
                return RegisterResult({"Error": "authkey expired"}, auth_failure=True)
            if ak.used and not ak.reusable:
                return RegisterResult({"Error": "authkey already used"}, auth_failure=True)
            ak.used = True
            node = self._add_node(node_key, machine, hostinfo, now, user_id=ak.user_id,
                                  ephemeral=ak.ephemeral or (self.request_ephemeral
                                                             and bool(req.get("Ephemeral"))),
                                  tags=ak.tags)
            return RegisterResult(self._authorized(node))
        return self._interactive(node_key, machine, hostinfo, req, now)

    def _interactive(self, node_key, machine, hostinfo, req, now) -> RegisterResult:
        pid = secrets.token_hex(8)
        self.pending[pid] = PendingLogin(pid, node_key, machine, hostinfo.get("Hostname", ""),
                                         bool(req.get("Ephemeral")))
        return RegisterResult({"AuthURL": self.auth_url(pid)})

    def auth_url(self, pid: str) -> str:
        return f"{self.base_url}/register/{pid}"

    def approve(self, pid: str, now: float, user_id: int = 1) -> NodeRecord:
        """Complete an interactive login (the 'user' clicked the AuthURL)."""
        p = self.pending.get(pid)
        if p is None:
            raise RegistryError(f"no pending login {pid!r}")
        p.approved_user = user_id
        node = self.by_node_key(p.node_key)
        if node is None:
            node = self._add_node(p.node_key, p.machine, {"Hostname": p.hostname}, now,
                                  user_id=user_id, ephemeral=p.ephemeral, tags=[])
        return node

    def finish_followup(self, pid: str) -> dict:
        p = self.pending.pop(pid)
        node = self.by_node_key(p.node_key)
        if node is None:
            return {"Error": "login was not completed"}
        return self._authorized(node)

    def _add_node(self, node_key, machine, hostinfo, now, *, user_id, ephemeral, tags) -> NodeRecord:
        nid = self._next_id
        self._next_id += 1
        base = _sanitize(hostinfo.get("Hostname") or f"node-{nid}")
        name, i = base, 1
        while any(n.name.split(".")[0] == name for n in self.nodes.values()):
            name = f"{base}-{i}"
            i += 1
        node = NodeRecord(
            id=nid, stable_id=f"n{nid:04d}CNTRL", machine=machine, node_key=node_key,
            hostname=hostinfo.get("Hostname") or base, name=f"{name}.{self.domain}.",
            ipv4=str(V4_BASE + nid), ipv6=str(V6_BASE + nid), user_id=user_id, created=now,
            ephemeral=ephemeral, tags=list(tags), hostinfo=dict(hostinfo))
        self._auto_approve(node)
        self.nodes[nid] = node
        self._changed()
        return node

    def _authorized(self, node: NodeRecord) -> dict:
        user = self.users[node.user_id]
        return {"User": {"ID": user["ID"], "DisplayName": user["DisplayName"], "ProfilePicURL": ""},
                "Login": {"ID": user["ID"], "Provider": "test", "LoginName": user["LoginName"],
                          "DisplayName": user["DisplayName"], "ProfilePicURL": ""},
                "NodeKeyExpired": False, "MachineAuthorized": True, "AuthURL": "", "Error": ""}

    # -- map requests --------------------------------------------------------------------------
    def update_from_map_request(self, node: NodeRecord, req: dict) -> bool:
        """Disco key, endpoints, hostinfo and home DERP from a MapRequest (stream or lite).
        Returns whether anything peers see changed."""
        self.log.append(("map", req))
        before = (node.disco_key, tuple(node.endpoints), node.home_derp, _peer_hostinfo(node))
        dk = req.get("DiscoKey")
        if isinstance(dk, str) and dk.startswith("discokey:"):
            node.disco_key = dk
        eps = req.get("Endpoints")
        if isinstance(eps, list):
            node.endpoints = [e for e in eps if isinstance(e, str) and "%" not in e
                              and not e.lower().startswith("[fe80")]
        hi = req.get("Hostinfo")
        if isinstance(hi, dict):
            if "NetInfo" not in hi and "NetInfo" in node.hostinfo:
                hi = dict(hi, NetInfo=node.hostinfo["NetInfo"])
            node.hostinfo = hi
            ni = hi.get("NetInfo") if isinstance(hi.get("NetInfo"), dict) else {}
            pd = ni.get("PreferredDERP")
            if isinstance(pd, int) and pd > 0:
                node.home_derp = pd
        if isinstance(req.get("Version"), int):
            node.cap = req["Version"]
        self._auto_approve(node)
        after = (node.disco_key, tuple(node.endpoints), node.home_derp, _peer_hostinfo(node))
        if after != before:
            self._changed()
            return True
        return False

    def set_online(self, node: NodeRecord, online: bool, now: float) -> None:
        if node.online != online:
            node.online = online
            node.last_seen = now
            self._changed()

    # -- operator actions ----------------------------------------------------------------------
    def expire_node(self, node_id: int, now: float) -> None:
        self.nodes[node_id].key_expiry = now
        self._changed()

    def set_routes(self, node_id: int, routes) -> None:
        """Forced routes beyond the node's addresses, advertised or not: subnets, or
        0.0.0.0/0 + ::/0 for an exit node (they appear in its AllowedIPs, as Headscale and
        Tailscale send them)."""
        self.nodes[node_id].routes = [str(ipaddress.ip_network(r, strict=False)) for r in routes]
        self._changed()

    def approve_routes(self, node_id: int, prefixes) -> None:
        """Set the node's approved prefixes (an admin's approval); those it also advertises
        take effect.  Approving 0.0.0.0/0 or ::/0 approves the exit node (both)."""
        ps = [str(ipaddress.ip_network(p, strict=False)) for p in prefixes]
        if any(p in EXIT_ROUTES for p in ps):
            ps += [r for r in EXIT_ROUTES if r not in ps]
        self.nodes[node_id].approved = ps
        self._changed()

    def delete_node(self, node_id: int) -> None:
        del self.nodes[node_id]
        self._changed()

    def reap_ephemeral(self, now: float, idle: float) -> list[int]:
        gone = [n.id for n in self.nodes.values()
                if n.ephemeral and n.streams == 0 and n.last_seen is not None
                and now - n.last_seen >= idle]
        for nid in gone:
            del self.nodes[nid]
        if gone:
            self._changed()
        return gone
