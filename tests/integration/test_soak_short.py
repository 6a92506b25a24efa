"""Soak, CI size (issue 12 item 5; the 10-minute run is bench/bench_soak.py): about 60 s of mixed
traffic between two tsproxy daemons on the loopback test tailnet, with the client daemon's
WireGuard rekey interval shortened to 8 s (tsproxy.testing.fastrekey) so the run crosses several
rekeys.  Traffic (tsproxy.testing.soak): bulk 5 MB downloads, many short connections by MagicDNS
name (SOCKS5, HTTP GET, CONNECT), UDP echo and DNS queries through UDP forwards to the server
daemon's reverse UDP forwards.

Asserted: no transfer failed (every one complete and byte-exact), no UDP answer was wrong,
rekeys happened (completed handshakes rose by at least 3), and the client daemon's RSS at the
end is within a generous bound of its RSS after the warm-up (measured here: at most 1.5x + 32 MB;
a leak of a buffer per connection or per rekey would exceed it).  No timing is asserted."""

import asyncio
import threading

import pytest

from tests.conftest import Daemon, free_port
from tests.tailnet_helpers import eventually, peer_status
from tsproxy.testing import loadgen, soak
from tsproxy.testing.servers import start_servers

pytestmark = [pytest.mark.timeout(400)]

SECONDS, REKEY_AFTER = 60, 8


@pytest.fixture
def servers():
    """The test servers (HTTP /bytes/N, UDP echo, DNS) on loopback ports, in a thread of their own."""
    ready, loop = threading.Event(), asyncio.new_event_loop()
    box = {}

    def run():
        asyncio.set_event_loop(loop)
        handles, ports = loop.run_until_complete(start_servers(
            ["127.0.0.1"], "tsp-sb", {"soak.test": ["127.0.0.9"]},
            ports={k: 0 for k in ("http", "echo", "discard", "udp_echo", "dns")}))
        box.update(handles=handles, ports=ports)
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10)
    yield box["ports"]
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


def test_soak_short_mixed_traffic_across_rekeys(tailnet, servers, tmp_path):
    ctl = ["--login-server", tailnet.control_url, "--auth-key", tailnet.auth_key]
    b = Daemon(str(tmp_path / "b"), [*ctl, "--hostname", "tsp-sb", "--listen", "off",
                                     "--reverse", f"80:127.0.0.1:{servers['http']}",
                                     "--reverse", f"udp:7:127.0.0.1:{servers['udp_echo']}",
                                     "--reverse", f"udp:53:127.0.0.1:{servers['dns']}"])
    a = None
    try:
        b.start(timeout=60)
        b_ip = b.status()["addresses"][0]
        port, echo, dns = free_port(), free_port(), free_port()
        a = Daemon(str(tmp_path / "a"), [*ctl, "--hostname", "tsp-sa", "--listen", f"127.0.0.1:{port}",
                                         "--forward", f"udp:{echo}:{b_ip}:7",
                                         "--forward", f"udp:{dns}:{b_ip}:53"])
        a.entry = ["-m", "tsproxy.testing.fastrekey", str(REKEY_AFTER)]
        a.start(timeout=60)
        eventually(lambda: all(t.ok for t in asyncio.run(
            loadgen.download_many(port, "tsp-sb", 80, n=1, size=1000, timeout=10))),
            60, "tsp-sa reaches tsp-sb")

        def sample():
            st = a.status()
            p = peer_status(a, "tsp-sb") or {}
            return {"rss": loadgen.proc_rss(st["pid"]), "fds": loadgen.proc_fds(st["pid"]),
                    "tasks": st["process"]["asyncio_tasks"], "handshakes": p.get("handshakes", 0)}

        rep = asyncio.run(soak.run(proxy_port=port, host=b_ip, seconds=SECONDS, bulk=2,
                                   bulk_size=5_000_000, short=3, short_host="tsp-sb",
                                   echo_port=echo, dns_port=dns, dns_name="soak.test",
                                   sample=sample, every=4.0))
        s = rep["samples"]
        print(f"soak: bulk {rep['bulk_ok']} short {rep['short_ok']} ok, {rep['failed']} failed; "
              f"udp echo {rep['udp_echo_ok']}/{rep['udp_echo_sent']} dns {rep['udp_dns_ok']}/"
              f"{rep['udp_dns_sent']}; handshakes {[x['handshakes'] for x in s]}; "
              f"RSS MB {[round(x['rss'] / 1e6) for x in s]}; max gap {rep['max_gap_s']:.2f} s")
        assert rep["failed"] == 0, rep["failures"][:10]
        assert rep["bulk_ok"] >= 2 and rep["short_ok"] >= 10, rep
        assert rep["udp_echo_bad"] == 0 and rep["udp_dns_bad"] == 0, rep
        assert rep["udp_echo_ok"] > 0 and rep["udp_dns_ok"] > 0, rep
        assert s[-1]["handshakes"] - s[0]["handshakes"] >= 3, [x["handshakes"] for x in s]
        warm = next(x for x in s if x["t"] >= 12)
        assert s[-1]["rss"] <= warm["rss"] * 1.5 + 32e6, [round(x["rss"] / 1e6) for x in s]
    finally:
        if a is not None:
            a.stop()
        b.stop()
