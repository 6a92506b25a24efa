"""tsproxy.Node on the loopback test tailnet (no root): the plugin's `tailnet` and `tailnet_node`."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

import tsproxy
from tsproxy.errors import (AuthRejected, ConfigError, ControlUnreachable, KeyExpired,
                            NeedsLogin, NotAllowed, Timeout, TsproxyError)
MB = 1 << 20


def pattern_chunks(size: int, seed: int):
    """size bytes in 256 KiB chunks, each numbered (a reordered or lost chunk changes the hash)."""
    import random
    block = random.Random(seed).randbytes(256 * 1024)
    for i in range(0, size, len(block)):
        yield (i.to_bytes(8, "big") + block[8:])[: size - i]


async def test_two_nodes_exchange_50mb_both_ways(tailnet_node):
    a = await tailnet_node("api-a")
    b = await tailnet_node("api-b")
    size = 50 * MB
    got_at_server = hashlib.sha256()

    async def serve(reader, writer):
        # echo-free: read everything the client sends, then send our own 50 MB back
        n = 0
        while chunk := await reader.read(256 * 1024):
            got_at_server.update(chunk)
            n += len(chunk)
        for chunk in pattern_chunks(size, seed=2):
            writer.write(chunk)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    async with await b.start_server(serve, 7000) as srv:
        assert {ip for ip, _ in srv.addresses} == set(b.addresses)
        reader, writer = await a.open_connection("api-b", 7000)
        assert writer.get_extra_info("peername")[0] in b.addresses
        want_up = hashlib.sha256()
        for chunk in pattern_chunks(size, seed=1):
            want_up.update(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        got = hashlib.sha256()
        total = 0
        while chunk := await reader.read(256 * 1024):
            got.update(chunk)
            total += len(chunk)
        writer.close()
        await writer.wait_closed()
    want_down = hashlib.sha256()
    for chunk in pattern_chunks(size, seed=2):
        want_down.update(chunk)
    assert total == size
    assert got.hexdigest() == want_down.hexdigest()
    assert got_at_server.hexdigest() == want_up.hexdigest()


async def test_status_peers_whois_and_ipv6(tailnet_node):
    a = await tailnet_node("api-c")
    b = await tailnet_node("api-d")
    v6 = [ip for ip in b.addresses if ":" in ip]
    assert v6, b.addresses

    async def hello(reader, writer):
        writer.write(b"hi " + writer.get_extra_info("peername")[0].encode())
        writer.close()

    async with await b.start_server(hello, 81):
        r, w = await a.open_connection(v6[0], 81)
        assert await r.read() == b"hi " + [ip for ip in a.addresses if ":" in ip][0].encode()
        w.close()
    st = a.status()
    assert st["mode"] == "tailscale" and st["state"] == "Running"
    assert st["addresses"] == a.addresses
    assert {"self", "control", "peers", "counters", "listeners"} <= st.keys()
    row = await a.whois(b.addresses[0])
    assert row is not None and row["name"] == "api-d"
    assert await a.whois("100.127.255.254") is None
    assert any(p["name"] == "api-d" for p in a.peers())
    pong = await a.ping("api-d", timeout=10)
    assert pong["pong"] is True and pong["name"] == "api-d" and pong["latency_ms"] >= 0
    assert pong["via"].startswith("DERP(") or ":" in pong["via"]
    with pytest.raises(TsproxyError, match="unknown peer"):
        await a.ping("no-such-peer")


async def test_host_not_on_the_tailnet_is_refused_by_default(tailnet_node):
    a = await tailnet_node("api-e")
    direct_before = a.tailnet.dialer.counters["dial_direct"]
    with pytest.raises(NotAllowed):
        await a.open_connection("127.0.0.1", 9)
    with pytest.raises(NotAllowed):
        await a.open_connection("no-such-host.example", 80)
    assert a.tailnet.dialer.counters["dial_direct"] == direct_before


def test_bad_arguments_are_precise():
    with pytest.raises(TypeError, match="unexpected keyword"):
        tsproxy.Node(contol_url="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="non_tailnet"):
        tsproxy.Node(non_tailnet="sometimes")
    with pytest.raises(ConfigError, match="control URL"):
        tsproxy.Node(control_url="ftp://x")
    with pytest.raises(ConfigError):
        tsproxy.Node(wg_config="[Interface]\nPrivateKey = nope\n")
    with pytest.raises(ConfigError):
        tsproxy.Node(wg_config="/nonexistent/wg0.conf")
    with pytest.raises(TypeError, match="wg_config cannot be combined"):
        tsproxy.Node(wg_config="[Interface]\n", auth_key="k")


async def test_rejected_key(tailnet):
    async with tsproxy.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, auth_key="tskey-auth-bogus",
                            hostname="api-bad") as node:
        with pytest.raises(AuthRejected) as ei:
            await node.wait_running(30)
        assert not isinstance(ei.value, KeyExpired)
        assert "bogus" not in str(ei.value)           # the key itself is never echoed


async def test_expired_key(tailnet):
    key = tailnet.create_auth_key(reusable=True, expires=time.time() - 60)
    async with tsproxy.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, auth_key=key,
                            hostname="api-old") as node:
        with pytest.raises(KeyExpired):
            await node.wait_running(30)


async def test_interactive_login_then_running(tailnet):
    async with tsproxy.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, hostname="api-login") as node:
        with pytest.raises(NeedsLogin) as ei:
            await node.wait_running(30)
        assert node.state == "NeedsLogin" and node.auth_url == ei.value.url
        assert ei.value.url.startswith(tailnet.control_url)
        tailnet.approve(ei.value.url)
        await node.wait_running(30)
        assert node.state == "Running" and node.addresses


async def test_unreachable_control_url_then_timeout():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                         # nothing listens there now
    async with tsproxy.Node(control_url=f"http://127.0.0.1:{port}", auth_key="k",
                            hostname="api-nowhere") as node:
        with pytest.raises(ControlUnreachable, match=f"127.0.0.1:{port}"):
            await node.wait_running(30)
    silent = socket.socket()                          # accepts TCP, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        async with tsproxy.Node(control_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                                auth_key="k", hostname="api-silent") as node:
            with pytest.raises(Timeout):
                await node.wait_running(0.5)
            assert node.state == "Starting"
    finally:
        silent.close()


async def test_watch_state_sees_running_then_stopped(tailnet):
    node = tsproxy.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, auth_key=tailnet.auth_key,
                        hostname="api-watch")
    await node.start()
    seen = []

    async def watch():
        async for s in node.watch_state():
            seen.append(s)
    t = asyncio.create_task(watch())
    await node.wait_running(30)
    await node.aclose()
    await asyncio.wait_for(t, 10)
    assert seen[0] == "Starting" and "Running" in seen and seen[-1] == "Stopped"


async def test_state_dir_keeps_the_identity_and_memory_mode_does_not(tailnet, tmp_path):
    import os
    import stat
    state = tmp_path / "state"
    async with tsproxy.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, auth_key=tailnet.auth_key,
                            hostname="api-keep", state_dir=state) as node:
        await node.wait_running(60)
        first = node.addresses
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    files = list(state.iterdir())
    assert files and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    async with tsproxy.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, hostname="api-keep",
                            state_dir=state) as node:           # no key: the stored login is enough
        await node.wait_running(60)
        assert node.addresses == first
    async with tsproxy.Node(control_url=tailnet.control_url, control_ca_file=tailnet.ca_file, auth_key=tailnet.auth_key,
                            hostname="api-keep") as node:       # in memory: a new node
        await node.wait_running(60)
        assert node.addresses != first
    assert list(state.iterdir()) == files
