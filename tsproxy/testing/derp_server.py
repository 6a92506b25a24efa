"""Test DERP server (PROTOCOL.md 10): plain HTTP or TLS, plus STUN.

    srv = TestDerpServer(tls=True, stun_port=0, region_id=900); await srv.start()
    derp_map = {"Regions": {"900": srv.derp_map_region()}}

TLS uses a self-signed certificate (the DERP map then says InsecureForTests), or with
`ca=TestCA()` a certificate that CA signs for the listen host (the DERP map then asks clients
to verify it, as production relays do).

Hooks for tests: restart() drops every connection (clients must reconnect), close_client(key).
Admission control (Headscale >= 0.27 `verify_clients`, derper --verify-clients): give
`verify_client`, a callable taking the client's 32-byte node key and returning whether it is a
current node key; a refused client is closed right after its ClientInfo, as Go's server does.
"""
import asyncio
import datetime
import hashlib
import json
import logging
import os
import random
import ssl
import tempfile

from nacl.public import Box, PrivateKey, PublicKey

from tsproxy.derp import wire
from tsproxy.disco import stun
from tsproxy.disco.wire import MAGIC as DISCO_MAGIC

log = logging.getLogger(__name__)
MAX_REQUEST_HEAD = 16 << 10
MAX_DEST_BUFFER = 2 << 20  # bytes queued toward one slow client before we drop (Go: 32-deep queues)


def make_self_signed(host: str) -> tuple[bytes, bytes]:
    """-> (cert PEM, key PEM). CN is the host, never 'derpkey...' (that would trigger fast start)."""
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        san = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def derp_map(*servers: "TestDerpServer") -> dict:
    """The DERPMap JSON dict for one or more started test servers (one region each)."""
    return {"Regions": {str(s.region_id): s.derp_map_region() for s in servers}}


class _Conn:
    def __init__(self, key: bytes, writer):
        self.key = key
        self.writer = writer
        self.sent_to: set[bytes] = set()
        self.preferred = False


class _Stun(asyncio.DatagramProtocol):
    def __init__(self, server):
        self.server = server

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        txid = stun.parse_request_lenient(data)
        if txid is None:
            self.server.counters["stun_bad"] += 1
            return
        self.server.counters["stun_requests"] += 1
        self.transport.sendto(stun.build_response(txid, addr[0], addr[1]), addr)


class TestDerpServer:
    __test__ = False  # not a pytest class

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: bool = False,
                 stun_port: int | None = 0, region_id: int = 900, keepalive: float = 60.0,
                 ca=None, verify_client=None):
        self.verify_client = verify_client
        self.host, self.port, self.tls, self.region_id = host, port, tls, region_id
        self.ca = ca                     # testing.tlsca.TestCA: a verifiable certificate
        self._stun_port = stun_port
        self.keepalive = keepalive
        self._priv = PrivateKey.generate()
        self.public = bytes(self._priv.public_key)
        self.clients: dict[bytes, _Conn] = {}
        self.seen_client_infos: list[tuple[bytes, dict]] = []
        self.ideal_nodes: list[str] = []          # Ideal-Node headers seen (client used a later node)
        self.counters = {k: 0 for k in ("accepted", "packets_forwarded", "packets_dropped", "bad_clients",
                                         "stun_requests", "stun_bad", "packets_dropped_queue_full",
                                         "clients_refused", "latency_checks", "peer_gone_sent")}
        self._server = None
        self._stun_transport = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set = set()
        self.cert_pem = self.cert_sha256 = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        ctx = None
        if self.tls and self.ca is not None:
            from tsproxy.testing.tlsca import default_names
            ctx = self.ca.server_context(default_names(self.host))
        elif self.tls:
            cert, key = make_self_signed(self.host)
            self.cert_pem = cert
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization
            der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
            self.cert_sha256 = hashlib.sha256(der).hexdigest()
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.TemporaryDirectory() as d:
                cp, kp = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
                with open(cp, "wb") as f:
                    f.write(cert)
                with open(kp, "wb") as f:
                    f.write(key)
                ctx.load_cert_chain(cp, kp)
        self._server = await asyncio.start_server(self._handle, self.host, self.port, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        if self._stun_port is not None:
            loop = asyncio.get_running_loop()
            self._stun_transport, _ = await loop.create_datagram_endpoint(
                lambda: _Stun(self), local_addr=(self.host, self._stun_port))
            self._stun_port = self._stun_transport.get_extra_info("sockname")[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._stun_transport is not None:
            self._stun_transport.close()
        for w in list(self._writers):
            w.close()
        if self._tasks:                    # closed writers end the handlers; cancel stragglers
            _, pending = await asyncio.wait(list(self._tasks), timeout=2)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/derp"

    @property
    def stun_addr(self):
        return None if self._stun_port is None else (self.host, self._stun_port)

    def derp_map_region(self) -> dict:
        node = {"Name": f"{self.region_id}a", "RegionID": self.region_id, "HostName": self.host,
                "IPv4": self.host, "IPv6": "none",
                "STUNPort": self._stun_port if self._stun_port is not None else -1,
                "DERPPort": self.port, "STUNTestIP": self.host}
        if self.ca is None:
            node["InsecureForTests"] = True    # self-signed: nothing to verify it against
        return {"RegionID": self.region_id, "RegionCode": f"test{self.region_id}",
                "RegionName": f"Test {self.region_id}", "Nodes": [node]}

    def restart(self) -> None:
        """Drop every client connection (as a server restart would); the listener stays."""
        for w in list(self._writers):
            w.close()

    def close_client(self, key) -> bool:
        c = self.clients.get(bytes(key))
        if c is None:
            return False
        c.writer.close()
        return True

    # -- per connection ----------------------------------------------------------------------
    async def _handle(self, reader, writer):
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.add(writer)
        conn = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if len(head) > MAX_REQUEST_HEAD:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path = (lines[0].split(" ") + ["", ""])[:2]
            hdrs = {}
            for ln in lines[1:]:
                if ":" in ln:
                    k, v = ln.split(":", 1)
                    hdrs[k.strip().lower()] = v.strip()
            if path in ("/derp/probe", "/derp/latency-check"):
                self.counters["latency_checks"] += 1
                code = "200 OK" if method in ("GET", "HEAD") else "405 Method Not Allowed"
                writer.write(f"HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                return
            if "ideal-node" in hdrs:
                self.ideal_nodes.append(hdrs["ideal-node"])
            if hdrs.get("upgrade", "").lower() != "derp":
                body = b"DERP requires connection upgrade"
                writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                             % len(body) + body)
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                         b"Derp-Version: 2\r\nDerp-Public-Key: " + self.public.hex().encode() + b"\r\n\r\n")
            writer.write(wire.build_server_key(self.public))
            await writer.drain()
            fr = wire.FrameReader(max_frame=wire.MAX_CLIENT_INFO)
            frames = []
            async with asyncio.timeout(10):
                while not frames:
                    data = await reader.read(65536)
                    if not data:
                        return
                    frames = fr.feed(data)
            ftype, p = frames.pop(0)
            if ftype != wire.CLIENT_INFO or len(p) < 56:
                self.counters["bad_clients"] += 1
                return
            key = p[:32]
            box = Box(self._priv, PublicKey(key))
            try:
                info = json.loads(box.decrypt(p[56:], p[32:56]))
            except Exception:
                self.counters["bad_clients"] += 1
                return
            self.seen_client_infos.append((key, info))
            if self.verify_client is not None and not self.verify_client(key):
                self.counters["clients_refused"] += 1
                return
            nonce = os.urandom(24)
            writer.write(wire.build_frame(wire.SERVER_INFO,
                                          nonce + box.encrypt(b'{"version":2}', nonce).ciphertext))
            conn = _Conn(key, writer)
            self.clients[key] = conn
            self.counters["accepted"] += 1
            ka = asyncio.create_task(self._keepalive(writer))
            try:
                fr._max = wire.MAX_PACKET + 64
                while True:
                    for ftype, p in frames:
                        self._on_frame(conn, ftype, p)
                    frames = []
                    await writer.drain()
                    data = await reader.read(65536)
                    if not data:
                        return
                    frames = fr.feed(data)
            finally:
                ka.cancel()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError,
                ssl.SSLError, OSError):
            pass  # that client went away or misbehaved at the transport level
        except Exception as e:  # a bad client only closes its own connection
            log.debug("derp test server: client error %r", e)
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            if conn is not None and self.clients.get(conn.key) is conn:
                del self.clients[conn.key]
                gone = wire.build_peer_gone(conn.key, wire.PEER_GONE_DISCONNECTED)
                for dst in conn.sent_to:
                    d = self.clients.get(dst)
                    if d is not None:
                        self.counters["peer_gone_sent"] += 1
                        d.writer.write(gone)
            writer.close()

    def _on_frame(self, conn: _Conn, ftype: int, p: bytes) -> None:
        if ftype == wire.SEND_PACKET:
            if len(p) < 32:
                raise ValueError("short SendPacket")
            dst = p[:32]
            d = self.clients.get(dst)
            if d is None:
                self.counters["packets_dropped"] += 1
                if len(p) - 32 >= 62 and p[32:38] == DISCO_MAGIC:
                    conn.writer.write(wire.build_peer_gone(dst, wire.PEER_GONE_NOT_HERE))
                return
            conn.sent_to.add(dst)
            if d.writer.transport.get_write_buffer_size() > MAX_DEST_BUFFER:
                self.counters["packets_dropped_queue_full"] += 1
                return
            self.counters["packets_forwarded"] += 1
            d.writer.write(wire.build_recv_packet(conn.key, p[32:]))
        elif ftype == wire.NOTE_PREFERRED:
            if len(p) != 1:
                raise ValueError("bad NotePreferred")
            conn.preferred = p == b"\x01"
        elif ftype in (wire.FORWARD_PACKET, wire.WATCH_CONNS, wire.CLOSE_PEER):
            raise ValueError("mesh frame without a mesh key")  # Go closes the connection too
        elif ftype == wire.PING:
            if len(p) < 8:
                raise ValueError("short Ping")
            conn.writer.write(wire.build_frame(wire.PONG, p[:8]))

    async def _keepalive(self, writer):
        while True:
            await asyncio.sleep(self.keepalive * (1 + random.random() / 12))  # Go: 60 s + [0, 5 s)
            writer.write(wire.build_frame(wire.KEEP_ALIVE))


def current_node_keys(control):
    """A `verify_client` for TestDerpServer backed by a TestControlServer's registry: admit a
    key only while a node holds it and it has not expired (what Headscale's verify_clients
    checks).  Call it on the control server's loop (the DERP server runs there too)."""
    def verify(raw_key: bytes) -> bool:
        node = control.registry.by_node_key("nodekey:" + bytes(raw_key).hex())
        return node is not None and not node.expired(control.clock())
    return verify
