"""Map-stream per-message bounds sized for large tailnets, and the Hostinfo version."""

from __future__ import annotations

import json
import re

import pytest
import zstandard

from tsproxy.control import messages as msg
from tsproxy.errors import RemoteProtocolError
from tsproxy.version import __version__

pytestmark = pytest.mark.timeout(60)


def _peer(i):
    return {"ID": i, "StableID": f"n{i}", "Name": f"host-{i}.example.ts.net.",
            "Key": "nodekey:" + f"{i:064x}", "DiscoKey": "discokey:" + f"{i:064x}",
            "Addresses": [f"100.{64 + i // 65536}.{i // 256 % 256}.{i % 256}/32"],
            "HomeDERP": 1, "Hostinfo": {"Hostname": f"host-{i}", "OS": "linux",
                                        "IPNVersion": "1.90.9-t" + "x" * 900}}


def test_a_map_of_twenty_thousand_peers_over_16_mib_decodes():
    obj = {"Node": _peer(1), "Peers": [_peer(i) for i in range(2, 20_002)]}
    framed = msg.encode_map_message(obj)
    assert len(json.dumps(obj)) > 16 << 20            # past the old per-message cap
    out = msg.MapStreamDecoder().feed(framed)
    assert len(out) == 1 and len(out[0]["Peers"]) == 20_000


def test_memory_stays_bounded():
    assert msg.MAX_MAP_MESSAGE == 64 << 20
    dec = msg.MapStreamDecoder()
    with pytest.raises(RemoteProtocolError, match="limit"):
        dec.feed(((64 << 20) + 1).to_bytes(4, "little"))
    # decompression stops at twice the frame bound (a zstd bomb is cut off)
    bomb = zstandard.ZstdCompressor().compress(b'{"a":"' + b"x" * 3000 + b'"}')
    dec = msg.MapStreamDecoder(max_message=1000)
    with pytest.raises(RemoteProtocolError, match="limit"):
        dec.feed(len(bomb).to_bytes(4, "little") + bomb)
    ok = zstandard.ZstdCompressor().compress(b'{"a":"' + b"x" * 1500 + b'"}')
    assert msg.MapStreamDecoder(max_message=1000).feed(len(ok).to_bytes(4, "little") + ok)


def test_ipn_version_reads_as_a_version():
    hi = msg.hostinfo("h")
    assert hi["IPNVersion"] == f"{__version__}-tsproxy"
    assert re.fullmatch(r"\d+\.\d+\.\d+[-.\w]*-tsproxy", hi["IPNVersion"])
