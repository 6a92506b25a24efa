"""tsproxy's control client against the test control server's Headscale profile
(tsproxy/testing/control/headscale.py): register, map, the lite endpoint update (the only way
Headscale learns a disco key), DERP reached through the control URL (the embedded region 999
published as HostName "headscale", DERPPort 0), a stream restart, and a real transfer between
two tsproxy daemons over that DERP.  Plus the profile's own quirks, checked on the wire:
capability versions below 113 refused, /key answers, zstd only when asked, keep-alives."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status
from tsproxy.control import messages as msg
from tsproxy.control.aio import ControlClient, ControlURL, NoiseH2, fetch_server_key
from tsproxy.daemon.state import StateStore
from tsproxy.errors import RemoteProtocolError
from tsproxy.keys import DiscoPrivate, MachinePrivate, NodePrivate
from tsproxy.testing.servers import pattern_sha256
from tests.waiting import until

pytestmark = [pytest.mark.timeout(300)]
BIG = 1 << 20


# ---- in-process: the client and the profile on one loop -------------------------------------

@pytest.fixture
async def hs():
    from tsproxy.testing.control import TestControlServer
    srv = TestControlServer("127.0.0.1", profile="headscale")
    srv.keepalive, srv.keepalive_jitter = 0.2, 0.1   # Headscale's 50 s + 0-9 s: checked below
    await srv.start()
    yield srv
    await srv.stop()


def _client(srv, tmp_path, name="hs-c"):
    c = ControlClient(srv.url, StateStore(str(tmp_path / name)), hostname=name,
                      auth_key=srv.create_auth_key(reusable=True).key)
    c.backoff_min, c.backoff_max = 0.05, 0.2
    return c


async def test_register_map_and_disco_key_only_from_the_lite_update(hs, tmp_path):
    c = _client(hs, tmp_path)
    task = asyncio.create_task(c.run())
    try:
        await until(lambda: c.state == "Running", "Running against the Headscale profile")
        node = hs.node("hs-c")
        want = c.ident.disco_key.public().text()
        await until(lambda: node.disco_key == want, "disco key stored")
        # stored from a lite update, never from the streaming request
        maps = [r for kind, r in hs.registry.log if kind == "map"]
        assert maps and all(not r.get("Stream") and r.get("OmitPeers") for r in maps)
        assert hs.counters["map_lite"] >= 1 and hs.counters["map_stream"] == 1
        assert node.cap == msg.CAPABILITY_VERSION and hs.noise_versions[-1] >= 113
        # the embedded DERP region, fixed up to the control URL by the client
        nm = c.netmap
        (region,) = nm.derp_map.regions.values()
        assert region.region_id == 999 and region.region_code == "headscale"
        assert hs.derp_map["Regions"]["999"]["Nodes"][0]["HostName"] == "headscale"
        assert hs.derp_map["Regions"]["999"]["Nodes"][0]["DERPPort"] == 0
        assert (region.nodes[0].host_name, region.nodes[0].derp_port) == ("127.0.0.1", hs.port)
        # Headscale's self CapMap and both DERP forms on peers
        assert "https://tailscale.com/cap/ssh" in nm.self_node.cap_map
        # a stream restart: a new stream and a new lite update; the key survives
        streams, lites = hs.counters["map_stream"], hs.counters["map_lite"]
        hs.drop_streams()
        await until(lambda: hs.counters["map_stream"] > streams
                    and hs.counters["map_lite"] > lites and c.state == "Running",
                    "stream and lite update again after the restart")
        assert node.disco_key == want
        # keep-alives (0.2 s here) keep the same stream up past several of them
        before, kas = hs.counters["map_stream"], hs.counters.get("keepalives", 0)
        await until(lambda: hs.counters.get("keepalives", 0) >= kas + 3, "three keep-alives")
        assert hs.counters["map_stream"] == before and c.state == "Running"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_capability_versions_below_113_are_refused(hs):
    url = ControlURL(hs.url)
    key = await fetch_server_key(url)
    mk = MachinePrivate.generate()
    # the Noise upgrade at version 100: a 101, then the connection closes
    from tsproxy.control.noiseconn import ClientHandshake
    reader, writer = await asyncio.open_connection(hs.host, hs.port)
    hsk = ClientHandshake(mk, key, url.authority, version=100)
    writer.write(hsk.request)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 101 ") and data.endswith(b"\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        hsk.receive_data(data)
        raise RemoteProtocolError("no Noise response")
    assert hs.counters["noise_version_refused"] == 1 and hs.noise_versions[-1] == 100
    # RPCs saying Version 100 inside a current Noise session: 400 for both
    conn = await NoiseH2.connect(url, mk, key)
    try:
        nk = NodePrivate.generate()
        body = json.loads(msg.build_register_request(
            node_key=nk.public(), old_node_key=None, hostinfo=msg.hostinfo("old-client"),
            auth_key=hs.create_auth_key().key))
        body["Version"] = 100
        r = await conn.request("/machine/register", json.dumps(body).encode())
        assert r.status == 400 and b"unsupported client version" in await r.read_all(4096)
        assert hs.node("old-client") is not None      # Headscale registered it all the same
        mb = json.loads(msg.build_map_request(node_key=nk.public(),
                                              disco_key=DiscoPrivate.generate().public(),
                                              hostinfo=msg.hostinfo("old-client"), endpoints=[]))
        mb["Version"] = 100
        r = await conn.request("/machine/map", json.dumps(mb).encode())
        assert r.status == 400
        assert hs.counters["map_stream"] == 0 and hs.counters["version_refused"] == 2
    finally:
        conn.close()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def test_key_endpoint_answers_as_headscale(hs):
    loop = asyncio.get_running_loop()
    st, body = await loop.run_in_executor(None, _get, hs.url + "/key")
    assert st == 400
    st, body = await loop.run_in_executor(None, _get, hs.url + "/key?v=30")
    assert (st, body) == (200, b"")
    st, body = await loop.run_in_executor(None, _get, hs.url + "/key?v=133")
    assert st == 200 and json.loads(body)["publicKey"].startswith("mkey:")


async def test_zstd_only_when_asked_and_the_keepalive_cadence(hs, tmp_path):
    from tsproxy.testing.control import TestControlServer
    fresh = TestControlServer(profile="headscale")
    assert (fresh.keepalive, fresh.keepalive_jitter) == (50.0, 9.0)
    c = _client(hs, tmp_path, "hs-z")
    task = asyncio.create_task(c.run())
    try:
        await until(lambda: c.state == "Running", "registered")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    url = ControlURL(hs.url)
    key = await fetch_server_key(url)
    conn = await NoiseH2.connect(url, c.ident.machine_key, key)
    try:
        for compress in (False, True):
            body = json.loads(msg.build_map_request(
                node_key=c.ident.node_key.public(), disco_key=c.ident.disco_key.public(),
                hostinfo=msg.hostinfo("hs-z"), endpoints=[]))
            body["Compress"] = "zstd" if compress else ""
            r = await conn.request("/machine/map", json.dumps(body).encode())
            assert r.status == 200
            buf = b""
            while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "little"):
                buf += await asyncio.wait_for(r.read_chunk(), 10)
            first = buf[4:4 + int.from_bytes(buf[:4], "little")]
            assert first.startswith(b"\x28\xb5\x2f\xfd") == compress      # zstd magic
            if not compress:
                assert json.loads(first)["Node"]["Name"].startswith("hs-z.")
                # then keep-alives, raw JSON too
                rest = buf[4 + len(first):]
                while len(rest) < 4 or len(rest) < 4 + int.from_bytes(rest[:4], "little"):
                    rest += await asyncio.wait_for(r.read_chunk(), 10)
                ka = rest[4:4 + int.from_bytes(rest[:4], "little")]
                assert json.loads(ka) == {"KeepAlive": True}
    finally:
        conn.close()


# ---- two tsproxy daemons through the CLI, over the embedded DERP ----------------------------

@pytest.fixture(scope="module")
def hs_tailnet():
    from tsproxy.testing.tailnet import TestTailnet
    with TestTailnet(host="127.0.0.1", profile="headscale", tls=True) as net:
        yield net


@pytest.fixture(scope="module")
def hs_pair(hs_tailnet, web, tmp_path_factory):
    net = hs_tailnet
    common = ["--login-server", net.control_url, "--auth-key", net.auth_key,
              "--control-ca-file", net.ca_file]
    b = Daemon(str(tmp_path_factory.mktemp("hsb")),
               [*common, "--hostname", "hs-b", "--listen", "off",
                "--reverse", f"8080:127.0.0.1:{web}"])
    port = free_port()
    a = Daemon(str(tmp_path_factory.mktemp("hsa")),
               [*common, "--hostname", "hs-a", "--listen", f"127.0.0.1:{port}"])
    a.proxy_port = port
    try:
        b.start(timeout=60)
        a.start(timeout=60)
        yield a, b
    finally:
        a.stop()
        b.stop()


def _fetch(port, url, timeout=60):
    import hashlib
    import subprocess
    r = subprocess.run(["curl", "-sS", "--max-time", str(timeout), "--socks5-hostname",
                        f"127.0.0.1:{port}", url], capture_output=True, timeout=timeout + 5)
    return r.returncode, hashlib.sha256(r.stdout).hexdigest(), len(r.stdout), r.stderr


def test_two_daemons_transfer_over_the_embedded_derp(hs_pair, hs_tailnet):
    a, b = hs_pair
    net = hs_tailnet
    # DERP only (as Headscale's nodeAttrs can say): every packet through /derp on the control
    for name in ("hs-a", "hs-b"):
        net.call(net.control.set_node_attr, net.node(name).id, "only-tcp-443")
    for d in (a, b):
        st = eventually(lambda d=d: (s := d.status())["home_derp"] == 999 and s, 30,
                        "home region 999")
        assert st["state"] == "Running"
    eventually(lambda: net.call(lambda: len(net.control.embedded_derp.clients) == 2), 30,
               "both daemons on the embedded DERP (reached through the control URL)")
    assert net.call(lambda: net.control.counters["embedded_derp"]) >= 2
    for n in ("hs-a", "hs-b"):
        assert net.node(n).disco_key            # learnt from lite updates only
    rc, sha, n, err = eventually(
        lambda: (r := _fetch(a.proxy_port, f"http://hs-b:8080/bytes/{BIG}"))[0] == 0 and r,
        60, "a -> b over the embedded DERP")
    assert (n, sha) == (BIG, pattern_sha256(BIG)), err
    p = peer_status(a, "hs-b")
    assert p["path"].startswith("derp") and "999" in p["path"], p
    assert net.call(lambda: net.control.embedded_derp.counters["packets_forwarded"]) > 100


def test_stream_restart_keeps_the_pair_working(hs_pair, hs_tailnet):
    a, b = hs_pair
    net = hs_tailnet
    streams = net.call(lambda: net.control.counters["map_stream"])
    lites = net.call(lambda: net.control.counters["map_lite"])
    net.run(net.control.restart())           # every connection dropped, DERP ones included
    net.wait(lambda: net.control.counters["map_stream"] >= streams + 2
             and net.control.counters["map_lite"] >= lites + 2
             and all(net.control.node(x).online for x in ("hs-a", "hs-b")), 60,
             "both back: new streams and lite updates")
    eventually(lambda: net.call(lambda: len(net.control.embedded_derp.clients) == 2), 60,
               "both back on the embedded DERP")
    rc, sha, n, err = eventually(
        lambda: (r := _fetch(a.proxy_port, f"http://hs-b:8080/bytes/{BIG}"))[0] == 0 and r,
        60, "a -> b after the restart")
    assert (n, sha) == (BIG, pattern_sha256(BIG)), err
    assert a.status()["control"]["last_error"] == ""
