"""The daemon: builds the object graph, runs it, and shuts it down in order.

Tailscale mode (the default; daemon/tailnet.py) joins a tailnet through a control server.
Plain WireGuard mode (a wg-quick file):

    listeners / forwards ──► Dialer ──► NetstackRuntime(Stack) ──► WgDevice ──► UDP socket
    reverse forwards     ◄──────────────┘                     ◄──┘          ◄──┘

`prepare()` turns options into a Plan and raises ConfigError for anything a user got wrong,
before the daemon detaches; `Daemon.run()` owns every task and socket it opens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from tsproxy.daemon import exposure, ipc, memtrim, options, statedir, wgconf
from tsproxy.daemon.statusdoc import merge_counters, status_document
from tsproxy.errors import ConfigError, TsproxyError

log = logging.getLogger("tsproxy.daemon")


@dataclass
class Plan:
    opts: options.UpOptions
    state_dir: str
    wg: wgconf.WgConfig | None                     # None: Tailscale mode
    listeners: list[tuple[str, str, int]]          # (kind: mixed|socks5|http, host, port)
    forwards: list = field(default_factory=list)   # proxy.forward specs
    reverses: list = field(default_factory=list)
    proxy_user: str | None = None
    proxy_password: str | None = None
    auth_key: str | None = field(default=None, repr=False)
    hostname: str = ""


def prepare(opts: options.UpOptions) -> Plan:
    from tsproxy.proxy import specs

    state_dir = statedir.ensure_state_dir(opts.state_dir or os.environ.get("TSPROXY_STATE_DIR")
                                          or statedir.default_state_dir())
    conf = wgconf.load(opts.wg_config) if opts.wg_config else None
    auth_key = _read_auth_key(opts.auth_key) if opts.auth_key else None
    listeners = []
    if opts.listen:
        listeners.append(("mixed", *options.parse_listen_addr(opts.listen)))
    listeners += [("socks5", *options.parse_listen_addr(a)) for a in opts.socks5]
    listeners += [("http", *options.parse_listen_addr(a)) for a in opts.http_proxy]
    password = None
    if opts.proxy_password_file:
        try:
            with open(opts.proxy_password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"cannot read the proxy password file ({e.strerror})",
                              path=opts.proxy_password_file) from None
        if not password:
            raise ConfigError("the proxy password file is empty", path=opts.proxy_password_file)
    for kind, host, port in listeners:
        exposure.check_proxy_listener(host, port, authed=bool(opts.proxy_user),
                                      allow_public=opts.allow_public_without_auth)
    forwards = [specs.parse_forward(s) for s in opts.forward]
    for spec in forwards:
        options.check_forward(spec, True, options.source_of(opts, "forward"))   # port 0
        exposure.check_forward(spec, allow_public=opts.allow_public_without_auth)
    reverses = [specs.parse_reverse(s) for s in opts.reverse]
    hostname = opts.hostname or _default_hostname()
    return Plan(opts, state_dir, conf, listeners, forwards, reverses, opts.proxy_user, password,
                auth_key, hostname)


def _read_auth_key(value: str) -> str:
    """`--auth-key KEY` or `file:PATH` (kept out of the process list)."""
    if not value.startswith("file:"):
        return value.strip()
    path = value[5:]
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the auth key file ({e.strerror})", path=path) from None
    if not key:
        raise ConfigError("the auth key file is empty", path=path)
    return key


def _default_hostname() -> str:
    import re
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return name or "tsproxy"


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from tsproxy.daemon.logjson import JsonFormatter
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def run_foreground(plan: Plan) -> int:
    setup_logging(plan.opts.log_level, plan.opts.log_format)
    lock = statedir.DaemonLock(plan.state_dir)
    lock.acquire()
    try:
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        try:
            return runner(Daemon(plan).run())
        except TsproxyError as e:
            print(f"tsproxy: {e}", file=sys.stderr, flush=True)
            return 1
    finally:
        lock.release()


class Daemon:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.conf = plan.wg
        self.state = "Starting"
        self.started = time.time()
        self.stopping: asyncio.Event | None = None
        self.device = None
        self.udp = None
        self.netstack = None
        self.dialer = None
        self.servers: list = []        # proxy listeners
        self.forwards: dict = {}       # key "tcp:16579" -> ForwardServer
        self.reverses: list = []
        self.ipc: ipc.IpcServer | None = None
        self.tailnet = None            # TailnetPlane in Tailscale mode
        self.metrics = None            # MetricsServer with --metrics
        self.wgplane = None            # WgPlane in plain WireGuard mode
        self._pacs: list = []          # PacConfigs of the listeners, refreshed per netmap
        self.heap_trimmer = memtrim.HeapTrimmer()

    # -- build -------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        # freed heap back to the system once a load peak is over (tsproxy/daemon/memtrim.py)
        trim = asyncio.create_task(self.heap_trimmer.watch(memtrim.task_count), name="heap-trim")
        try:
            if self.conf is None:
                return await self._run_tailnet()
            return await self._run_wireguard()
        finally:
            trim.cancel()

    async def _run_tailnet(self) -> int:
        from tsproxy.daemon.tailnet import TailnetPlane

        opts = self.plan.opts
        self.tailnet = TailnetPlane(control_url=opts.login_server, state_dir=self.plan.state_dir,
                                    hostname=self.plan.hostname, auth_key=self.plan.auth_key,
                                    ephemeral=opts.ephemeral, tags=opts.advertise_tags,
                                    udp_port=int(opts.port or 0), non_tailnet=opts.non_tailnet,
                                    accept_routes=opts.accept_routes,
                                    ca_file=opts.control_ca_file, exit_node=opts.exit_node,
                                    exit_node_allow_lan_access=opts.exit_node_allow_lan_access)
        try:
            self.ipc = ipc.IpcServer(statedir.socket_path(self.plan.state_dir), self._handle_ipc)
            await self.ipc.start()
            await self._start_metrics()
            # bind every local listener before the control server hears of us: a port in use
            # fails here, not after the node is registered (and left offline in every netmap)
            self.dialer = LateDialer()
            await self._start_frontends(reverses=False)
            _check_udp_port(int(opts.port or 0))
            log.info("joining the tailnet at %s as %s", opts.login_server, self.plan.hostname)
            if not await self.tailnet.start(self.stopping):
                return 0
            self.tailnet.on_applied = self._refresh_pac
            self._refresh_pac(self.tailnet.netmap)
            self.netstack, self.device = self.tailnet.netstack, self.tailnet.device
            self.dialer.target = self.tailnet.dialer
            await self._start_frontends(listeners=False)
            self.state = "Running"
            log.info("running: %s", ", ".join(self.tailnet.addresses()))
            await self.stopping.wait()
            self.state = "Stopping"
        finally:
            await self._shutdown()
        return 0

    async def _run_wireguard(self) -> int:
        from tsproxy.daemon.wgplane import WgPlane

        self.wgplane = WgPlane(self.conf, non_tailnet=self.plan.opts.non_tailnet)
        try:
            await self.wgplane.start()
            self.device, self.udp = self.wgplane.device, self.wgplane.udp
            self.netstack, self.dialer = self.wgplane.netstack, self.wgplane.dialer
            await self._start_frontends()
            self.ipc = ipc.IpcServer(statedir.socket_path(self.plan.state_dir), self._handle_ipc)
            await self.ipc.start()
            await self._start_metrics()
            self.state = "Running"
            log.info("running: %s", ", ".join(self.wgplane.addresses()))
            await self.stopping.wait()
            self.state = "Stopping"
        finally:
            await self._shutdown()
        return 0

    async def _start_metrics(self) -> None:
        if self.plan.opts.metrics:
            from tsproxy.daemon.metrics import MetricsServer
            self.metrics = MetricsServer(self, *options.parse_listen_addr(self.plan.opts.metrics))
            await self._start_or_explain(self.metrics, self.plan.opts.metrics)

    async def _start_frontends(self, listeners: bool = True, reverses: bool = True) -> None:
        from tsproxy.proxy.aio.reverse import ReverseForward

        if listeners and self.plan.listeners:
            await self._start_listeners()
        for spec in self.plan.forwards if listeners else ():
            await self.add_forward(spec)
        for spec in self.plan.reverses if reverses else ():
            rev = ReverseForward(self.netstack, spec)
            await rev.start()
            self.reverses.append(rev)

    async def _start_listeners(self) -> None:
        from tsproxy.proxy.aio.listener import ProxyServer
        from tsproxy.proxy.auth import ProxyAuth

        auth = ProxyAuth(self.plan.proxy_user, self.plan.proxy_password) if self.plan.proxy_user else None
        for kind, host, port in self.plan.listeners:
            srv = ProxyServer(self.dialer, listen=(host, port), auth=auth, protocols=kind,
                              pac=self._pac_config())
            await self._start_or_explain(srv, f"{host}:{port}")
            self.servers.append((kind, srv))

    def _pac_config(self):
        from tsproxy.proxy.pac import PacConfig

        if self.tailnet is not None:
            pac = PacConfig()
            self._pacs.append(pac)
            if self.tailnet.netmap is not None:
                self._refresh_pac(self.tailnet.netmap)
            return pac
        return PacConfig.from_table(self.wgplane.dialer.table)

    def _refresh_pac(self, nm) -> None:
        """Peers come and go and the exit node changes: the PAC file follows the tailnet's
        RouteTable (names, suffixes, split-DNS routes, prefixes, exit node)."""
        from tsproxy.proxy.pac import PacConfig
        fresh = PacConfig.from_table(self.tailnet.table or self.tailnet._table(nm))
        for pac in self._pacs:
            pac.update(fresh)

    async def _start_or_explain(self, srv, where: str) -> None:
        try:
            await srv.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {where} ({e.strerror or e}); is the port already in use?") from None

    async def add_forward(self, spec):
        from tsproxy.proxy.aio.forward import ForwardServer

        key = spec.key
        if key in self.forwards:
            raise ConfigError(f"a forward on {spec.proto} port {spec.listen_port} already exists")
        exposure.check_forward(spec, allow_public=self.plan.opts.allow_public_without_auth)  # IPC add too
        fw = ForwardServer(self.dialer, spec)
        await self._start_or_explain(fw, f"{spec.listen_host}:{spec.listen_port}")
        self.forwards[key] = fw
        return fw

    async def _shutdown(self) -> None:
        """Front ends first (no new work), then the stack, then the socket; bounded."""
        async def close(obj):
            try:
                async with asyncio.timeout(5):
                    await obj.aclose()
            except Exception as e:                 # keep closing the rest; report it
                log.warning("error while closing %s: %r", type(obj).__name__, e)
        if self.ipc:
            await close(self.ipc)
        if self.metrics is not None:
            await close(self.metrics)
        for _, srv in self.servers:
            await close(srv)
        for fw in list(self.forwards.values()):
            await close(fw)
        for rev in self.reverses:
            await close(rev)
        if self.tailnet is not None:
            await close(self.tailnet)
        elif self.wgplane is not None:
            await close(self.wgplane)

    # -- control socket ------------------------------------------------------------------------
    async def _handle_ipc(self, req: dict, reader, writer):
        op = req["op"]
        if op == "status":
            return self.status()
        if op == "down":
            self.stopping.set()
            return {"ok": True}
        if op == "logout":
            if self.tailnet is None:
                return {"ok": False, "error": "plain WireGuard mode has no login to log out of"}
            try:
                await self.tailnet.logout()
            except (OSError, TsproxyError) as e:
                self.stopping.set()
                return {"ok": True, "warning": f"the control server was not told ({e}); "
                                               "the node keys are forgotten anyway"}
            self.stopping.set()
            return {"ok": True}
        if op == "dial":
            return await self._ipc_dial(req, reader, writer)
        if op == "set":
            return self._ipc_set(req)
        if op == "debug.tcp":
            return {"ok": True, "connections": self._tcp_debug()}
        if op == "forward.list":
            return {"ok": True, "forwards": [fw.describe() for fw in self.forwards.values()]}
        if op == "forward.add":
            from tsproxy.proxy import specs
            from tsproxy.daemon import ops
            spec = specs.parse_forward(str(req.get("spec", "")))
            options.check_forward(spec, True)      # port 0; exposure is checked in add_forward
            fw = await self.add_forward(spec)
            return {"ok": True, "forward": fw.describe(), "warning": await ops.forward_warning(self, spec)}
        if op == "forward.remove":
            key = str(req.get("port", ""))
            key = key if ":" in key else f"tcp:{key}"
            fw = self.forwards.pop(key, None)
            if fw is None:
                return {"ok": False, "error": f"no forward on {key}"}
            await fw.aclose()
            return {"ok": True}
        from tsproxy.daemon import ops
        if op in ops.HANDLERS:
            return await ops.HANDLERS[op](self, req)
        return {"ok": False, "error": f"unknown request {op!r}"}

    def _ipc_set(self, req: dict) -> dict:
        """`tsproxy set`: exit node, LAN access and subnet routes, changed without a restart."""
        if self.tailnet is None:
            return {"ok": False, "error": "plain WireGuard mode has no exit nodes or subnet routes; "
                                          "its routes are the .conf file's AllowedIPs"}
        known = {"op", "exit_node", "exit_node_allow_lan_access", "accept_routes"}
        unknown = sorted(set(req) - known)
        if unknown:
            return {"ok": False, "error": f"set: unknown setting {unknown[0]!r}"}
        for key in ("exit_node_allow_lan_access", "accept_routes"):
            if key in req and not isinstance(req[key], bool):
                return {"ok": False, "error": f"set: {key} must be true or false"}
        if "exit_node" in req:
            if not isinstance(req["exit_node"], str):
                return {"ok": False, "error": "set: exit_node must be a name, an IP or \"\""}
            if req["exit_node"].strip():
                options.check_exit_node(req["exit_node"])
        if "accept_routes" in req:
            self.tailnet.accept_routes = req["accept_routes"]
        if "exit_node" in req or "exit_node_allow_lan_access" in req:
            routing = self.tailnet.set_exit_node(
                req["exit_node"] if "exit_node" in req else self.tailnet.exit_node,
                req.get("exit_node_allow_lan_access"))
        else:
            routing = self.tailnet.set_accept_routes(self.tailnet.accept_routes)
        return {"ok": True, "routing": routing}

    async def _ipc_dial(self, req, reader, writer):
        from tsproxy.proxy.aio.relay import relay

        host, port = req.get("host"), req.get("port")
        if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
            return {"ok": False, "error": "dial needs a host name and a port 1..65535"}
        from tsproxy.daemon import ops
        from tsproxy.proxy.specs import fmt_hostport
        offline = ops.offline_reason(self, host)
        if offline:
            return {"ok": False, "error": offline}
        try:
            r2, w2 = await self.dialer.open_connection(host, port)
        except TsproxyError as e:
            return {"ok": False, "error": f"cannot connect to {fmt_hostport(host, port)}: {e}"}
        writer.write(b'{"ok": true}\n')
        await writer.drain()
        await relay(reader, writer, r2, w2)
        return None

    def status(self) -> dict:
        metrics = self.metrics.address_text() if self.metrics else None
        common = dict(started=self.started, servers=self.servers, metrics=metrics,
                      forwards=self.forwards.values(), reverses=self.reverses,
                      counters=self._counters(), process=self._process_status())
        if self.tailnet is None:
            return status_document(
                state=self.state, addresses=[str(a.ip) for a in self.conf.interface.addresses],
                wireguard_port=self.udp.port if self.udp else None,
                peers=self.wgplane.peer_status() if self.wgplane else [], **common)
        t = self.tailnet.status()
        state = self.state
        if state not in ("Running", "Stopping"):
            # logged in but the data plane or the listeners are still coming up: Starting
            state = "Starting" if t["control"]["state"] == "Running" else t["control"]["state"]
        return status_document(state=state, addresses=self.tailnet.addresses(), tailnet=t,
                               peers=t["peers"], **common)

    def _process_status(self) -> dict:
        from tsproxy.aio import process_status
        plane = self.tailnet.magic if self.tailnet is not None else self.udp
        return process_status(getattr(plane, "sock", None))

    def _tcp_debug(self) -> list[dict]:
        """Per-connection TCP internals for `tsproxy status --json`-style debugging."""
        out = []
        fields = ("state", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "cwnd", "ssthresh", "recovery",
                  "recovery_point", "rtx_high", "high_sack", "sacked_bytes", "dupacks", "rto", "rto_at",
                  "persist_at", "retries", "rcv_nxt", "ooo_bytes")
        now = asyncio.get_running_loop().time()
        conns = self.netstack.stack.live_connections() if self.netstack else []
        for conn in conns[:100]:
            d = {k: getattr(conn, k) for k in fields}
            d["sndbuf"] = len(conn.sndbuf)
            d["rcvbuf"] = len(conn.rcv_buf)
            d["sacked"] = conn.sacked[:8]
            d["now"] = now
            d["sched"] = getattr(conn, "_sched", None)
            out.append(d)
        return out

    def _counters(self) -> dict:
        if self.tailnet is not None:
            sources = self.tailnet.counter_sources()
        else:
            sources = self.wgplane.counter_sources() if self.wgplane else []
        return merge_counters([*sources, *((f"proxy.{kind}", srv) for kind, srv in self.servers),
                               ("ipc", self.ipc), ("memory", self.heap_trimmer)])


def _check_udp_port(port: int) -> None:
    """A fixed --port in use fails now, before registering; MagicConn binds it again once the
    first netmap gives it our node key (a short window, but the common case is caught)."""
    if not port:
        return
    from tsproxy.aio import bind_udp
    try:
        bind_udp(None, port).close()
    except OSError as e:
        raise ConfigError(f"cannot open the UDP port {port} ({e.strerror or e}); "
                          "is it already in use?") from None


class LateDialer:
    """Stands in for the tailnet's Dialer until the first netmap builds it, so the listeners can
    be bound before logging in; a connection before then is refused with the reason."""

    def __init__(self):
        self.target = None

    def __getattr__(self, name):
        if self.target is None:
            async def not_yet(*args, **kwargs):
                from tsproxy.errors import HostUnreachable
                raise HostUnreachable("not connected to the tailnet yet (see 'tsproxy status')")
            return not_yet
        return getattr(self.target, name)

