"""ControlClient against a minimal in-test control server (our ik.py responder + h2 server)
over loopback TCP: /key, /ts2021 upgrade, register, zstd map stream, lite update, restart
with stored keys, rejected auth key, interactive login, server-side stream drop (resume),
logout and node-key expiry re-registration.

The full test control server (tsproxy/testing/control*) is another engineer's; these tests
only need enough of one to exercise the client honestly.
"""

from __future__ import annotations

import asyncio
import json

import h2.config
import h2.connection
import h2.events
import pytest

from tsproxy.control import messages as msg
from tsproxy.control import wire
from tsproxy.control.aio import AuthKeyRejected, ControlClient
from tsproxy.control.noiseconn import ServerHandshake
from tsproxy.daemon.state import StateStore
from tsproxy.keys import DiscoPrivate, MachinePrivate, NodePrivate, NodePublic
from tsproxy.noise.ik import Responder

pytestmark = [pytest.mark.timeout(60)]

PEER = NodePrivate(bytes([9]) * 32).public()
PEER_DISCO = DiscoPrivate(bytes([10]) * 32).public()


def now_text():
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MiniControl:
    def __init__(self):
        self.key = MachinePrivate.generate()
        self.responder = Responder(self.key)
        self.registers: list[dict] = []
        self.maps: list[dict] = []
        self.nodes: dict[str, dict] = {}           # node key text -> info
        self.interactive_approved = asyncio.Event()
        self.drop_stream_once = False
        self.malformed_once = False
        self.silent_once = False
        self.expire_self_once = False
        self.map_streams = 0
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self):
        self.server.close()

    async def _conn(self, reader, writer):
        try:
            buf = b""
            while (split := wire.split_http_head(buf)) is None:
                data = await reader.read(4096)
                if not data:
                    return
                buf += data
            head, rest = split
            if head.startswith(b"GET /key?v=%d " % msg.CAPABILITY_VERSION):
                body = wire.build_key_response(self.key.public().raw)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
                return
            hs = ServerHandshake(self.responder, early_challenge=bytes(32))
            conn = hs.receive_data(head + b"\r\n\r\n" + rest)
            writer.write(hs.data_to_send())
            await self._serve_h2(reader, writer, conn)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve_h2(self, reader, writer, noise):
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        h2c.initiate_connection()
        bodies: dict[int, bytearray] = {}
        paths: dict[int, str] = {}
        tasks = set()
        lock = asyncio.Lock()

        async def flush():
            async with lock:
                noise.write(h2c.data_to_send())
                writer.write(noise.data_to_send())
                await writer.drain()

        await flush()
        machine = noise.peer_static.hex()
        while True:
            data = await reader.read(65536)
            if not data:
                break
            noise.receive_data(data)
            for ev in h2c.receive_data(noise.read()):
                if isinstance(ev, h2.events.RequestReceived):
                    paths[ev.stream_id] = dict(ev.headers)[":path"]
                    bodies[ev.stream_id] = bytearray()
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] += ev.data
                    h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    sid = ev.stream_id
                    t = asyncio.create_task(self._handle(h2c, flush, sid, paths[sid],
                                                         json.loads(bodies[sid]), machine))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
            await flush()
        for t in tasks:
            t.cancel()

    async def _reply(self, h2c, flush, sid, status, body=b"", end=True):
        h2c.send_headers(sid, [(":status", str(status))])
        if body or end:
            h2c.send_data(sid, body, end_stream=end)
        await flush()

    async def _handle(self, h2c, flush, sid, path, req, machine):
        if path == "/machine/register":
            self.registers.append(req)
            nk = req["NodeKey"]
            if msg.parse_time(req["Expiry"]) is not None and msg.parse_time(req["Expiry"]) < 1e9:
                self.nodes.pop(nk, None)
                return await self._reply(h2c, flush, sid, 200,
                                         json.dumps({"NodeKeyExpired": True}).encode())
            auth = (req.get("Auth") or {}).get("AuthKey")
            known = self.nodes.get(nk)
            old = req.get("OldNodeKey")
            if known is None and old in self.nodes and self.nodes[old]["machine"] == machine:
                self.nodes[nk] = self.nodes.pop(old)          # re-key
                known = self.nodes[nk]
            if known is not None and known["machine"] == machine:
                out = {"MachineAuthorized": True, "User": {"ID": 1},
                       "Login": {"LoginName": "t@example.com"}}
            elif auth == "tskey-good":
                self.nodes[nk] = {"machine": machine}
                out = {"MachineAuthorized": True, "User": {"ID": 1},
                       "Login": {"LoginName": "t@example.com"}}
            elif auth:
                out = {"Error": "invalid pre-auth key"}
            elif req.get("Followup"):
                await self.interactive_approved.wait()
                self.nodes[nk] = {"machine": machine}
                out = {"MachineAuthorized": True, "User": {"ID": 2}}
            else:
                out = {"AuthURL": f"http://127.0.0.1:{self.port}/register/abc"}
            return await self._reply(h2c, flush, sid, 200, json.dumps(out).encode())
        if path == "/machine/map":
            self.maps.append(req)
            if self.nodes.get(req["NodeKey"], {}).get("machine") != machine:
                return await self._reply(h2c, flush, sid, 404, b"not found")
            if not req["Stream"]:
                return await self._reply(h2c, flush, sid, 200)
            self.map_streams += 1
            expiry = "0001-01-01T00:00:00Z"
            if self.expire_self_once:
                self.expire_self_once = False
                expiry = "2000-01-01T00:00:00Z"
            full = {
                "Node": {"ID": 1, "StableID": "nSELF", "Name": "me.tail.ts.net.",
                         "Key": req["NodeKey"], "KeyExpiry": expiry,
                         "Addresses": ["100.64.0.1/32"], "MachineAuthorized": True},
                "DERPMap": {"Regions": {"999": {"RegionID": 999, "Nodes": [
                    {"Name": "999a", "RegionID": 999, "HostName": "headscale"}]}}},
                "Peers": [{"ID": 2, "StableID": "n2", "Name": "peer.tail.ts.net.",
                           "Key": PEER.text(), "DiscoKey": PEER_DISCO.text(),
                           "Addresses": ["100.64.0.2/32"], "HomeDERP": 999}],
                "PacketFilter": [{"SrcIPs": ["*"], "DstPorts": [
                    {"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}],
                "ControlTime": now_text()}
            h2c.send_headers(sid, [(":status", "200")])
            if self.silent_once:              # headers, then nothing: the watchdog must fire
                self.silent_once = False
                await flush()
                await asyncio.sleep(3600)
            h2c.send_data(sid, msg.encode_map_message({"KeepAlive": True}))
            h2c.send_data(sid, msg.encode_map_message(full))
            await flush()
            if self.malformed_once:
                self.malformed_once = False
                await asyncio.sleep(0.05)
                h2c.send_data(sid, msg.encode_map_message({"PeersRemoved": "oops"}))
                await flush()
                await asyncio.sleep(3600)
            await asyncio.sleep(0.05)
            h2c.send_data(sid, msg.encode_map_message({"KeepAlive": True}))
            h2c.send_data(sid, msg.encode_map_message({"OnlineChange": {"2": True}}))
            await flush()
            if self.drop_stream_once:
                self.drop_stream_once = False
                h2c.send_data(sid, b"\x00\x00", end_stream=True)    # truncated frame, then end
                await flush()
                return
            await asyncio.sleep(3600)
        return await self._reply(h2c, flush, sid, 404, b"")


@pytest.fixture
async def control():
    srv = MiniControl()
    await srv.start()
    yield srv
    await srv.close()


async def run_until(client, cond, timeout=15):
    netmaps = []
    client._on_netmap = netmaps.append
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(timeout):
            while not cond(netmaps):
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, AuthKeyRejected):
            pass
    return netmaps


async def test_register_map_restart_logout(control, tmp_path):
    url = f"http://127.0.0.1:{control.port}"
    store = StateStore(str(tmp_path))
    states = []
    c = ControlClient(url, store, hostname="me", auth_key="tskey-good", tags=["tag:x"],
                      on_state=states.append)
    nms = await run_until(c, lambda n: n and n[-1].peers[2].online)
    nm = nms[-1]
    assert [str(a) for a in nm.addresses] == ["100.64.0.1"]
    assert set(nm.wireguard_peers()) == {PEER}
    assert nm.resolve("peer")[0].exploded == "100.64.0.2"
    assert nm.packet_filter.match("100.64.0.2", "100.64.0.1", 6, 22)
    node = nm.derp_map.regions[999].nodes[0]
    assert (node.host_name, node.derp_port) == ("127.0.0.1", control.port)   # Headscale quirk
    assert states[-1] == "Running" and c.status()["state"] == "Running"
    reg = control.registers[0]
    assert reg["Auth"] == {"AuthKey": "tskey-good"} and reg["Hostinfo"]["Hostname"] == "me"
    assert reg["Hostinfo"]["RequestTags"] == ["tag:x"]
    stream_req = [m for m in control.maps if m["Stream"]][0]
    assert stream_req["Compress"] == "zstd" and stream_req["KeepAlive"] is True
    assert any(m.get("OmitPeers") for m in control.maps)                   # lite update sent
    first_disco = stream_req["DiscoKey"]
    node_key = store.load().node_key
    assert node_key.public().text() == reg["NodeKey"]
    assert store.load().node_id == "nSELF"
    assert "tskey-good" not in (tmp_path / "control-state.json").read_text()

    # restart with the stored identity and no auth key: same node key, new disco key
    c2 = ControlClient(url, StateStore(str(tmp_path)), hostname="me")
    await run_until(c2, lambda n: bool(n))
    reg2 = control.registers[-1]
    assert reg2["NodeKey"] == reg["NodeKey"] and "Auth" not in reg2
    stream2 = [m for m in control.maps if m["Stream"]][-1]
    assert stream2["DiscoKey"] != first_disco

    # logout: register with Expiry in the past, keys forgotten, machine key kept
    machine = store.load().machine_key
    await c2.logout()
    assert msg.parse_time(control.registers[-1]["Expiry"]) == 123
    after = StateStore(str(tmp_path)).load()
    assert after.node_key is None and after.machine_key == machine


async def test_rejected_auth_key_is_distinct_and_not_retried(control, tmp_path):
    c = ControlClient(f"http://127.0.0.1:{control.port}", StateStore(str(tmp_path)),
                      hostname="me", auth_key="tskey-bad")
    with pytest.raises(AuthKeyRejected, match="invalid pre-auth key"):
        await asyncio.wait_for(c.run(), 10)
    assert len(control.registers) == 1
    assert "tskey-bad" not in c.status()["last_error"]


async def test_interactive_login(control, tmp_path):
    urls = []
    c = ControlClient(f"http://127.0.0.1:{control.port}", StateStore(str(tmp_path)),
                      hostname="me", on_auth_url=urls.append)

    async def approve():
        while not urls:
            await asyncio.sleep(0.02)
        assert c.status()["state"] == "NeedsLogin" and c.status()["auth_url"] == urls[0]
        control.interactive_approved.set()
    t = asyncio.create_task(approve())
    nms = await run_until(c, lambda n: bool(n))
    await t
    assert urls == [f"http://127.0.0.1:{control.port}/register/abc"]
    assert control.registers[1]["Followup"] == urls[0]
    assert control.registers[1]["NodeKey"] == control.registers[0]["NodeKey"]
    assert nms[-1].self_node.machine_authorized


async def test_stream_drop_resumes_and_keeps_netmap(control, tmp_path):
    control.drop_stream_once = True
    c = ControlClient(f"http://127.0.0.1:{control.port}", StateStore(str(tmp_path)),
                      hostname="me", auth_key="tskey-good")
    c.backoff_min = 0.05
    nms = await run_until(c, lambda n: control.map_streams >= 2 and len(n) >= 4)
    assert control.map_streams >= 2 and c.failures == 0
    assert c.netmap is nms[-1] and set(c.netmap.wireguard_peers()) == {PEER}


async def test_unreachable_server_visible_in_status(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = ControlClient(f"http://127.0.0.1:{port}", StateStore(str(tmp_path)), hostname="me",
                      auth_key="tskey-good")
    c.backoff_min = 0.01
    task = asyncio.create_task(c.run())
    async with asyncio.timeout(10):
        while c.status()["failures"] < 3:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert c.status()["last_error"] == (
        f"ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', {port})")


async def test_self_key_expiry_reregisters_with_old_key(control, tmp_path):
    control.expire_self_once = True
    c = ControlClient(f"http://127.0.0.1:{control.port}", StateStore(str(tmp_path)),
                      hostname="me", auth_key="tskey-good")
    c.backoff_min = 0.05
    await run_until(c, lambda n: bool(n))
    first = control.registers[0]["NodeKey"]
    rekey = [r for r in control.registers if r["OldNodeKey"] == first]
    assert rekey and rekey[0]["NodeKey"] != first
    stored = StateStore(str(tmp_path)).load()
    assert stored.node_key.public().text() == rekey[0]["NodeKey"]
    assert stored.old_node_key.public() == NodePublic.from_text(first)


async def test_malformed_message_drops_stream_keeps_last_netmap(control, tmp_path):
    control.malformed_once = True
    c = ControlClient(f"http://127.0.0.1:{control.port}", StateStore(str(tmp_path)),
                      hostname="me", auth_key="tskey-good")
    c.backoff_min = 0.05
    seen_errors = []
    nms = await run_until(c, lambda n: (c.last_error and seen_errors.append(c.last_error)
                                        or control.map_streams >= 2 and len(n) >= 2))
    assert any("PeersRemoved" in e or "list" in e for e in seen_errors)
    assert control.map_streams >= 2
    assert set(nms[0].wireguard_peers()) == {PEER}      # first netmap delivered intact


async def test_watchdog_reconnects_silent_stream(control, tmp_path):
    control.silent_once = True
    c = ControlClient(f"http://127.0.0.1:{control.port}", StateStore(str(tmp_path)),
                      hostname="me", auth_key="tskey-good")
    c.backoff_min = 0.05
    c.watchdog = 0.3
    errors = []
    nms = await run_until(c, lambda n: (c.last_error and errors.append(c.last_error)) or bool(n))
    assert any("watchdog" in e for e in errors)
    assert control.map_streams == 2 and nms


async def test_preferred_derp_and_endpoints_sent_in_lite_update(control, tmp_path):
    c = ControlClient(f"http://127.0.0.1:{control.port}", StateStore(str(tmp_path)),
                      hostname="me", auth_key="tskey-good")

    def on_nm(n):
        if not any(m.get("OmitPeers") and m["Hostinfo"].get("NetInfo") for m in control.maps):
            c.set_endpoints([("192.0.2.7", 41641, 2)])
            c.set_preferred_derp(999)
    nms = []
    task = asyncio.create_task(c.run())
    c._on_netmap = lambda n: (nms.append(n), on_nm(n))
    try:
        async with asyncio.timeout(10):
            while not [m for m in control.maps
                       if m.get("OmitPeers") and m["Hostinfo"].get("NetInfo")]:
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    lite = [m for m in control.maps if m.get("OmitPeers") and m["Hostinfo"].get("NetInfo")][-1]
    assert lite["Stream"] is False and lite["Hostinfo"]["NetInfo"]["PreferredDERP"] == 999
    assert lite["Endpoints"] == ["192.0.2.7:41641"] and lite["EndpointTypes"] == [2]
    assert lite["DiscoKey"].startswith("discokey:")


async def test_https_control_url_verifies_certificate(tmp_path):
    """A self-signed certificate is rejected (TLS verified against the system CAs)."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    hits = []

    async def handler(r, w):
        hits.append(1)
        w.close()
    srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
    port = srv.sockets[0].getsockname()[1]
    state_dir = tmp_path / "st"
    c = ControlClient(f"https://127.0.0.1:{port}", StateStore(str(state_dir)), hostname="me",
                      auth_key="tskey-good")
    c.backoff_min = 0.05
    from tsproxy.tlsconfig.aio import CertificateVerifyFailed
    try:
        # never connected yet: run() stops at the first verification failure (no retry storm)
        with pytest.raises(CertificateVerifyFailed) as exc:
            async with asyncio.timeout(10):
                await c.run()
    finally:
        srv.close()
    line = f"control server 127.0.0.1:{port}: certificate verify failed: self-signed certificate"
    assert str(exc.value) == line
    assert c.status()["last_error"] == line and c.failures == 1
    assert hits == []                          # the handshake never completed


async def test_logout_with_unreachable_server_still_forgets_keys(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    store = StateStore(str(tmp_path))
    ident = store.load()
    ident.node_key = NodePrivate.generate()
    store.save(ident)
    c = ControlClient(f"http://127.0.0.1:{port}", store, hostname="me")
    with pytest.raises(ConnectionRefusedError):
        await c.logout()
    assert StateStore(str(tmp_path)).load().node_key is None
    assert c.status()["state"] == "NeedsLogin"


async def test_server_restart_with_new_key_is_followed(control, tmp_path):
    c = ControlClient(f"http://127.0.0.1:{control.port}", StateStore(str(tmp_path)),
                      hostname="me", auth_key="tskey-good")
    c.backoff_min = 0.05
    await run_until(c, lambda n: bool(n))
    # the "restarted" server has a new Noise key; the cached one must be dropped on failure
    control.key = MachinePrivate.generate()
    control.responder = Responder(control.key)
    streams = control.map_streams
    nms = await run_until(c, lambda n: control.map_streams > streams and bool(n))
    assert nms and c._server_key.raw == control.key.public().raw


async def test_request_body_larger_than_one_h2_frame(control, tmp_path):
    c = ControlClient(f"http://127.0.0.1:{control.port}", StateStore(str(tmp_path)),
                      hostname="me", auth_key="tskey-good")
    eps = [(f"192.0.2.{i % 250}", 1000 + i, 1) for i in range(1200)]
    c._endpoints = eps
    await run_until(c, lambda n: bool(n))
    stream = [m for m in control.maps if m["Stream"]][0]
    assert len(json.dumps(stream)) > 16384
    assert len(stream["Endpoints"]) == 1200 and stream["Endpoints"][5] == "192.0.2.5:1005"
