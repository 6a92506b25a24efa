"""magicsock/core.py without sockets or a loop: two cores wired by hand exchange disco over
"UDP" and "DERP" lists, prove a direct path, fall back to DERP when it stops answering, and
classify what arrives (WireGuard, disco, STUN, junk); the clock is a number we move."""

import pytest

from tsproxy.control import messages as msg
from tsproxy.disco import stun
from tsproxy.disco import wire as disco
from tsproxy.keys import DiscoPrivate, NodePrivate
from tsproxy.magicsock import paths as P
from tsproxy.magicsock.core import DERP_MAGIC_IP, MagicCore, MagicPeer

WG = bytes([4, 0, 0, 0]) + bytes(40)              # looks like a WireGuard data message


class Side:
    def __init__(self, addr, home=900):
        self.key, self.disco = NodePrivate.generate(), DiscoPrivate.generate()
        self.addr, self.home = addr, home
        self.core = MagicCore(self.key.public(), self.disco)

    def node(self, endpoints=()):
        return msg.Node(id=1, key=self.key.public(), disco_key=self.disco.public(),
                        endpoints=list(endpoints), home_derp=self.home)


def pair(endpoints=True):
    a, b = Side(("10.0.0.1", 41641)), Side(("10.0.0.2", 41641))
    a.core.set_peers([b.node([b.addr] if endpoints else [])])
    b.core.set_peers([a.node([a.addr] if endpoints else [])])
    a.core.local_endpoints = [(*a.addr, 1)]
    b.core.local_endpoints = [(*b.addr, 1)]
    return a, b


def deliver(src: Side, dst: Side, now: float) -> list:
    """Move src's queued UDP (to dst.addr) and DERP frames (to dst's key) into dst."""
    wg = []
    udp = [(d, src.addr) for d, to in src.core.datagrams_to_send() if to == dst.addr]
    wg += dst.core.receive_datagrams(udp, now)
    for region, to, data in src.core.derp_frames_to_send():
        if to == dst.key.public().raw:
            got = dst.core.receive_derp(region, src.key.public().raw, data, now)
            if got is not None:
                wg.append(got)
    return wg


def test_disco_proves_the_direct_path_and_data_leaves_derp():
    a, b = pair()
    ep = a.core.endpoint_for(b.node())
    a.core.send([(WG, ep)], 100.0)
    udp, derp = a.core.datagrams_to_send(), a.core.derp_frames_to_send()
    # unproven: the data goes over DERP, a ping goes to b's endpoint, a call-me-maybe via DERP
    assert [(len(d), to) for d, to in udp] == [(len(d), b.addr) for d, _ in udp] and udp
    assert disco.looks_like(udp[0][0]) == "disco"
    assert (900, b.key.public().raw, WG) in derp
    assert any(d[:6] == disco.MAGIC for _, _, d in derp)          # call-me-maybe
    for d, to in udp:                                             # put them back for delivery
        a.core._udp_out.append((d, to))
    for f in derp:
        a.core._derp_out.append(f)
    got = deliver(a, b, 100.01)
    assert [(d, type(e)) for d, e in got] == [(WG, MagicPeer)]    # the data arrived via DERP
    assert b.core.counters["disco_ping_rx"] == 1 and b.core.counters["disco_cmm_rx"] == 1
    deliver(b, a, 100.02)                                         # b's pong (and b's own pings)
    assert a.core.counters["disco_pong_rx"] >= 1
    assert ep.paths.best == b.addr and ep.path_text() == "direct 10.0.0.2:41641"
    assert all(disco.looks_like(d) == "disco" for d, _ in a.core.datagrams_to_send())  # pongs
    a.core.send([(WG, ep)] * 3, 100.03)
    assert a.core.datagrams_to_send() == [(WG, b.addr)] * 3
    assert a.core.derp_frames_to_send() == []
    assert ep.tx_udp == 3 * len(WG)


def test_heartbeat_and_ping_timeout_fall_back_to_derp():
    a, b = pair()
    ep = a.core.endpoint_for(b.node())
    a.core.send([(WG, ep)], 10.0)
    a.core.datagrams_to_send(), a.core.derp_frames_to_send()
    assert a.core.next_deadline() == pytest.approx(10.0 + P.HEARTBEAT_INTERVAL)
    ep.paths.best, ep.paths.best_latency, ep.paths.trust_until = b.addr, 0.001, 12.0
    a.core.handle_timer(11.0)                                     # not due: nothing happens
    assert a.core.datagrams_to_send() == []
    a.core.handle_timer(13.0)                                     # heartbeat: ping the best path
    pings = a.core.datagrams_to_send()
    assert pings and all(to == b.addr for _, to in pings)
    deadline = a.core.next_deadline()
    assert 13.0 < deadline <= 13.0 + P.PING_TIMEOUT
    a.core.handle_timer(13.0 + P.PING_TIMEOUT)                    # no pong: the path is dropped
    assert ep.paths.best is None and ep.path_text() == "derp 900"
    a.core.datagrams_to_send()
    a.core.send([(WG, ep)], 18.5)
    assert (900, b.key.public().raw, WG) in a.core.derp_frames_to_send()


def test_idle_peer_has_no_deadline_and_timer_work_is_bounded():
    a, b = pair(endpoints=False)
    assert a.core.next_deadline() is None
    ep = a.core.endpoint_for(b.node())
    a.core.send([(WG, ep)], 0.0)
    t = 0.0
    for _ in range(40):                      # heartbeats stop once the session is idle
        d = a.core.next_deadline()
        if d is None:
            break
        t = d
        a.core.handle_timer(t)
    assert a.core.next_deadline() is None and t >= P.SESSION_ACTIVE_TIMEOUT


def test_classification_of_udp_input():
    a, b = pair()
    ep = a.core.endpoint_for(b.node())
    a.core._learn(b.addr, ep)
    stranger = ("192.0.2.7", 9)
    txid = b"t" * 12
    a.core.send_stun_probes([(900, [("192.0.2.1", 3478)])], 5.0)
    (req, to), = a.core.datagrams_to_send()
    assert to == ("192.0.2.1", 3478) and stun.parse_request(req) is not None
    resp = stun.build_response(stun.parse_request(req), "::ffff:203.0.113.5", 4444)
    got = a.core.receive_datagrams([
        (WG, b.addr),                          # WireGuard from a known address
        (WG, stranger),                        # WireGuard from an unknown one: raw address
        (resp, ("192.0.2.1", 3478)),           # STUN answer to our probe
        (stun.build_response(txid, "1.2.3.4", 1), ("192.0.2.1", 3478)),   # not ours
        (disco.MAGIC + bytes(80), stranger),   # disco from an unknown sender
        (b"\x00" * 3, stranger),               # junk
        (b"", stranger),
    ], 5.25)
    # junk is not ours to judge: the device counts it (rx_short) like any bad WireGuard
    assert got == [(WG, ep), (WG, stranger), (b"\x00" * 3, stranger), (b"", stranger)]
    assert a.core.wg_unknown_source and a.core.counters["rx_wg_unknown_source"] == 3
    assert a.core.region_latency == {900: pytest.approx(0.25)}
    assert a.core.reflexive == ("203.0.113.5", 4444) and a.core.reflexive_changed
    assert a.core.stun_answered and a.core.counters["rx_stun"] == 2
    assert a.core.codec.counters["disco_unknown_sender"] == 1
    assert a.core.counters["rx_udp"] == 7 and ep.rx_udp == len(WG)


def test_memoryview_datagrams_are_classified_too():
    a, b = pair()
    ep = a.core.endpoint_for(b.node())
    a.core._learn(b.addr, ep)
    buf = memoryview(WG + WG)
    got = a.core.receive_datagrams([(buf[:len(WG)], b.addr), (buf[len(WG):], ("192.0.2.9", 1))], 0)
    assert got[0][1] is ep and bytes(got[0][0]) == WG and got[1] == (WG, ("192.0.2.9", 1))


def test_derp_input_and_pings_over_derp():
    a, b = pair(endpoints=False)
    ep = a.core.endpoint_for(b.node())
    bkey = b.key.public().raw
    assert a.core.receive_derp(901, bkey, WG, 1.0) == (WG, ep)
    assert ep.paths.last_derp_region == 901 and ep.rx_derp == len(WG)
    assert a.core.receive_derp(901, bytes(32), WG, 1.0) is None
    assert a.core.counters["rx_derp_unknown_peer"] == 1
    # b pings a over DERP: a answers over DERP, its pong names the DERP pseudo address
    ping = b.core.codec.seal(a.disco.public().raw, disco.build_ping(b"p" * 12, bkey))
    assert a.core.receive_derp(901, bkey, ping, 1.1) is None
    (region, to, pong), = a.core.derp_frames_to_send()
    assert (region, to) == (901, bkey)
    sender, m = b.core.codec.open(pong)
    assert m[0] == "pong" and m[1] == b"p" * 12 and tuple(m[2]) == (DERP_MAGIC_IP, 901)
    a.core.derp_peer_gone(901, bkey)                              # b left that server
    assert ep.paths.last_derp_region == 0 and a.core.counters["derp_route_dropped"] == 1


def test_call_me_maybe_only_via_derp():
    a, b = pair(endpoints=False)
    cmm = b.core.codec.seal(a.disco.public().raw, disco.build_call_me_maybe([b.addr]))
    a.core.receive_datagrams([(cmm, b.addr)], 1.0)
    assert a.core.counters["disco_cmm_udp_ignored"] == 1 and a.core.datagrams_to_send() == []
    a.core.receive_derp(900, b.key.public().raw, cmm, 1.0)
    assert a.core.counters["disco_cmm_rx"] == 1
    pings = a.core.datagrams_to_send()
    assert pings and {to for _, to in pings} == {b.addr}           # ping the addresses at once
    assert a.core.next_deadline() == pytest.approx(1.0 + P.PING_TIMEOUT)


def test_only_tcp_443_sends_everything_over_derp():
    a, b = pair()
    a.core.only_tcp_443 = True
    ep = a.core.endpoint_for(b.node())
    ep.paths.best, ep.paths.best_latency, ep.paths.trust_until = b.addr, 0.001, 99.0
    a.core.send([(WG, ep), (WG, ("192.0.2.3", 1))], 1.0)
    assert a.core.datagrams_to_send() == []
    assert a.core.derp_frames_to_send() == [(900, b.key.public().raw, WG)]
    assert a.core.counters["tx_udp_blocked"] == 1
    a.core.send_stun_probes([(900, [("192.0.2.1", 3478)])], 1.0)
    assert a.core.datagrams_to_send() == [] and a.core.counters["tx_udp_blocked"] == 2


def test_roamed_peer_is_reattached_and_its_address_learned():
    a, b = pair(endpoints=False)
    ep = a.core.endpoint_for(b.node())
    new = ("198.51.100.4", 5000)
    a.core.receive_datagrams([(WG, new)], 1.0)
    assert a.core.wg_unknown_source
    back = a.core.adopt_roamed([(b.key.public(), new)], 1.0)
    assert back == [(b.key.public(), ep)] and not a.core.wg_unknown_source
    assert a.core.receive_datagrams([(WG, new)], 1.1) == [(WG, ep)]
    assert new in ep.paths.candidates


def test_ping_direct_and_via_derp_reaches_on_pong():
    a, b = pair(endpoints=False)
    ep = a.core.endpoint_for(b.node())
    seen = []
    a.core.on_pong = lambda txid, now: seen.append((txid, now))
    txid, addr, region = a.core.ping(b.key.public(), 1.0)
    assert (addr, region) == (None, 900)
    frames = a.core.derp_frames_to_send()
    assert any(f[2][:6] == disco.MAGIC for f in frames)
    for f in frames:
        b.core.receive_derp(900, a.key.public().raw, f[2], 1.0)
    for region, to, data in b.core.derp_frames_to_send():
        a.core.receive_derp(region, b.key.public().raw, data, 1.2)
    assert (txid, 1.2) in seen
    ep.paths.best, ep.paths.best_latency, ep.paths.trust_until = b.addr, 0.001, 99.0
    txid2, addr2, _ = a.core.ping(b.key.public(), 2.0)
    assert addr2 == b.addr and txid2 in ep.paths.pings
    assert any(to == b.addr for _, to in a.core.datagrams_to_send())
    a.core.cancel_ping(b.key.public(), txid2)
    assert txid2 not in ep.paths.pings
    assert a.core.ping(NodePrivate.generate().public(), 2.0) is None


def test_removed_peer_forgets_its_addresses():
    a, b = pair()
    ep = a.core.endpoint_for(b.node())
    a.core._learn(b.addr, ep)
    a.core.set_peers([])
    assert a.core.peers == {} and a.core.receive_datagrams([(WG, b.addr)], 0) == [(WG, b.addr)]
