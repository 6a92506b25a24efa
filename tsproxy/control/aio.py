"""asyncio side of the control client: /key, /ts2021 upgrade, HTTP/2 over Noise, login, map poll.

    ControlClient(control_url, state, hostname=..., auth_key=..., on_netmap=..., ...)
        await run()          login + streaming map poll forever; reconnects with capped
                             exponential backoff (1 s .. 30 s), a 429's Retry-After;
                             raises AuthKeyRejected only for the first login (no identity)
        await logout()       register with Expiry in the past, then forget the node keys
        set_endpoints(list), set_preferred_derp(region)   -> lite map update
        status() -> dict

`state` is a tsproxy.daemon.state.StateStore (duck-typed: load()/save()/clear_node()).
A control outage never touches the last good netmap: on_netmap is only called with new ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from tsproxy.control import messages as msg
from tsproxy.control import ping as pingmod
from tsproxy.control import wire
from tsproxy.control.client import AuthKeyRejected, LoginFlow  # noqa: F401 (re-export)
from tsproxy.control.client import retry_after_seconds
from tsproxy.control.netmap import MapSession, unknown_node_attrs
from tsproxy.control.noiseconn import ClientHandshake, NoiseConnection
from tsproxy.errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError
from tsproxy.keys import MachinePublic, NodePrivate
from tsproxy.netdial.aio import open_stream
from tsproxy.tlsconfig.aio import CertificateVerifyFailed, default_trust, verify_failure

log = logging.getLogger(__name__)

DIAL_TIMEOUT = 10.0
WATCHDOG = 120.0
BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
READ_CHUNK = 65536
H2_INTERNAL_ERROR = 2


class StreamReset(RemoteProtocolError):
    def __init__(self, code: int):
        super().__init__(f"control reset the request (HTTP/2 error {code})")
        self.code = code


class RateLimited(RemoteProtocolError):
    """HTTP 429 on register: wait `retry_after` seconds, not the usual backoff."""

    def __init__(self, retry_after: float):
        super().__init__(f"registration rate limited; retrying after {retry_after:.0f} s")
        self.retry_after = retry_after


class ControlURL:
    def __init__(self, url: str, trust=None):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"control URL must be http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.tls = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.tls else 80)
        self.authority = u.netloc.rsplit("@", 1)[-1]
        self.trust = trust or default_trust()     # tlsconfig.aio.Trust for https://

    def ssl_context(self):
        return self.trust.context() if self.tls else None


async def _open(url: ControlURL, timeout: float):
    ctx = url.ssl_context()                       # tlsconfig: system roots (+ private CA)
    # direct, or through HTTPS_PROXY/HTTP_PROXY (CONNECT) unless NO_PROXY says otherwise
    return await open_stream(url.host, url.port, scheme="https" if url.tls else "http", ssl=ctx,
                             server_hostname=url.host if url.tls else None, timeout=timeout)


async def fetch_server_key(url: ControlURL, *, version: int = msg.CAPABILITY_VERSION,
                           timeout: float = DIAL_TIMEOUT) -> MachinePublic:
    reader, writer = await _open(url, timeout)
    try:
        writer.write((f"GET {wire.key_path(version)} HTTP/1.1\r\nHost: {url.authority}\r\n"
                      f"User-Agent: tsproxy\r\nConnection: close\r\n\r\n").encode())
        async with asyncio.timeout(timeout):
            buf = b""
            while (split := wire.split_http_head(buf)) is None:
                chunk = await reader.read(4096)
                if not chunk:
                    raise RemoteProtocolError("/key: connection closed in headers")
                buf += chunk
            head, body = split
            status_line, headers = wire.parse_http_head(head)
            if status_line.split(" ")[1:2] != ["200"]:
                raise RemoteProtocolError(f"/key: HTTP {status_line[:80]}")
            n = int(headers.get("content-length", -1))
            while (n < 0 or len(body) < n) and len(body) <= wire.MAX_KEY_RESPONSE:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                body += chunk
            return MachinePublic(wire.parse_key_response(body[:n] if n >= 0 else body))
    finally:
        writer.close()


async def _http_head(url: ControlURL, path: str) -> int:
    """HEAD url (a plain-HTTP PingRequest); returns the status.  Same dial path as control."""
    reader, writer = await _open(url, DIAL_TIMEOUT)
    try:
        writer.write((f"HEAD {path} HTTP/1.1\r\nHost: {url.authority}\r\n"
                      f"User-Agent: tsproxy\r\nConnection: close\r\n\r\n").encode())
        buf = b""
        while (split := wire.split_http_head(buf)) is None:
            chunk = await reader.read(4096)
            if not chunk:
                raise RemoteProtocolError("ping: connection closed in headers")
            buf += chunk
        status_line, _ = wire.parse_http_head(split[0])
        parts = status_line.split(" ")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    finally:
        writer.close()


class NoiseH2:
    """One Noise connection carrying one HTTP/2 client connection; streams multiplexed."""

    def __init__(self, reader, writer, noise: NoiseConnection, authority: str):
        self._reader, self._writer, self.noise = reader, writer, noise
        self.authority = authority
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self._streams: dict[int, asyncio.Queue] = {}
        self._closed: BaseException | None = None
        self._task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, url: ControlURL, machine_key, server_key: MachinePublic, *,
                      timeout: float = DIAL_TIMEOUT) -> NoiseH2:
        reader, writer = await _open(url, timeout)
        try:
            hs = ClientHandshake(machine_key, server_key, url.authority,
                                 version=msg.CAPABILITY_VERSION)
            writer.write(hs.request)
            async with asyncio.timeout(timeout):
                conn = None
                while conn is None:
                    data = await reader.read(READ_CHUNK)
                    if not data:
                        raise RemoteProtocolError("control: connection closed during upgrade")
                    conn = hs.receive_data(data)
        except BaseException:
            writer.close()
            raise
        self = cls(reader, writer, conn, url.authority)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(1 << 24)
        self._flush()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.noise.write(data)
            self._writer.write(self.noise.data_to_send())

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    raise RemoteProtocolError("control connection closed")
                self.noise.receive_data(data)
                plain = self.noise.read()
                if plain:
                    try:
                        events = self.h2.receive_data(plain)
                    except h2.exceptions.ProtocolError as e:
                        raise RemoteProtocolError(f"control HTTP/2: {e}") from None
                    for ev in events:
                        self._on_event(ev)
                    self._flush()
        except (Exception, asyncio.CancelledError) as e:
            self._closed = e if isinstance(e, Exception) else RemoteProtocolError("closed")
            for q in self._streams.values():
                q.put_nowait(self._closed)
            if isinstance(e, asyncio.CancelledError):
                raise

    def _on_event(self, ev) -> None:
        sid = getattr(ev, "stream_id", None)
        q = self._streams.get(sid)
        if isinstance(ev, h2.events.ResponseReceived) and q is not None:
            q.put_nowait(("headers", dict(ev.headers)))
        elif isinstance(ev, h2.events.DataReceived):
            self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            if q is not None:
                q.put_nowait(("data", ev.data))
        elif isinstance(ev, h2.events.StreamEnded) and q is not None:
            q.put_nowait(("end", None))
        elif isinstance(ev, h2.events.StreamReset) and q is not None:
            q.put_nowait(("reset", int(ev.error_code)))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            raise RemoteProtocolError(f"control sent GOAWAY ({ev.error_code})")

    async def request(self, path: str, body: bytes, headers=(), *,
                      method: str = "POST") -> "H2Response":
        if self._closed is not None:
            raise RemoteProtocolError("control connection closed")
        sid = self.h2.get_next_available_stream_id()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[sid] = q
        self.h2.send_headers(sid, [(":method", method), (":scheme", "https"),
                                   (":authority", self.authority), (":path", path),
                                   ("content-length", str(len(body))),
                                   ("user-agent", "tsproxy"), *headers])
        # request bodies are small JSON; they must fit the peer's initial window
        if len(body) > self.h2.local_flow_control_window(sid):
            raise LocalProtocolError("control request body exceeds the HTTP/2 window")
        step = self.h2.max_outbound_frame_size
        for off in range(0, len(body), step):
            self.h2.send_data(sid, body[off:off + step])
        self.h2.end_stream(sid)
        self._flush()
        resp = H2Response(self, sid, q)
        await resp._wait_headers()
        return resp

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._writer.close()


class H2Response:
    def __init__(self, conn: NoiseH2, sid: int, q: asyncio.Queue):
        self._conn, self.stream_id, self._q = conn, sid, q
        self.status = 0
        self.headers: dict = {}
        self.ended = False

    async def _next(self):
        item = await self._q.get()
        if isinstance(item, BaseException):
            raise item
        if item[0] == "reset":
            self.ended = True
            self._conn._streams.pop(self.stream_id, None)
            raise StreamReset(item[1])
        return item

    async def _wait_headers(self) -> None:
        kind, val = await self._next()
        if kind != "headers":
            raise RemoteProtocolError("control: stream ended without headers")
        self.headers = val
        self.status = int(val.get(":status", 0))

    async def read_chunk(self) -> bytes:
        """Next DATA chunk, b"" at the end of the stream."""
        if self.ended:
            return b""
        kind, val = await self._next()
        if kind == "end":
            self.ended = True
            self._conn._streams.pop(self.stream_id, None)
            return b""
        return val

    async def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while chunk := await self.read_chunk():
            out += chunk
            if len(out) > limit:
                raise RemoteProtocolError("control response too large")
        return bytes(out)


class ControlClient:
    def __init__(self, control_url: str, state, *, hostname: str, auth_key: str | None = None,
                 tags=(), ephemeral: bool = False, on_netmap=None, on_auth_url=None,
                 on_state=None, rng=os.urandom, clock=time.time, trust=None):
        self.url = ControlURL(control_url, trust)
        self._store = state
        self.ident = state.load()
        self.hostname = hostname
        self._auth_key = auth_key
        self.tags = tuple(tags)
        self.ephemeral = ephemeral
        self._on_netmap = on_netmap or (lambda nm: None)
        self._on_auth_url = on_auth_url or (lambda url: None)
        self._on_state = on_state or (lambda s: None)
        self._rng = rng
        self._clock = clock
        self.state = "NoState"
        self.netmap = None
        self.last_error = ""
        self.failures = 0
        self.auth_url = ""
        self._endpoints: list = []
        self._preferred_derp = 0
        self._conn: NoiseH2 | None = None
        self._server_key: MachinePublic | None = None
        self._force_regen = False
        self._lite_tasks: set[asyncio.Task] = set()
        self._lite_wanted = False
        self.lite_failures = 0
        self._ping_tasks: set[asyncio.Task] = set()
        self._last_ping_url = ""
        self.pings_answered = 0
        # what control sent that we do not act on, counted (never an error)
        self.counters = {"node_attrs_unknown": 0, "c2n_answered": 0, "c2n_not_handled": 0,
                         "pings_unsupported": 0, "register_rate_limited": 0}
        self._unknown_attrs: set[str] = set()
        self.watchdog = WATCHDOG
        self._sleep = asyncio.sleep               # tests record the delays
        self.backoff_min = BACKOFF_MIN
        self.backoff_max = BACKOFF_MAX

    # -- public API -----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """A Noise/HTTP2 connection to the control server is open now (between attempts: not)."""
        return self._conn is not None

    def status(self) -> dict:
        node = self.ident.node_key
        return {"state": self.state, "control_url": self.url.url, "last_error": self.last_error,
                "failures": self.failures, "auth_url": self.auth_url,
                "node_key": node.public().text() if node else None,
                "peers": len(self.netmap.peers) if self.netmap else 0}

    def set_endpoints(self, endpoints: list) -> None:
        self._endpoints = list(endpoints)
        self._kick_lite()

    def set_preferred_derp(self, region: int) -> None:
        self._preferred_derp = region
        self._kick_lite()

    async def run(self) -> None:
        backoff = self.backoff_min
        while True:
            try:
                await self._session()
                backoff = self.backoff_min
            except AuthKeyRejected as e:
                if self.ident.node_key is None:       # first login: the key is all we have
                    self._set_state("NeedsLogin")
                    raise
                # a registered node: report it, keep the identity, never present the key again
                self._auth_key = None
                self.failures += 1
                self.last_error = f"{e}; continuing without the auth key"[:300]
                log.warning("control: %s", self.last_error)
            except RateLimited as e:
                self.failures += 1
                self.counters["register_rate_limited"] += 1
                self.last_error = str(e)
                log.warning("control: %s", e)
                self._drop_conn()
                await self._sleep(e.retry_after)
                continue
            except CertificateVerifyFailed as e:
                # a wrong CA does not fix itself: fail at start (`up` exits 1 with this line),
                # later retry at the slowest pace
                self.failures += 1
                self.last_error = str(e)
                if self.netmap is None:
                    raise
                log.warning("control: %s; retrying in %.0f s", e, self.backoff_max)
                backoff = self.backoff_max
            except (OSError, asyncio.TimeoutError, ProtocolError, ValueError) as e:
                self.failures += 1
                self._server_key = None           # the server may have a new key after a restart
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                log.warning("control: %s; retrying in %.0f s", self.last_error, backoff)
            finally:
                self._drop_conn()
            await self._sleep(backoff * (0.75 + 0.5 * self._rng(1)[0] / 255))
            backoff = min(backoff * 2, self.backoff_max)

    async def logout(self) -> None:
        try:
            if self.ident.node_key is not None:
                conn = await self._connect()
                await self._register(conn, expiry=msg.LOGOUT_EXPIRY, auth=False)
        finally:
            # as Go: forget the node keys whatever the server said (or if it was unreachable)
            self._drop_conn()
            self._store.clear_node(self.ident)
            self.netmap = None
            self._set_state("NeedsLogin")

    # -- internals ------------------------------------------------------------------------
    def _set_state(self, s: str) -> None:
        if s != self.state:
            self.state = s
            self._on_state(s)

    def _hostinfo(self) -> dict:
        return msg.hostinfo(self.hostname, tags=self.tags, preferred_derp=self._preferred_derp)

    def _drop_conn(self) -> None:
        for t in list(self._lite_tasks) + list(self._ping_tasks):   # die with their connection
            t.cancel()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _connect(self) -> NoiseH2:
        try:
            if self._server_key is None:
                self._server_key = await fetch_server_key(self.url)
            self._conn = await NoiseH2.connect(self.url, self.ident.machine_key, self._server_key)
        except ssl.SSLCertVerificationError as e:
            raise verify_failure("control server", self.url.host, self.url.port, e) from None
        return self._conn

    async def _register(self, conn: NoiseH2, *, expiry: str = msg.ZERO_TIME, followup: str = "",
                        auth: bool = True, node_key: NodePrivate | None = None,
                        old: NodePrivate | None = None) -> msg.RegisterResponse:
        nk = node_key or self.ident.node_key
        body = msg.build_register_request(
            node_key=nk.public(), old_node_key=old.public() if old else None,
            hostinfo=self._hostinfo(), auth_key=self._auth_key if auth else None,
            followup=followup, expiry=expiry, ephemeral=self.ephemeral)
        sent_key = bool(auth and self._auth_key)
        try:
            resp = await conn.request("/machine/register", body,
                                      [("ts-lb", nk.public().text())])
            data = await resp.read_all(msg.MAX_REGISTER_RESPONSE)
        except StreamReset as e:
            if sent_key and e.code == H2_INTERNAL_ERROR:
                raise AuthKeyRejected(
                    "control server reset the register request that carried the auth key "
                    "(Headscale 0.25.0 does this for an invalid, expired or used key)") from None
            raise
        text = data[:200].decode("utf-8", "replace").strip()
        if self._auth_key:
            text = text.replace(self._auth_key, "<auth key>")
        if resp.status == 429:
            raise RateLimited(retry_after_seconds(resp.headers.get("retry-after"), self._clock(),
                                                  self._rng(1)[0] / 255))
        if resp.status in (401, 403) and sent_key:
            # Headscale 0.23/0.24: a bad or used key is a bare 401 with no Error
            raise AuthKeyRejected(f"control server rejected the auth key: http {resp.status}"
                                  + (f" {text[:80]}" if text else ""))
        if resp.status != 200:
            raise RemoteProtocolError(f"register request: http {resp.status}: {text}")
        return msg.parse_register_response(data)

    async def _login(self, conn: NoiseH2) -> None:
        flow = LoginFlow(self.ident, auth_key=self._auth_key, force_regen=self._force_regen,
                         rng=self._rng)
        while not flow.done:
            at = flow.next_attempt()
            r = await self._register(conn, node_key=at.node_key, old=at.old_node_key,
                                     followup=at.followup, auth=at.send_auth)
            flow.on_response(r)
            if flow.auth_url:
                self.auth_url = flow.auth_url
                self._set_state("NeedsLogin")
                if flow.auth_url_changed:
                    self._on_auth_url(flow.auth_url)
                else:                             # same URL again: do not spin
                    await asyncio.sleep(self.backoff_min)
        self.auth_url = ""
        self._force_regen = False
        self._store.save(self.ident)

    async def _session(self) -> None:
        conn = await self._connect()
        await self._login(conn)
        self._set_state("Starting")
        self._kick_lite()
        await self._poll(conn)

    async def _poll(self, conn: NoiseH2) -> None:
        body = msg.build_map_request(node_key=self.ident.node_key.public(),
                                     disco_key=self.ident.disco_key.public(),
                                     hostinfo=self._hostinfo(), endpoints=self._endpoints)
        async with asyncio.timeout(self.watchdog):
            resp = await conn.request("/machine/map", body,
                                      [("ts-lb", self.ident.node_key.public().text())])
        if resp.status != 200:
            data = await resp.read_all(4096)
            raise RemoteProtocolError(f"map request: http {resp.status}: "
                                      f"{data[:200].decode('utf-8', 'replace')}")
        dec = msg.MapStreamDecoder()
        session = MapSession()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.watchdog       # reset by each complete message
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that
                # lands as the chunk arrives, and a busy stream would then never stop
                async with asyncio.timeout_at(deadline):
                    chunk = await resp.read_chunk()
            except TimeoutError:
                raise RemoteProtocolError(
                    f"map stream: no message for {self.watchdog:.0f} s (watchdog)") from None
            if not chunk:
                raise RemoteProtocolError("map stream ended")
            objs = dec.feed(chunk)
            if objs:
                deadline = loop.time() + self.watchdog
            for obj in objs:
                m = msg.parse_map_response(obj)
                if m.ping_request is not None:            # also on keep-alives
                    self._on_ping(conn, m.ping_request)
                nm = session.apply(m, self._clock())
                if nm is None:
                    continue
                msg.fix_embedded_derp(nm.derp_map, self.url.host, self.url.port)
                self.failures = 0
                self.last_error = ""
                if session.self_expired(self._clock()):
                    self._set_state("NeedsLogin")
                    self._force_regen = True      # next login: new key, OldNodeKey = this one
                    raise RemoteProtocolError("our node key expired; re-registering")
                self.netmap = nm
                self._note_attrs(nm.self_node.cap_map)
                if nm.self_node.machine_authorized:
                    self._set_state("Running")
                else:
                    self._set_state("NeedsMachineAuth")
                if nm.self_node.stable_id and nm.self_node.stable_id != self.ident.node_id:
                    self.ident.node_id = nm.self_node.stable_id
                    self._store.save(self.ident)
                self._on_netmap(nm)

    def _note_attrs(self, cap_map: dict) -> None:
        for attr in unknown_node_attrs(cap_map):
            if attr not in self._unknown_attrs and len(self._unknown_attrs) < 1024:
                self._unknown_attrs.add(attr)
                self.counters["node_attrs_unknown"] += 1
                log.info("control: ignoring unknown node attribute %r", attr[:80])

    def _on_ping(self, conn: NoiseH2, obj: dict) -> None:
        pr = pingmod.parse_ping_request(obj)
        if pr is None:
            log.info("control: ignoring a PingRequest without a usable URL")
            return
        if pr.url == self._last_ping_url:             # duplicates are ignored (Go)
            return
        self._last_ping_url = pr.url
        if pr.kind == "unsupported":
            self.counters["pings_unsupported"] += 1
            log.info("control: unsupported ping type %r", pr.types[:40])
            return
        task = asyncio.get_running_loop().create_task(self._answer_ping(conn, pr))
        self._ping_tasks.add(task)
        task.add_done_callback(self._ping_done)

    def _ping_done(self, task: asyncio.Task) -> None:
        self._ping_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("control: answering a ping failed: %s", task.exception())

    async def _answer_ping(self, conn: NoiseH2, pr) -> None:
        if pr.log:
            log.info("control: answering a %s ping", pr.kind)
        u = urlsplit(pr.url)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        if pr.kind == "c2n":                          # always over Noise (Go answerPing)
            status, reply = pingmod.c2n_answer(pr.payload, self._health())
            self.counters["c2n_answered" if status < 400 else "c2n_not_handled"] += 1
            async with asyncio.timeout(pingmod.C2N_TIMEOUT):
                resp = await conn.request(path, reply,
                                          [("content-type", "application/octet-stream")])
                await resp.read_all(1 << 16)
        elif pr.url_is_noise:
            async with asyncio.timeout(pingmod.HEAD_TIMEOUT):
                resp = await conn.request(path, b"", method="HEAD")
                await resp.read_all(1 << 16)
        else:
            async with asyncio.timeout(pingmod.HEAD_TIMEOUT):
                await _http_head(ControlURL(pr.url), path)
        self.pings_answered += 1

    def _health(self) -> dict:
        """Warnings for c2n /debug/health: the last control error, if any."""
        return {"control-health": self.last_error} if self.last_error else {}

    def _kick_lite(self) -> None:
        """Send our endpoints, disco key and home DERP in a lite update, retried with backoff
        until one succeeds (Headscale 0.23-0.26 and Tailscale learn them only from these);
        a newer kick while one is in flight is folded into the next send."""
        conn = self._conn
        if conn is None or self.ident.node_key is None:
            return
        self._lite_wanted = True
        if any(not t.done() for t in self._lite_tasks):
            return
        task = asyncio.get_running_loop().create_task(self._lite_loop(conn))
        self._lite_tasks.add(task)
        task.add_done_callback(self._lite_done)

    def _lite_done(self, task: asyncio.Task) -> None:
        self._lite_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("control: lite update failed: %s", task.exception())

    async def _lite_loop(self, conn: NoiseH2) -> None:
        backoff = self.backoff_min
        while self._lite_wanted:
            self._lite_wanted = False
            try:
                await self._lite(conn)
                backoff = self.backoff_min
            except (OSError, asyncio.TimeoutError, ProtocolError) as e:
                if conn is not self._conn:
                    return                    # the next session sends a fresh one
                self._lite_wanted = True
                self.lite_failures += 1
                log.info("control: lite update failed (%s); retrying in %.1f s", e, backoff)
                await self._sleep(backoff * (0.75 + 0.5 * self._rng(1)[0] / 255))
                backoff = min(backoff * 2, self.backoff_max)

    async def _lite(self, conn: NoiseH2) -> None:
        body = msg.build_map_request(node_key=self.ident.node_key.public(),
                                     disco_key=self.ident.disco_key.public(),
                                     hostinfo=self._hostinfo(), endpoints=self._endpoints,
                                     stream=False)
        async with asyncio.timeout(DIAL_TIMEOUT):
            resp = await conn.request("/machine/map", body)
            await resp.read_all(1 << 20)
        if resp.status != 200:
            raise RemoteProtocolError(f"lite map update: http {resp.status}")

