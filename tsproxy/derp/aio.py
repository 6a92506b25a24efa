"""asyncio DERP connection: TCP (+TLS) + HTTP upgrade + DerpClient, reconnect with backoff.

    conn = DerpConnection(url_or_node, node_private, on_packet=cb)   # cb(src: bytes, data: bytes)
    task = asyncio.create_task(conn.run()); conn.send(dst, data); await conn.close()

TLS: verified against `trust` (tlsconfig.aio.Trust: the system roots, SSL_CERT_FILE/_DIR, plus
--control-ca-file; the same trust as the control client); `insecure=True` (InsecureForTests)
skips verification; `cert_sha256` ("sha256-raw:<hex>" pinning) checks the leaf's DER hash
instead.  A verification failure is logged once as one line and retried at the slowest pace. Fast start (derpkey meta cert)
is not implemented: we always read the 101 response and the ServerKey frame.
"""
import asyncio
import hashlib
import logging
import random
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

from tsproxy.derp.client import DerpClient
from tsproxy.errors import ConfigError, RemoteProtocolError
from tsproxy.netdial.aio import open_stream
from tsproxy.tlsconfig.aio import default_trust, unverified_context, verify_failure

log = logging.getLogger(__name__)
MAX_SEND_QUEUE = 1024
CONNECT_TIMEOUT = 10.0
NODE_DIAL_TIMEOUT = 3.0     # per node of a region (Go: 1.5 s TCP); ours also covers TLS / CONNECT
MAX_BACKOFF = 5.0
VERIFY_FAILED_BACKOFF = 30.0    # a bad certificate does not fix itself in seconds


def node_target(node: dict) -> tuple[str, str, int, bool, str | None]:
    """DERPNode dict -> (dial host, server name, port, insecure, pinned sha256 hex or None)."""
    host = node.get("IPv4") if node.get("IPv4") not in (None, "", "none") else None
    host = host or (node.get("IPv6") if node.get("IPv6") not in (None, "", "none") else None)
    host = host or node["HostName"]
    cert = node.get("CertName", "")
    pin = cert[len("sha256-raw:"):] if cert.startswith("sha256-raw:") else None
    return host, node["HostName"], node.get("DERPPort") or 443, bool(node.get("InsecureForTests")), pin


class DerpConnection:
    def __init__(self, target, node_private, *, on_packet, on_event=None, preferred: bool = False,
                 clock=time.monotonic, trust=None):
        """target: a URL ('http://h:p/derp' or 'https://...'), a DERPNode dict (always TLS), or
        a callable returning the region's current DERPNode dicts: re-read on every connect and
        dialed in order, each node within NODE_DIAL_TIMEOUT (Go derphttp's region client)."""
        self._nodes_fn = None
        if isinstance(target, str):
            u = urlsplit(target)
            self._tls = u.scheme == "https"
            self._host = self._sni = u.hostname
            self._port = u.port or (443 if self._tls else 80)
            self._insecure, self._pin = False, None
        elif callable(target):
            self._tls = True
            self._nodes_fn = target
            self._host, self._sni, self._port, self._insecure, self._pin = "", "", 0, False, None
        else:
            self._tls = True
            self._host, self._sni, self._port, self._insecure, self._pin = node_target(target)
        self.node_name = ""
        self.last_rx = 0.0
        self._key = node_private
        self._trust = trust or default_trust()
        self.last_error = ""
        self._on_packet = on_packet
        self._on_event = on_event
        self._preferred = preferred
        self._clock = clock
        self._queue: deque = deque()
        self._wake = asyncio.Event()
        self._client: DerpClient | None = None
        self._writer = None
        self._closed = False
        self.connected = asyncio.Event()
        self.counters = {"connects": 0, "disconnects": 0, "send_queue_dropped": 0, "protocol_errors": 0,
                         "tls_verify_failed": 0, "node_dial_failures": 0}

    def _ssl_context(self):
        if not self._tls:
            return None
        if self._insecure or self._pin:
            return unverified_context()
        return self._trust.context()

    def send(self, dst: bytes, data: bytes) -> bool:
        """Queue one packet; False (counted) when the bounded queue is full."""
        if len(self._queue) >= MAX_SEND_QUEUE:
            self.counters["send_queue_dropped"] += 1
            return False
        self._queue.append((bytes(dst), bytes(data)))
        self._wake.set()
        return True

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._writer is not None:
            self._writer.close()

    def set_private_key(self, node_private) -> None:
        """Use a new node key (rotation): the current session ends and run() reconnects with
        it, keeping queued packets (the server knows us by the key in ClientInfo)."""
        if node_private.raw == self._key.raw:
            return
        self._key = node_private
        self.drop_connection()

    def set_preferred(self, preferred: bool) -> None:
        """This region became (or stopped being) our home: tell the server (NotePreferred)."""
        self._preferred = preferred
        if self._client is not None:
            self._client.note_preferred(preferred)
            self._wake.set()

    def drop_connection(self) -> None:
        """Close the current connection (tests / network change); run() reconnects."""
        if self._writer is not None:
            self._writer.close()

    async def run(self) -> None:
        backoff = 0.0
        while not self._closed:
            verify_failed = False
            try:
                await self._session()
            except (OSError, RemoteProtocolError, TimeoutError, asyncio.IncompleteReadError,
                    ssl.SSLError) as e:
                if isinstance(e, RemoteProtocolError):
                    self.counters["protocol_errors"] += 1
                log.debug("[derp %s:%s] connection lost: %s", self._host, self._port, e)
                verify_failed = self._verify_failed(e)
            except ConfigError as e:           # e.g. a malformed HTTPS_PROXY: say so, keep trying
                log.warning("[derp %s:%s] %s", self._host, self._port, e)
            if self.connected.is_set():
                backoff = 0.0  # the last session worked: retry quickly
                self.last_error = ""
            self.connected.clear()
            if self._closed:
                return
            self.counters["disconnects"] += 1
            backoff = VERIFY_FAILED_BACKOFF if verify_failed else min(MAX_BACKOFF, backoff * 2 or 0.1)
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))

    def _verify_failed(self, e: BaseException) -> bool:
        bad = verify_failure("DERP server", self._sni, self._port, e)
        if bad is None:
            return False
        self.counters["tls_verify_failed"] += 1
        if str(bad) != self.last_error:           # one line per distinct failure, not per retry
            log.warning("%s", bad)
        self.last_error = str(bad)
        return True

    async def _dial(self):
        if self._nodes_fn is None:
            return await open_stream(
                self._host, self._port, scheme="https" if self._tls else "http",
                ssl=self._ssl_context(), server_hostname=(self._sni if self._tls else None),
                timeout=CONNECT_TIMEOUT)
        nodes = [n for n in self._nodes_fn() if not n.get("STUNOnly")]
        if not nodes:
            raise OSError("DERP region has no nodes")
        last: BaseException | None = None
        for i, node in enumerate(nodes):
            host, sni, port, insecure, pin = node_target(node)
            self._host, self._sni, self._port, self._insecure, self._pin = \
                host, sni, port, insecure, pin
            try:
                streams = await open_stream(host, port, scheme="https", ssl=self._ssl_context(),
                                            server_hostname=sni, timeout=NODE_DIAL_TIMEOUT)
            except (OSError, TimeoutError, ssl.SSLError, RemoteProtocolError) as e:
                log.debug("[derp %s] node %s:%s failed: %s", node.get("Name"), host, port, e)
                self.counters["node_dial_failures"] += 1
                last = e
                continue
            self.node_name = node.get("Name", "")
            self._ideal = nodes[0].get("Name", "") if i else ""
            return streams
        raise last

    async def _session(self) -> None:
        self._ideal = ""
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await self._dial()
            self._writer = writer
            try:
                if self._pin:
                    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                    if hashlib.sha256(der).hexdigest() != self._pin.lower():
                        raise RemoteProtocolError("DERP server certificate does not match the pin")
                ideal = f"Ideal-Node: {self._ideal}\r\n" if self._ideal else ""
                writer.write(f"GET /derp HTTP/1.1\r\nHost: {self._sni}\r\nConnection: Upgrade\r\n"
                             f"Upgrade: DERP\r\n{ideal}User-Agent: tsproxy\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b"\r\n", 1)[0].split(b" ")
                if len(status) < 2 or status[1] != b"101":
                    raise RemoteProtocolError(f"DERP upgrade refused: {head[:40]!r}")
            except BaseException:
                writer.close()
                raise
        client = DerpClient(self._key, now=self._clock(), preferred=self._preferred)
        self._client = client
        self.counters["connects"] += 1
        pump = asyncio.create_task(self._pump(client, writer))
        try:
            while True:
                timeout = max(0.0, client.next_deadline() - self._clock())
                try:
                    data = await asyncio.wait_for(reader.read(65536), timeout)
                except TimeoutError:
                    client.handle_timer(self._clock())
                    continue
                if not data:
                    raise ConnectionResetError("DERP server closed the connection")
                self.last_rx = self._clock()
                client.receive_data(data, self.last_rx)
                out = client.data_to_send()
                if out:
                    writer.write(out)
                while (ev := client.next_event()) is not None:
                    if ev[0] == "packet":
                        self._on_packet(ev[1], ev[2])
                        continue
                    if ev[0] == "connected":
                        self.connected.set()
                        self._wake.set()
                    if self._on_event is not None:
                        self._on_event(ev)
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)    # never left pending
            self._client = None
            writer.close()

    async def _pump(self, client: DerpClient, writer) -> None:
        """Flush queued sends once the server has answered ClientInfo."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not client.connected:
                continue
            q = self._queue
            while q:
                dst, data = q.popleft()
                client.send_packet(dst, data)
            out = client.data_to_send()
            if out:
                writer.write(out)
                try:
                    await writer.drain()
                except OSError:
                    writer.close()  # the read loop sees EOF and run() reconnects
                    return


async def https_latency(node: dict, *, timeout: float) -> float | None:
    """netcheck's HTTPS fallback when UDP is blocked: seconds from writing
    `GET /derp/latency-check` to the first byte of the answer (Go: ServerProcessing), or None."""
    host, sni, port, insecure, pin = node_target(node)
    ctx = ssl.create_default_context()
    if insecure or pin:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await open_stream(host, port, scheme="https", ssl=ctx,
                                               server_hostname=sni, timeout=timeout)
            writer.write(f"GET /derp/latency-check HTTP/1.1\r\nHost: {sni}\r\n"
                         f"User-Agent: tsproxy\r\nConnection: close\r\n\r\n".encode())
            start = loop.time()
            first = await reader.read(1)
            if not first:
                return None
            return loop.time() - start
    except (OSError, TimeoutError, ssl.SSLError, ConfigError) as e:
        log.debug("[derp %s] HTTPS latency probe failed: %s", node.get("Name"), e)
        return None
    finally:
        if writer is not None:
            writer.close()
