"""Test control server: TS2021 (Noise IK + HTTP/2) speaking the server side of PROTOCOL.md 2-4, 9.

    srv = TestControlServer(host="127.0.0.1", derp_map=derp_map(derp_server))
    await srv.start()
    key = srv.create_auth_key(reusable=True).key
    ... clients use srv.url ...
    await srv.stop()

HTTP/1.1 on the listener:
    GET  /key?v=N          the server's Noise public key (JSON)
    POST /ts2021           upgrade to Noise, then HTTP/2 with /machine/register and /machine/map
    GET  /register/<id>    the AuthURL page of an interactive login; POST it to approve
    GET  /generate_204     204 (Go's captive-portal probe, pointed here by TS_NETCHECK_GENERATE_204_URL)
    GET  /debug/nodes      JSON of the registry (for people poking at a running server)
Framing by RFC 9112 (control/http1.py): persistent connections and pipelined requests answered
in order, `Connection: close` (and HTTP/1.0 without keep-alive) answered then closed, bodies by
Content-Length or chunked, bad framing answered 4xx/5xx and closed.  HEAD works wherever GET does.

TLS: with `tls=TestCA()` the listener on `port` speaks HTTPS (certificate signed by that CA for
the host; HTTP/1.1 with the same TS2021 upgrade inside TLS) and `url` is https://; a second,
plain-HTTP listener serves the same routes at `http_url` for clients that cannot do TLS.  A
plain-HTTP request on the TLS port gets 400 "Client sent an HTTP request to an HTTPS server"
(as from Go's net/http; control/tls_listener.py) and is closed.

Test hooks: approve(), expire_node(), delete_node(), set_routes(), set_exit_node(),
approve_routes(), auto_approve_routes (attribute), primary_routes(), set_node_attr(),
set_capabilities(),
set_packet_filter(), set_dns(),
set_derp_map(), drop_streams(), restart() (same key and state, every connection dropped),
inject_raw() (send arbitrary bytes on a node's map stream), send_ping() (PingRequest; answers
in .pings).  Real servers' behaviours, as attributes: bad_key_answer ("error" | "http401" |
"reset": Headscale >= 0.25.1 / 0.23-0.24 / 0.25.0), rate_limit_registers + retry_after (429),
fail_lite_updates (500 to the next N lite updates), stream_updates_node (False: Headscale
0.23-0.26, node details only from lite updates), registry.renew_expired (False: an expired node
must log in again).

Profiles: `profile="headscale"` behaves as Headscale does in every quirk PROTOCOL.md lists
(control/headscale.py): capability versions below 113 refused, node details from lite updates
only, its keep-alive cadence, its /key answers, and an embedded DERP server on the control
listener at /derp, published as region 999 with HostName "headscale" and DERPPort 0 (or, with
embedded_derp="server_url", with the server URL's host and port).
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
import random
import time
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from tsproxy.control import wire
from tsproxy.control.messages import encode_map_message
from tsproxy.control.noiseconn import ServerHandshake
from tsproxy.errors import RemoteProtocolError
from tsproxy.keys import MachinePrivate
from tsproxy.noise.ik import Responder
from tsproxy.testing.control import headscale as hs_profile
from tsproxy.testing.control import http1
from tsproxy.testing.control.hooks import RouteHooks
from tsproxy.testing.control.mapper import ALLOW_ALL, StreamView
from tsproxy.testing.control.mapper import format_time as mapper_format_time
from tsproxy.testing.control.registry import Registry, RegistryError

log = logging.getLogger(__name__)
MAX_HEAD = 16 << 10
MAX_FORM_BODY = 64 << 10
MAX_REQUEST_BODY = 1 << 20
KEEPALIVE = 50.0
EPHEMERAL_IDLE = 30.0


class _Stream:
    def __init__(self, node_id: int, compress: bool):
        self.node_id = node_id
        self.compress = compress
        self.view = StreamView(node_id)
        self.wake = asyncio.Event()
        self.closed = False
        self.raw: list[bytes] = []


class _H2Session:
    """One Noise connection carrying HTTP/2 (server side)."""

    def __init__(self, server: "TestControlServer", reader, writer, noise, machine: str):
        self.server = server
        self.reader, self.writer, self.noise = reader, writer, noise
        self.machine = machine
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_inbound_headers=False))
        self.lock = asyncio.Lock()
        self.window = asyncio.Event()
        self.tasks: dict[int, asyncio.Task] = {}

    async def flush(self) -> None:
        async with self.lock:
            data = self.h2.data_to_send()
            if data:
                self.noise.write(data)
                self.writer.write(self.noise.data_to_send())
            await self.writer.drain()

    async def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        view = memoryview(data)
        while True:
            n = min(len(view), self.h2.local_flow_control_window(sid),
                    self.h2.max_outbound_frame_size)
            if n <= 0 and len(view):
                self.window.clear()
                await self.flush()
                await self.window.wait()
                continue
            last = n == len(view)
            self.h2.send_data(sid, bytes(view[:n]), end_stream=end and last)
            view = view[n:]
            if last:
                break
        await self.flush()

    async def reply(self, sid: int, status: int, body: bytes = b"", ctype: str = "application/json"):
        self.h2.send_headers(sid, [(":status", str(status)), ("content-type", ctype),
                                   ("content-length", str(len(body)))], end_stream=not body)
        if body:
            await self.send_data(sid, body, end=True)
        else:
            await self.flush()

    async def run(self) -> None:
        self.h2.initiate_connection()
        await self.flush()
        bodies: dict[int, bytearray] = {}
        heads: dict[int, dict] = {}
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.noise.receive_data(data)
                for ev in self.h2.receive_data(self.noise.read()):
                    if isinstance(ev, h2.events.RequestReceived):
                        heads[ev.stream_id] = dict(ev.headers)
                        bodies[ev.stream_id] = bytearray()
                    elif isinstance(ev, h2.events.DataReceived):
                        b = bodies.get(ev.stream_id)
                        if b is not None:
                            b += ev.data
                            if len(b) > MAX_REQUEST_BODY:
                                self.h2.reset_stream(ev.stream_id)
                                bodies.pop(ev.stream_id)
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        sid = ev.stream_id
                        if sid in bodies:
                            t = asyncio.create_task(self._dispatch(sid, heads.pop(sid),
                                                                   bytes(bodies.pop(sid))))
                            self.tasks[sid] = t
                            t.add_done_callback(lambda _t, s=sid: self.tasks.pop(s, None))
                    elif isinstance(ev, h2.events.StreamReset):
                        t = self.tasks.get(ev.stream_id)
                        if t is not None:
                            t.cancel()
                    elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                        self.window.set()
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        return
                await self.flush()
        finally:
            for t in list(self.tasks.values()):
                t.cancel()

    async def _dispatch(self, sid: int, head: dict, body: bytes) -> None:
        path = head.get(":path", "")
        try:
            if path == "/machine/register":
                await self.server._register(self, sid, _json(body))
            elif path == "/machine/map":
                await self.server._map(self, sid, _json(body))
            elif path == "/machine/update-health":
                await self.reply(sid, 204)
            elif path.startswith("/ping/"):
                self.server._ping_answered(path, head.get(":method", ""), body, "noise")
                await self.reply(sid, 200, b"", "text/plain")
            else:
                await self.reply(sid, 404, b"not found", "text/plain")
        except _BadRequest as e:
            await self.reply(sid, 400, str(e).encode(), "text/plain")
        except (ConnectionError, RemoteProtocolError, h2.exceptions.ProtocolError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:                       # one bad request never takes the server down
            log.exception("test control: %s failed", path)
            try:
                await self.reply(sid, 500, b"internal error", "text/plain")
            except Exception:
                pass


class _BadRequest(Exception):
    pass


def _json(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest("body is not JSON") from None
    if not isinstance(obj, dict):
        raise _BadRequest("body is not a JSON object")
    return obj


class TestControlServer(RouteHooks):
    __test__ = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, derp_map: dict | None = None,
                 domain: str = "tailnet.test", keepalive: float = KEEPALIVE,
                 ephemeral_idle: float = EPHEMERAL_IDLE, machine_key: MachinePrivate | None = None,
                 clock=time.time, tls=None, http_port: int = 0, profile: str = "tailscale",
                 embedded_derp: str = "headscale", auto_approve_routes=False):
        if profile not in ("tailscale", "headscale"):
            raise ValueError(f"profile must be 'tailscale' or 'headscale', not {profile!r}")
        self.profile = profile
        self.host, self.port = host, port
        self.tls = tls                  # testing.tlsca.TestCA, or None for plain HTTP only
        self.http_port = http_port      # the plain listener's port when tls is set
        self.key = machine_key or MachinePrivate.generate()
        self.registry = Registry(domain=domain)
        self.registry.auto_approve_routes = auto_approve_routes
        self.derp_map = derp_map or {"Regions": {}}
        self.packet_filter: list = ALLOW_ALL
        self.dns: dict = {"Resolvers": [], "Domains": [domain], "Proxied": True}
        self.keepalive = keepalive
        self.ephemeral_idle = ephemeral_idle
        self.clock = clock
        self.streams: list[_Stream] = []
        # behaviours of real servers, for tests (see also registry.renew_expired):
        # how a refused auth key is answered: "error" (200 + Error: Tailscale, Headscale
        # >= 0.25.1), "http401" (Headscale 0.23/0.24: 401, no Error), "reset" (Headscale 0.25.0:
        # the HTTP/2 stream is reset by a server panic)
        self.bad_key_answer = "error"
        self.rate_limit_registers = 0          # answer the next N registers 429
        self.retry_after: str | None = None    # their Retry-After header (None: absent)
        self.fail_lite_updates = 0             # answer the next N lite updates 500
        # False: endpoints, disco key, Hostinfo come from lite updates only (Headscale 0.23-0.26)
        self.stream_updates_node = True
        self.min_cap_version = 0               # below it: refused (Headscale: 113)
        self.keepalive_jitter: float | None = None   # None: up to keepalive/6 per keep-alive;
        #                                      else 0..jitter once per stream (Headscale 9 s)
        self.embedded_derp = None              # a TestDerpServer served at /derp (Headscale)
        self._embedded_style = embedded_derp
        self.pings: dict[str, dict | None] = {}   # send_ping() id -> the answer (None: none yet)
        self.counters = {"register": 0, "map_stream": 0, "map_lite": 0, "noise_failed": 0,
                         "http_requests": 0}
        self._server: asyncio.base_events.Server | None = None
        self._plain: asyncio.base_events.Server | None = None
        self._ssl_ctx = None
        self._conns: set = set()
        self._conn_tasks: set[asyncio.Task] = set()
        self._waiters: dict[str, asyncio.Event] = {}
        self._reaper: asyncio.Task | None = None
        self.noise_versions: list[int] = []     # protocol version of each Noise handshake
        if profile == "headscale":
            self._headscale()

    def _headscale(self) -> None:
        if self.keepalive == KEEPALIVE:
            self.keepalive = hs_profile.KEEPALIVE
        self.keepalive_jitter = hs_profile.KEEPALIVE_JITTER
        self.min_cap_version = hs_profile.MIN_CAP_VERSION
        self.stream_updates_node = False
        self.bad_key_answer = "error"           # >= 0.25.1
        self.registry.renew_expired = False
        self.registry.honour_old_node_key = False
        self.registry.request_ephemeral = False
        self.registry.headscale = True

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def http_url(self) -> str:
        """Plain-HTTP URL of the same server (== url without TLS)."""
        if not self.tls:
            return self.url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.http_port}"

    async def start(self) -> None:
        if self.tls is not None and self._ssl_ctx is None:
            from tsproxy.testing.tlsca import default_names
            self._ssl_ctx = self.tls.server_context(default_names(self.host))
        if self._ssl_ctx is not None:
            from tsproxy.testing.control.tls_listener import start_tls_server
            self._server = await start_tls_server(self._conn, self.host, self.port,
                                                  self._ssl_ctx, limit=MAX_HEAD * 2)
        else:
            self._server = await asyncio.start_server(self._conn, self.host, self.port,
                                                      limit=MAX_HEAD * 2)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.tls is not None:
            self._plain = await asyncio.start_server(self._conn, self.host, self.http_port,
                                                     limit=MAX_HEAD * 2)
            self.http_port = self._plain.sockets[0].getsockname()[1]
        self.registry.base_url = self.url
        if self.profile == "headscale" and self.embedded_derp is None:
            from tsproxy.testing.derp_server import TestDerpServer
            self.embedded_derp = TestDerpServer(host=self.host, tls=False, stun_port=0,
                                                region_id=hs_profile.REGION_ID)
            await self.embedded_derp.start()    # its own listener is unused; STUN is used
            region = hs_profile.embedded_region(host=self.host, port=self.port,
                                                stun_port=self.embedded_derp.stun_addr[1],
                                                style=self._embedded_style)
            # added to the regions given (Headscale merges derp.urls/paths with its own)
            self.derp_map = {**self.derp_map, "Regions": {
                **self.derp_map.get("Regions", {}), str(hs_profile.REGION_ID): region}}
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_loop())

    async def stop(self) -> None:
        await self._close_listener()
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self.embedded_derp is not None:
            await self.embedded_derp.stop()
            self.embedded_derp = None

    async def _close_listener(self) -> None:
        if self._plain is not None:
            self._plain.close()
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()
        for t in list(self._conn_tasks):
            t.cancel()
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._plain is not None:
            await self._plain.wait_closed()
            self._plain = None

    async def restart(self, downtime: float = 0.0) -> None:
        """Drop every connection and the listener, wait, listen again on the same port with
        the same key and registry (a control-server restart, as clients see it)."""
        await self._close_listener()
        for node in self.registry.nodes.values():
            node.streams = 0
            self.registry.set_online(node, False, self.clock())
        if downtime:
            await asyncio.sleep(downtime)
        await self.start()

    def drop_streams(self) -> None:
        for w in list(self._conns):
            w.close()

    # -- operator API --------------------------------------------------------------------------
    def create_auth_key(self, **kw):
        return self.registry.create_auth_key(**kw)

    def pending_logins(self) -> list[str]:
        return list(self.registry.pending)

    def approve(self, pid: str, user_id: int = 1) -> None:
        self.registry.approve(pid, self.clock(), user_id)
        ev = self._waiters.get(pid)
        if ev is not None:
            ev.set()
        self.notify()

    def expire_node(self, node_id: int) -> None:
        self.registry.expire_node(node_id, self.clock())
        self.notify()

    def delete_node(self, node_id: int) -> None:
        self.registry.delete_node(node_id)
        self.notify()

    def set_packet_filter(self, rules: list) -> None:
        self.packet_filter = rules
        self.notify()

    def set_dns(self, dns: dict) -> None:
        self.dns = dns
        self.notify()

    def set_derp_map(self, derp_map: dict) -> None:
        self.derp_map = derp_map
        self.notify()

    def node(self, hostname: str):
        return self.registry.by_hostname(hostname)

    def inject_raw(self, node_id: int, data: bytes) -> bool:
        """Queue raw bytes (e.g. a malformed frame) on that node's live map stream(s)."""
        hit = False
        for s in self.streams:
            if s.node_id == node_id and not s.closed:
                s.raw.append(data)
                s.wake.set()
                hit = True
        return hit

    def send_ping(self, node_id: int, *, types: str = "", noise: bool = False,
                  payload: bytes = b"", keepalive: bool = True) -> str:
        """Send a PingRequest on the node's map stream(s); returns its id.  types "" asks
        for a HEAD to our /ping/<id> (over Noise when `noise`), "c2n" for the HTTP request in
        `payload` to be answered with a POST over Noise.  Answers land in self.pings[id]."""
        import base64
        pid = os.urandom(6).hex()
        pr = {"URL": f"{self.url}/ping/{pid}", "Log": True}
        if types:
            pr["Types"] = types
        if noise:
            pr["URLIsNoise"] = True
        if payload:
            pr["Payload"] = base64.b64encode(payload).decode()
        obj = {"KeepAlive": True, "PingRequest": pr} if keepalive else \
            {"PingRequest": pr, "ControlTime": mapper_format_time(self.clock())}
        self.pings[pid] = None
        for st in self.streams:
            if st.node_id == node_id and not st.closed:
                st.raw.append(encode_map_message(obj, compressed=st.compress))
                st.wake.set()
        return pid

    def _ping_answered(self, path: str, method: str, body: bytes, via: str) -> None:
        pid = path[len("/ping/"):]
        if pid in self.pings and self.pings[pid] is None:
            self.pings[pid] = {"method": method, "body": body, "via": via}

    def notify(self) -> None:
        """Wake every map stream: each sends whatever changed for its node."""
        for s in self.streams:
            s.wake.set()

    async def wait_for(self, predicate, timeout: float = 30.0):
        """Wait until predicate() is truthy; returns its value."""
        async with asyncio.timeout(timeout):
            while not (v := predicate()):
                await asyncio.sleep(0.05)
            return v

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.registry.reap_ephemeral(self.clock(), self.ephemeral_idle):
                self.notify()

    # -- HTTP/1.1 front door ---------------------------------------------------------------------
    async def _conn(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._conn_tasks.add(task)
        self._conns.add(writer)
        try:
            if await self._serve_http(reader, writer):
                await _lingering_close(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            # stop()/restart() cancel handlers; on 3.11, start_server's done-callback would log
            # a traceback for a handler task that ends cancelled, so this one ends normally
            pass
        finally:
            self._conns.discard(writer)
            self._conn_tasks.discard(task)
            writer.close()

    async def _serve_http(self, reader, writer) -> bool:
        """Answer requests in order until one asks to close, framing fails or the peer ends;
        True when a response was the last thing sent (then close lingering, RFC 9112 9.6)."""
        rr = http1.RequestReader(max_head=MAX_HEAD, max_body=MAX_FORM_BODY)

        async def more() -> bool:
            data = await reader.read(65536)
            rr.feed(data)
            return bool(data)

        while True:
            try:
                while (head := rr.next_head()) is None:
                    if not await more():
                        return False                  # clean end between requests
                self.counters["http_requests"] += 1
                path = urlsplit(head.target).path
                if path == wire.UPGRADE_PATH:
                    await self._upgrade(reader, writer, head.raw, rr.take_rest())
                    return False
                if self.embedded_derp is not None and path.startswith("/derp"):
                    self.counters["embedded_derp"] = self.counters.get("embedded_derp", 0) + 1
                    await _hand_over(self.embedded_derp, reader, writer,
                                     head.raw + b"\r\n\r\n" + rr.take_rest())
                    return False
                if head.expects_continue and (head.chunked or head.content_length):
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                while (body := rr.next_body(head)) is None:
                    if not await more():
                        return False                  # body cut short: nothing to answer
            except http1.BadFraming as e:
                self.counters["http_bad_framing"] = self.counters.get("http_bad_framing", 0) + 1
                log.debug("test control: bad HTTP request: %s", e)
                msg = f"{e}\n".encode()
                writer.write(http1.response(e.status, "text/plain", msg, head_only=False,
                                            close=True))
                await writer.drain()
                return True
            status, ctype, payload = self._http(head.method, path, body,
                                                urlsplit(head.target).query)
            writer.write(http1.response(status, ctype, payload, head_only=head.method == "HEAD",
                                        close=head.close_after,
                                        keep_alive_10=head.version < (1, 1)))
            await writer.drain()
            if head.close_after:
                return True

    def _http(self, method: str, path: str, body: bytes,
              query: str = "") -> tuple[str, str, bytes]:
        if path == wire.KEY_PATH and method in ("GET", "HEAD"):
            if self.profile == "headscale":
                v = parse_qs(query).get("v", [""])[0]
                if not v.isdigit():
                    return "400 Bad Request", "text/plain", b"missing or bad v parameter\n"
                if int(v) < hs_profile.NOISE_CAP_VERSION:
                    return "200 OK", "text/plain", b""
            return "200 OK", "application/json", wire.build_key_response(self.key.public().raw)
        if path.startswith("/ping/"):
            self._ping_answered(path, method, body, "http")
            return "200 OK", "text/plain", b""
        if path == "/generate_204":
            return "204 No Content", "text/plain", b""
        if path == "/debug/nodes" and method in ("GET", "HEAD"):
            nodes = [{"id": n.id, "name": n.name, "hostname": n.hostname, "ipv4": n.ipv4,
                      "ipv6": n.ipv6, "node_key": n.node_key, "disco_key": n.disco_key,
                      "endpoints": n.endpoints, "home_derp": n.home_derp, "online": n.online,
                      "ephemeral": n.ephemeral, "tags": n.tags,
                      "expired": n.expired(self.clock())}
                     for n in self.registry.nodes.values()]
            return "200 OK", "application/json", json.dumps(nodes, indent=1).encode()
        if path.startswith("/register/"):
            pid = path[len("/register/"):]
            p = self.registry.pending.get(pid)
            if p is None:
                return "404 Not Found", "text/plain", b"no such login\n"
            if method == "POST":
                self.approve(pid)
                return "200 OK", "text/plain", f"approved {p.hostname}\n".encode()
            page = (f"<html><body><p>Log in node {html.escape(p.hostname)}?</p>"
                    f"<form method=post><button>Approve</button></form></body></html>")
            return "200 OK", "text/html", page.encode()
        return "404 Not Found", "text/plain", b"not found\n"

    async def _upgrade(self, reader, writer, head: bytes, rest: bytes) -> None:
        hs = ServerHandshake(Responder(self.key), early_challenge=os.urandom(32))
        try:
            noise = hs.receive_data(head + b"\r\n\r\n" + rest)
        except RemoteProtocolError as e:
            self.counters["noise_failed"] += 1
            log.debug("test control: noise handshake failed: %s", e)
            out = hs.data_to_send()
            if not out:
                msg = b"bad handshake\n"
                out = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(msg) + msg
            writer.write(out)
            await writer.drain()
            return
        self.noise_versions.append(hs.version)
        if hs.version < self.min_cap_version:
            # Headscale's early-write hook fails: the 101 went out, the corked handshake
            # response never does, and the connection closes
            self.counters["noise_version_refused"] = \
                self.counters.get("noise_version_refused", 0) + 1
            writer.write(wire.UPGRADE_RESPONSE)
            await writer.drain()
            return
        writer.write(hs.data_to_send())
        await writer.drain()
        machine = "mkey:" + noise.peer_static.hex()
        session = _H2Session(self, reader, writer, noise, machine)
        try:
            await session.run()
        except (RemoteProtocolError, h2.exceptions.ProtocolError) as e:
            log.debug("test control: session ended: %s", e)

    # -- RPCs ----------------------------------------------------------------------------------
    async def _register(self, s: _H2Session, sid: int, req: dict) -> None:
        self.counters["register"] += 1
        if self.rate_limit_registers > 0:
            self.rate_limit_registers -= 1
            self.counters["register_429"] = self.counters.get("register_429", 0) + 1
            extra = [("retry-after", self.retry_after)] if self.retry_after is not None else []
            s.h2.send_headers(sid, [(":status", "429"), ("content-type", "text/plain"),
                                    *extra], end_stream=False)
            await s.send_data(sid, b"rate limited\n", end=True)
            return
        try:
            res = self.registry.register(req, s.machine, self.clock())
        except RegistryError as e:
            raise _BadRequest(str(e)) from None
        self.notify()
        if not self._version_ok(req):           # Headscale checks after handleRegister
            await s.reply(sid, 400, hs_profile.unsupported(req.get("Version")), "text/plain")
            return
        if res.auth_failure and self.bad_key_answer == "http401":
            await s.reply(sid, 401, b"Unauthorized\n", "text/plain")
            return
        if res.auth_failure and self.bad_key_answer == "reset":
            s.h2.reset_stream(sid, error_code=2)          # INTERNAL_ERROR, as Go's panic
            await s.flush()
            return
        body = res.body
        if res.wait_for is not None:
            ev = self._waiters.setdefault(res.wait_for, asyncio.Event())
            p = self.registry.pending.get(res.wait_for)
            if p is None or p.approved_user is None:
                await ev.wait()
            self._waiters.pop(res.wait_for, None)
            body = self.registry.finish_followup(res.wait_for)
            self.notify()
        await s.reply(sid, 200, json.dumps(body).encode())

    def _version_ok(self, req: dict) -> bool:
        v = req.get("Version")
        ok = not self.min_cap_version or (isinstance(v, int) and v >= self.min_cap_version)
        if not ok:
            self.counters["version_refused"] = self.counters.get("version_refused", 0) + 1
        return ok

    async def _map(self, s: _H2Session, sid: int, req: dict) -> None:
        if not self._version_ok(req):
            await s.reply(sid, 400, hs_profile.unsupported(req.get("Version")), "text/plain")
            return
        node = self.registry.by_node_key(req.get("NodeKey") or "")
        if node is None or node.machine != s.machine:
            await s.reply(sid, 404, b"node not found", "text/plain")
            return
        compress = req.get("Compress") == "zstd"
        if not req.get("Stream") and self.fail_lite_updates > 0:
            self.fail_lite_updates -= 1
            self.counters["map_lite_failed"] = self.counters.get("map_lite_failed", 0) + 1
            await s.reply(sid, 500, b"lite update failed (test)", "text/plain")
            return
        if (not req.get("Stream") or self.stream_updates_node) and \
                self.registry.update_from_map_request(node, req):
            self.notify()
        if not req.get("Stream"):
            self.counters["map_lite"] += 1
            if req.get("OmitPeers"):
                await s.reply(sid, 200, b"", "application/octet-stream")
            else:
                view = StreamView(node.id)
                msg = view.full(self.registry, derp_map=self.derp_map,
                                packet_filter=self.packet_filter, dns=self.dns, now=self.clock())
                await s.reply(sid, 200, encode_map_message(msg, compressed=compress))
            return
        self.counters["map_stream"] += 1
        for old in self.streams:                   # a new stream replaces the node's old one
            if old.node_id == node.id:
                old.closed = True
                old.wake.set()
        stream = _Stream(node.id, compress)
        self.streams.append(stream)
        node.streams += 1
        self.registry.set_online(node, True, self.clock())
        self.notify()
        s.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/octet-stream")])
        try:
            msg = stream.view.full(self.registry, derp_map=self.derp_map,
                                   packet_filter=self.packet_filter, dns=self.dns, now=self.clock())
            await s.send_data(sid, encode_map_message(msg, compressed=compress))
            keepalive = encode_map_message({"KeepAlive": True}, compressed=compress)
            per_stream = None if self.keepalive_jitter is None else \
                self.keepalive + random.uniform(0, self.keepalive_jitter)
            while True:
                timeout = per_stream if per_stream is not None else \
                    self.keepalive + random.uniform(0, self.keepalive / 6)
                try:
                    await asyncio.wait_for(stream.wake.wait(), timeout)
                except TimeoutError:
                    await s.send_data(sid, keepalive)
                    self.counters["keepalives"] = self.counters.get("keepalives", 0) + 1
                    continue
                stream.wake.clear()
                if stream.closed:
                    await s.send_data(sid, b"", end=True)
                    return
                while stream.raw:
                    await s.send_data(sid, stream.raw.pop(0))
                if node.id not in self.registry.nodes:
                    await s.send_data(sid, b"", end=True)   # deleted (ephemeral logout)
                    return
                d = stream.view.delta(self.registry, derp_map=self.derp_map,
                                      packet_filter=self.packet_filter, dns=self.dns,
                                      now=self.clock())
                if d is not None:
                    await s.send_data(sid, encode_map_message(d, compressed=compress))
        finally:
            stream.closed = True
            self.streams.remove(stream)
            node.streams -= 1
            if node.streams <= 0 and node.id in self.registry.nodes:
                node.streams = 0
                self.registry.set_online(node, False, self.clock())
                self.notify()


async def _hand_over(derp, reader, writer, prefix: bytes) -> None:
    """Serve this connection with the embedded DERP server: what was read so far first,
    then the rest of the socket."""
    inner = asyncio.StreamReader(limit=MAX_HEAD * 2)
    inner.feed_data(prefix)

    async def pump():
        try:
            while data := await reader.read(65536):
                inner.feed_data(data)
        except (ConnectionError, OSError):
            pass
        finally:
            inner.feed_eof()
    task = asyncio.create_task(pump())
    try:
        await derp._handle(inner, writer)
    finally:
        task.cancel()


async def _lingering_close(reader, writer, timeout: float = 2.0) -> None:
    """Half-close, then read and drop what the client still sends for a moment: closing with
    unread data would reset the connection and could destroy the response in flight."""
    if not writer.can_write_eof():      # TLS: no half-close; the client may wait for our EOF
        return
    writer.write_eof()
    try:
        async with asyncio.timeout(timeout):
            drained = 0
            while drained < (1 << 20) and (data := await reader.read(65536)):
                drained += len(data)
    except (TimeoutError, ConnectionError, OSError):
        pass
