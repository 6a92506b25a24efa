"""`tsproxy.Node`: join a tailnet (or a plain WireGuard network) from inside a Python program.

    async with tsproxy.Node(control_url=url, auth_key=key, hostname="app") as node:
        await node.wait_running()
        reader, writer = await node.open_connection("peer-a", 80)

The node runs the same data planes as the daemon (daemon/tailnet.py's TailnetPlane, daemon/
wgplane.py's WgPlane) and the same front ends (proxy listener, forwards, reverse forwards); the
daemon adds its control socket, signals and configured listeners on top.  Several Nodes can share
one event loop: each has its own identity, UDP port and stack.  See docs/python-api.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket as _socket
import time

import tsproxy.errors as errors
from tsproxy.errors import ConfigError, NetworkUnreachable, NotAllowed, TsproxyError

log = logging.getLogger("tsproxy.node")
DEFAULT_CONTROL_URL = "https://controlplane.tailscale.com"
POLICIES = ("refuse", "direct", "exit-node")


class Node:
    """A tailnet node in this process.  Keyword arguments only; an unknown one is a TypeError.

    Tailscale mode: control_url, auth_key, hostname, state_dir (None: the identity lives in
    memory and dies with the node), ephemeral, tags, port (the WireGuard/disco UDP port, 0: any),
    accept_routes (take peers' advertised subnet routes, as `tailscale up --accept-routes`),
    control_ca_file (extra CA certificates trusted for the control server and DERP),
    exit_node (a peer's name or IP: destinations and names outside the tailnet go through it,
    failing closed when it is unusable; change it with set_exit_node()) and
    exit_node_allow_lan_access (private/link-local addresses follow non_tailnet instead).
    Plain WireGuard mode: wg_config, a wg-quick file's path or its text.
    non_tailnet: what open_connection() does with a host that is not on the tailnet: "refuse"
    (the default for the library: NotAllowed, nothing is dialed on the host) or "direct" (a
    normal host connection, as the daemon does by default).
    """

    def __init__(self, *, control_url: str | None = None, auth_key: str | None = None,
                 hostname: str | None = None, state_dir: str | os.PathLike | None = None,
                 ephemeral: bool = False, tags=(), port: int = 0,
                 wg_config: str | os.PathLike | None = None, non_tailnet: str = "refuse",
                 accept_routes: bool = False, control_ca_file: str | None = None,
                 exit_node: str | None = None, exit_node_allow_lan_access: bool = False):
        if non_tailnet == "exit-node" and wg_config is not None:
            raise ConfigError("non_tailnet='exit-node' needs Tailscale mode")
        if non_tailnet not in POLICIES:
            raise ConfigError(f"non_tailnet must be one of {', '.join(POLICIES)}, got {non_tailnet!r}")
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ConfigError(f"port must be 0..65535, got {port!r}")
        if isinstance(tags, str):
            raise TypeError("tags must be a sequence of 'tag:...' strings, not one string")
        self.non_tailnet = non_tailnet
        self.conf = None
        if wg_config is not None:
            if control_url or auth_key or tags or ephemeral or accept_routes or exit_node:
                raise TypeError("wg_config cannot be combined with Tailscale-mode arguments "
                                "(control_url, auth_key, tags, ephemeral, accept_routes, "
                                "exit_node)")
            self.conf = _load_wg_config(wg_config)
        else:
            from tsproxy.control.aio import ControlURL
            ControlURL(control_url or DEFAULT_CONTROL_URL)     # ConfigError now, not at start
        self._control_url = control_url or DEFAULT_CONTROL_URL
        self._auth_key = auth_key
        self.hostname = hostname or _default_hostname()
        self._state_dir = os.fspath(state_dir) if state_dir is not None else None
        self._ephemeral = ephemeral
        self._tags = tuple(tags)
        self._port = port
        self._accept_routes = bool(accept_routes)
        if exit_node is not None and not isinstance(exit_node, str):
            raise TypeError("exit_node must be a peer's name or IP address (a str) or None")
        from tsproxy.daemon.options import check_exit_node
        self._exit_node = check_exit_node(exit_node, "exit_node") if exit_node and exit_node.strip() else None
        self._exit_lan = bool(exit_node_allow_lan_access)
        self._ca_file = os.fspath(control_ca_file) if control_ca_file is not None else None
        self.tailnet = None            # TailnetPlane (Tailscale mode)
        self.wgplane = None            # WgPlane (WireGuard mode)
        self.started = time.time()
        self._closed = False
        self._start_task: asyncio.Task | None = None
        self._stopping: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._reported_urls: set[str] = set()
        self._state = "NoState"
        self.servers: list = []        # (kind, ProxyServer) from serve_proxy()
        self.forwards: dict = {}
        self.reverses: list = []
        self._tunnel_servers: list = []
        self._udp: list = []
        self._bridges: set[asyncio.Task] = set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> "Node":
        """Start the node; returns at once in Tailscale mode (see wait_running())."""
        if self._changed is not None:
            raise RuntimeError("this Node was already started")
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        if self.conf is not None:
            from tsproxy.daemon.wgplane import WgPlane
            self.wgplane = WgPlane(self.conf, non_tailnet=self.non_tailnet)
            try:
                await self.wgplane.start()
            except BaseException:
                await self.wgplane.aclose()
                raise
            self._set_state("Running")
            return self
        from tsproxy.daemon import statedir
        from tsproxy.daemon.tailnet import TailnetPlane
        if self._state_dir is not None:
            statedir.ensure_state_dir(self._state_dir)
        self.tailnet = TailnetPlane(control_url=self._control_url, state_dir=self._state_dir,
                                    hostname=self.hostname, auth_key=self._auth_key,
                                    ephemeral=self._ephemeral, tags=self._tags,
                                    udp_port=self._port, non_tailnet=self.non_tailnet,
                                    accept_routes=self._accept_routes, ca_file=self._ca_file,
                                    exit_node=self._exit_node,
                                    exit_node_allow_lan_access=self._exit_lan)
        self.tailnet.on_state = lambda s: self._set_state(self._tailnet_state())
        self.tailnet.on_applied = lambda nm: self._set_state(self._tailnet_state())
        self._start_task = asyncio.create_task(self.tailnet.start(self._stopping), name="node-start")
        self._start_task.add_done_callback(lambda t: self._set_state(self._tailnet_state()))
        self._set_state("Starting")
        return self

    async def aclose(self) -> None:
        """Stop every task, close every listener and connection, free the UDP port."""
        if self._closed:
            return
        self._closed = True
        if self._stopping is not None:
            self._stopping.set()

        async def close(obj):
            try:
                async with asyncio.timeout(5):
                    await obj.aclose()
            except Exception as e:             # keep closing the rest; report it
                log.warning("error while closing %s: %r", type(obj).__name__, e)
        for srv in self._tunnel_servers:
            srv.close()
        for u in self._udp:
            u.close()
        for t in list(self._bridges):
            t.cancel()
        await asyncio.gather(*self._bridges, return_exceptions=True)
        for _, srv in self.servers:
            await close(srv)
        for fw in list(self.forwards.values()):
            await close(fw)
        for rev in self.reverses:
            await close(rev)
        if self._start_task is not None:
            self._start_task.cancel()
            await asyncio.gather(self._start_task, return_exceptions=True)
        if self.tailnet is not None:
            await close(self.tailnet)
        if self.wgplane is not None:
            await close(self.wgplane)
        self._set_state("Stopped")

    async def __aenter__(self) -> "Node":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- state -----------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """NoState, Starting, NeedsLogin, NeedsMachineAuth, Running, Stopped."""
        return self._state

    @property
    def auth_url(self) -> str | None:
        return (self.tailnet.control.auth_url or None) if self.tailnet is not None else None

    def _set_state(self, s: str) -> None:
        self._state = s
        if self._changed is not None:
            self._changed.set()

    def _tailnet_state(self) -> str:
        if self._closed:
            return "Stopped"
        ctl = self.tailnet.control.state
        if ctl == "Running":
            return "Running" if self.tailnet.netmap is not None else "Starting"
        return "Starting" if ctl == "NoState" else ctl

    def _outcome(self) -> bool:
        """True when Running; raises the typed outcome; False to keep waiting."""
        if self._closed:
            raise RuntimeError("the node is closed")
        if self._changed is None:
            raise RuntimeError("the node is not started (use `async with` or await node.start())")
        if self.tailnet is None:
            return True
        t = self._start_task
        if t is not None and t.done() and not t.cancelled() and t.exception() is not None:
            from tsproxy.daemon.tailnet import LoginFailed
            exc = t.exception()
            if isinstance(exc, LoginFailed):
                cls = errors.KeyExpired if "expired" in str(exc) else errors.AuthRejected
                raise cls(str(exc)) from None
            raise exc
        state = self._tailnet_state()
        if state == "Running":
            return True
        ctl = self.tailnet.control
        url = ctl.auth_url
        if state == "NeedsLogin" and url and url not in self._reported_urls:
            self._reported_urls.add(url)
            raise errors.NeedsLogin(url)
        if ctl.failures and ctl.state == "NoState":
            raise errors.ControlUnreachable(f"cannot reach the control server {ctl.url.url}: "
                                            f"{ctl.last_error}")
        return False

    async def wait_running(self, timeout: float | None = None) -> None:
        """Wait until the node can carry traffic.  Raises NeedsLogin (once per login URL; call
        again after the login to keep waiting), AuthRejected / KeyExpired, ControlUnreachable
        (while no attempt has reached the control server; the node keeps trying) or Timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._outcome():
            self._changed.clear()
            # control failures are not signalled as state changes: look again now and then
            wait = 0.25 if deadline is None else min(0.25, deadline - loop.time())
            if wait <= 0:
                raise errors.Timeout(f"the node is not running after {timeout:g} s "
                                     f"(state {self.state})")
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except TimeoutError:
                pass

    async def watch_state(self):
        """Yield the current state, then each new one, until the node stops."""
        last = None
        while True:
            if self._changed is None:
                raise RuntimeError("the node is not started")
            self._changed.clear()
            s = self.state
            if s != last:
                last = s
                yield s
            if s == "Stopped":
                return
            await self._changed.wait()

    # -- data plane ------------------------------------------------------------------------------
    def _plane(self):
        plane = self.tailnet if self.tailnet is not None else self.wgplane
        if plane is None or plane.dialer is None or self._closed:
            raise NetworkUnreachable("the node is not running (await node.wait_running() first)")
        return plane

    @property
    def addresses(self) -> list[str]:
        """Our tailnet (or WireGuard interface) addresses, IPv4 first."""
        if self.tailnet is not None:
            return self.tailnet.addresses()
        return self.wgplane.addresses() if self.wgplane is not None else (
            [str(a.ip) for a in self.conf.interface.addresses] if self.conf else [])

    async def open_connection(self, host: str, port: int, *, timeout: float | None = None):
        """(reader, writer) to host:port over the tailnet; host is a MagicDNS name, a tailnet IP
        or a name resolved by the tailnet's DNS.  Raises tsproxy.errors.DialError subclasses."""
        _check_port(port)
        return await self._plane().dialer.open_connection(host, port, timeout=timeout)

    async def start_server(self, client_connected_cb, port: int) -> "TailnetServer":
        """Accept tailnet TCP connections to port on every address of ours (IPv4 and IPv6);
        the tailnet's packet filter applies.  The callback gets (reader, writer)."""
        _check_port(port)
        plane = self._plane()
        srv = await plane.netstack.start_server(port, client_connected_cb)
        ts = TailnetServer(srv, [(a, port) for a in self.addresses])
        self._tunnel_servers.append(ts)
        return ts

    async def open_udp(self, port: int = 0) -> "TailnetDatagram":
        """A UDP socket on the tailnet: `await d.sendto(data, (host, port))`, `await d.recvfrom()`."""
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port must be 0..65535, got {port!r}")
        plane = self._plane()
        d = TailnetDatagram(self, await plane.netstack.open_udp(port))
        self._udp.append(d)
        return d

    async def socket(self, host: str, port: int, *, timeout: float | None = None) -> _socket.socket:
        """A connected, blocking socket.socket bridged to a tailnet connection (for synchronous
        libraries).  Use it from another thread than this node's loop (see tsproxy.sync)."""
        from tsproxy.proxy.aio.relay import relay
        r, w = await self.open_connection(host, port, timeout=timeout)
        mine, theirs = _socket.socketpair()
        try:
            br, bw = await asyncio.open_connection(sock=mine, limit=256 * 1024)
        except BaseException:
            mine.close()
            theirs.close()
            w.abort()
            raise
        task = asyncio.create_task(relay(br, bw, r, w), name=f"socket-bridge {host}:{port}")
        self._bridges.add(task)
        task.add_done_callback(self._bridges.discard)
        theirs.setblocking(True)
        return theirs

    def httpx_transport(self, **kwargs):
        """An httpx.AsyncBaseTransport over this node (needs `pip install tsproxy[httpx]`)."""
        from tsproxy.httpx_transport import NodeTransport
        return NodeTransport(self, **kwargs)

    # -- front ends ------------------------------------------------------------------------------
    async def serve_proxy(self, listen: str = "127.0.0.1:0", *, protocols: str = "mixed",
                          user: str | None = None, password: str | None = None) -> tuple[str, int]:
        """A SOCKS5/HTTP proxy listener on the host (loopback by default) into this node;
        returns its bound (host, port)."""
        from tsproxy.daemon import options
        from tsproxy.proxy.aio.listener import ProxyServer
        from tsproxy.proxy.auth import ProxyAuth
        host, port = options.parse_listen_addr(listen)
        if (user is None) != (password is None):
            raise ConfigError("serve_proxy needs both user and password, or neither")
        if user is None and not options.is_loopback(host):
            raise ConfigError(f"refusing to serve an open proxy on {host}:{port}: give user and password")
        auth = ProxyAuth(user, password) if user is not None else None
        srv = ProxyServer(self._plane().dialer, listen=(host, port), auth=auth, protocols=protocols)
        try:
            await srv.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        self.servers.append((protocols, srv))
        return srv.address

    async def forward(self, spec: str):
        """A local port forwarded to a tailnet host, as `tsproxy up --forward SPEC`."""
        from tsproxy.proxy import specs
        from tsproxy.proxy.aio.forward import ForwardServer
        fw_spec = specs.parse_forward(spec)
        if fw_spec.key in self.forwards:
            raise ConfigError(f"a forward on {fw_spec.proto} port {fw_spec.listen_port} already exists")
        fw = ForwardServer(self._plane().dialer, fw_spec)
        try:
            await fw.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {fw_spec.listen_host}:{fw_spec.listen_port} "
                              f"({e.strerror or e})") from None
        self.forwards[fw_spec.key] = fw
        return fw.describe()

    async def reverse(self, spec: str):
        """A tailnet port of ours forwarded to a local service, as `tsproxy up --reverse SPEC`."""
        from tsproxy.proxy import specs
        from tsproxy.proxy.aio.reverse import ReverseForward
        rev = ReverseForward(self._plane().netstack, specs.parse_reverse(spec))
        await rev.start()
        self.reverses.append(rev)
        return rev.describe()

    # -- routing ---------------------------------------------------------------------------------
    @property
    def exit_node(self) -> str | None:
        """The selected exit node (as given), or None."""
        return self.tailnet.exit_node if self.tailnet is not None else self._exit_node

    def set_exit_node(self, exit_node: str | None, *, allow_lan_access: bool | None = None) -> dict:
        """Select an exit node (a peer's name or IP), or None / "" for none, without a restart;
        new connections follow at once.  Returns the routing status: the exit node's name,
        whether it is usable and if not why (an unusable one refuses outside destinations)."""
        if self.conf is not None:
            raise ConfigError("plain WireGuard mode has no exit nodes; its routes are the "
                              ".conf file's AllowedIPs")
        if exit_node is not None and not isinstance(exit_node, str):
            raise TypeError("exit_node must be a peer's name or IP address (a str) or None")
        from tsproxy.daemon.options import check_exit_node
        value = check_exit_node(exit_node, "exit_node") if exit_node and exit_node.strip() else None
        self._exit_node = value
        if allow_lan_access is not None:
            self._exit_lan = bool(allow_lan_access)
        if self.tailnet is None:
            return {"exit_node": {"selected": value} if value else None}
        return self.tailnet.set_exit_node(value, allow_lan_access)

    def set_accept_routes(self, on: bool) -> dict:
        """Use (or stop using) peers' advertised subnet routes, without a restart."""
        if self.conf is not None:
            raise ConfigError("plain WireGuard mode has no advertised subnet routes")
        self._accept_routes = bool(on)
        if self.tailnet is None:
            return {"accept_routes": self._accept_routes}
        return self.tailnet.set_accept_routes(on)

    # -- introspection ---------------------------------------------------------------------------
    def status(self) -> dict:
        """The data `tsproxy status --json` shows for a daemon."""
        from tsproxy.daemon.statusdoc import merge_counters, status_document
        common = dict(state=self.state, started=self.started, servers=self.servers,
                      metrics=None,                # a Node serves no /metrics of its own
                      forwards=self.forwards.values(), reverses=self.reverses,
                      process=self._process_status())
        if self.conf is None:
            if self.tailnet is not None:
                t = self.tailnet.status()
                sources = self.tailnet.counter_sources()
            else:                                  # not started yet
                t = {"self": None, "auth_url": None, "home_derp": None, "magicsock": None,
                     "peers": [], "control": {"url": self._control_url, "state": "NoState",
                                              "last_error": "", "failures": 0}}
                sources = []
            counters = merge_counters([*sources, *((f"proxy.{k}", s) for k, s in self.servers)])
            return status_document(addresses=self.addresses, tailnet=t, peers=t["peers"],
                                   counters=counters, **common)
        plane = self.wgplane
        sources = plane.counter_sources() if plane else []
        counters = merge_counters([*sources, *((f"proxy.{k}", s) for k, s in self.servers)])
        return status_document(
            addresses=self.addresses, peers=plane.peer_status() if plane else [],
            wireguard_port=plane.udp.port if plane and plane.udp and not self._closed else None,
            counters=counters, **common)

    def _process_status(self) -> dict:
        from tsproxy.aio import process_status
        plane = self.tailnet.magic if self.tailnet is not None else self.wgplane
        plane = getattr(plane, "udp", plane)
        return process_status(getattr(plane, "sock", None))

    def peers(self) -> list[dict]:
        """One row per peer (name, fqdn, addresses, online, path, ...), as in status()."""
        return self.status()["peers"]

    async def whois(self, ip: str) -> dict | None:
        """The peer that owns a tailnet address (its status row), or None."""
        want = str(ipaddress.ip_address(str(ip).strip("[]")))
        for p in self.peers():
            if want in p.get("addresses", []):
                return p
        return None

    async def ping(self, host: str, timeout: float = 5.0) -> dict:
        """One disco ping (as `tsproxy ping -c 1`): {"pong": bool, "latency_ms", "via"
        ("DERP(900)" or "IP:PORT"), "direct", "name", "ip"}; TsproxyError when the peer is
        unknown, offline, expired or cannot be pinged (the same reasons the CLI prints)."""
        from tsproxy.daemon import ops
        if self.tailnet is None:
            raise TsproxyError("ping needs Tailscale mode (plain WireGuard has no disco)")
        r = await ops.ping(self, {"host": host, "timeout": timeout})
        if not r.get("ok"):
            raise TsproxyError(r.get("error", "ping failed"))
        return {k: v for k, v in r.items() if k != "ok"}

    def __repr__(self) -> str:
        mode = "wireguard" if self.conf is not None else "tailscale"
        return f"<tsproxy.Node {self.hostname} {mode} {self.state}>"


class TailnetServer:
    """What start_server() returns: close(), wait_closed(), `async with`."""

    def __init__(self, inner, addresses):
        self._inner = inner
        self.addresses = addresses     # [(ip, port)] we accept on
        self._serving = True

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        if self._serving:
            self._serving = False
            self._inner.close()

    async def wait_closed(self) -> None:
        await self._inner.wait_closed()

    async def __aenter__(self) -> "TailnetServer":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
        await self.wait_closed()


class TailnetDatagram:
    """A UDP socket on the node's stack (open_udp())."""

    def __init__(self, node: Node, ep):
        self._node = node
        self._ep = ep

    @property
    def port(self) -> int:
        return self._ep.port

    async def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        host, port = addr
        _check_port(port)
        kind, targets = await self._node._plane().dialer.route(host)
        if kind != "tunnel":
            raise NotAllowed(f"{host}:{port} is not on the tailnet (UDP goes over the tailnet only)")
        ip = sorted(targets, key=lambda a: a.version)[0]
        self._ep.sendto(bytes(data), (str(ip), port))

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        return await self._ep.recvfrom()

    def close(self) -> None:
        self._ep.close()


def _check_port(port) -> None:
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port!r}")


def _load_wg_config(value):
    from tsproxy.daemon import wgconf
    text = os.fspath(value)
    if isinstance(text, str) and ("\n" in text or text.lstrip().startswith("[")):
        return wgconf.parse(text)
    return wgconf.load(text)


def _default_hostname() -> str:
    from tsproxy.daemon.runtime import _default_hostname as host_default
    return host_default()
