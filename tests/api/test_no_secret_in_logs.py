"""The in-memory keys (node, machine and the disco private key, which is never written to disk
so the daemon-level log grep in tests/integration/test_isolation.py cannot know it) appear in no
log record and in no status output of a Node, with DEBUG enabled, after a handshake, a transfer and a
disco ping."""

from __future__ import annotations

import base64
import json
import logging


def key_forms(raw: bytes) -> list[str]:
    return [raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
            base64.b64encode(raw).decode().rstrip("=")]


async def test_no_private_key_in_debug_logs_or_status(tailnet_node, caplog):
    caplog.set_level(logging.DEBUG, logger="tsproxy")
    a = await tailnet_node("keys-a")
    b = await tailnet_node("keys-b")

    async def serve(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    async with await b.start_server(serve, 7100):
        reader, writer = await a.open_connection("keys-b", 7100)
        writer.write(b"ping")
        await writer.drain()
        assert await reader.read(100) == b"ping"
        writer.close()
    pong = await a.ping("keys-b")
    assert pong["pong"], pong
    secrets = []
    for n in (a, b):
        ident = n._plane().control.ident
        for key in (ident.node_key, ident.machine_key, ident.disco_key):
            secrets += [repr(key), str(key), *key_forms(key.raw)]
    assert len(secrets) == 2 * 3 * 6
    logs = caplog.text
    assert caplog.records, "nothing was logged: the grep would prove nothing"
    texts = {"log": logs, "status a": json.dumps(a.status()), "status b": json.dumps(b.status())}
    for where, text in texts.items():
        for s in secrets:
            assert s not in text, f"a private key ({len(s)} chars) in {where}"
