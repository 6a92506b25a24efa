"""Fuzz targets: one function per parser of untrusted bytes, shared by the atheris harness
(fuzz/harness.py) and the Hypothesis tests (tests/fuzz/).

Each target takes arbitrary bytes and feeds them to one parser (or a whole receive path).
It catches exactly the exceptions that parser documents for bad input (RemoteProtocolError,
ConfigError, ...) or, for packet paths, expects a counted drop; anything else escapes and is
a crash.  Fixtures (keys, devices, valid messages) are built once per process, with fixed
keys so every run and every seed corpus is reproducible.

Encrypted formats (WireGuard, disco, Noise) are fuzzed two ways: the raw bytes as they come,
and "mutate mode" where the first byte picks a valid message and the rest XORs into it, so
the fuzzer gets past the framing checks into the decryption and state handling.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile

from tsproxy.errors import ConfigError, RemoteProtocolError

_TMP = tempfile.gettempdir()


def _key(cls, n: int):
    return cls(bytes([n]) * 32) if hasattr(cls, "from_raw") else cls(bytes([n]) * 32)


def _fixed_rng(seed: int = 7):
    state = [seed]

    def rng(n: int) -> bytes:
        state[0] += 1
        return (state[0].to_bytes(8, "big") * (n // 8 + 1))[:n]
    return rng


def _mutate(base: bytes, data: bytes) -> bytes:
    """XOR data[0:] into base; the part of data longer than base is appended (bounded)."""
    out = bytearray(base)
    for i, b in enumerate(data[:len(out)]):
        out[i] ^= b
    return bytes(out) + data[len(out):len(out) + 256]


def _pick(templates: list[bytes], data: bytes) -> bytes:
    """First byte: 0-127 raw input, else mutate template (byte % len)."""
    if not data or data[0] < 128:
        return data[1:]
    return _mutate(templates[data[0] % len(templates)], data[1:])


def _split(data: bytes, limit: int = 32) -> list[bytes]:
    """Length-prefixed chunks (2-byte big-endian length), so one input carries a sequence."""
    out, i = [], 0
    while i + 2 <= len(data) and len(out) < limit:
        n = int.from_bytes(data[i:i + 2], "big") % 2048
        out.append(data[i + 2:i + 2 + n])
        i += 2 + n
    if i < len(data) and len(out) < limit:
        out.append(data[i:])
    return out


# ---- IPv4/IPv6/TCP/UDP/ICMP headers ------------------------------------------------------

def target_ip(data: bytes) -> None:
    from tsproxy.netstack.wire import ip, tcp as W
    for verify in (True, False):
        r = ip.parse(data, verify)
        if r.__class__ is str:
            assert r in (ip.BAD_HEADER, ip.BAD_CHECKSUM, ip.FRAGMENT), r
            continue
        v, src, dst, proto, start, end = r
        assert v in (4, 6) and 0 <= start <= end <= len(data)
        W.parse_options(data[start + 20:start + 60])
        if end - start >= 20:
            W.unpack_header(data, start)
            W.segment_checksum_ok(data, start, end, src, dst, proto)
    W.parse_options(data)


# ---- the netstack receive path as a whole -------------------------------------------------

_STACK_ADDRS = ("10.0.0.1", "fd00::1")
_PEER4, _PEER6 = ipaddress.ip_address("10.0.0.2").packed, ipaddress.ip_address("fd00::2").packed


def _fresh_stack(verify: bool):
    from tsproxy.netstack.stack import Stack
    s = Stack(list(_STACK_ADDRS), mtu=1420, now=0.0, rng=_fixed_rng(), verify_checksums=verify)
    s.tcp_listen(80)
    s.udp_bind(53)
    s.tcp_connect("10.0.0.2", 443, 0.0)
    s.tcp_connect("fd00::2", 443, 0.0)
    return s


def _fix_packet(pkt: bytes) -> bytes:
    """Point a random packet at the stack (dst = our address) so it passes the first check."""
    if len(pkt) >= 20 and pkt[0] >> 4 == 4:
        return pkt[:12] + _PEER4 + ipaddress.ip_address(_STACK_ADDRS[0]).packed + pkt[20:]
    if len(pkt) >= 40 and pkt[0] >> 4 == 6:
        return pkt[:8] + _PEER6 + ipaddress.ip_address(_STACK_ADDRS[1]).packed + pkt[40:]
    return pkt


def target_netstack(data: bytes) -> None:
    """A sequence of packets into one Stack (checksums off so the fuzzer reaches TCP/UDP/ICMP
    handling), with timers run in between; every packet must be handled or counted."""
    from tsproxy.netstack.stack import Stack  # noqa: F401
    verify = bool(data[:1]) and data[0] & 1 == 1
    s = _fresh_stack(verify)
    now = 0.0
    for i, pkt in enumerate(_split(data[1:])):
        if i % 2:
            pkt = _fix_packet(pkt)
        s.receive_packet(pkt, now)
        now += 0.05
        s.handle_timer(now)
        s.packets_to_send()
        for conn in s.take_touched():
            conn.recv(1 << 16, now)
    s.handle_timer(now + 600.0)


# ---- WireGuard device receive path ---------------------------------------------------------

_wg = None


def _wg_fixture():
    global _wg
    if _wg is None:
        from tsproxy.keys import NodePrivate
        from tsproxy.noise import ikpsk2
        from tsproxy.wg.device import WgDevice
        ka, kb = NodePrivate(bytes([1]) * 32), NodePrivate(bytes([2]) * 32)

        def dev(k, peer, ip):
            d = WgDevice(k, now=1000.0, rng=_fixed_rng(), wall_offset=1.7e9)
            d.add_peer(peer.public(), allowed_ips=[ipaddress.ip_network(ip)],
                       endpoint=("192.0.2.9", 51820))
            return d
        a, b = dev(ka, kb, "10.0.0.2/32"), dev(kb, ka, "10.0.0.1/32")
        from tsproxy.netstack.wire import udp
        pkt = udp.build(ipaddress.ip_address("10.0.0.1").packed,
                        ipaddress.ip_address("10.0.0.2").packed, 1, 2, b"hello")
        a.send_packet(pkt, 1000.0)
        init = a.datagrams_to_send()[0][0]
        b.receive_datagram(init, ("192.0.2.1", 51820), 1000.0)
        resp = b.datagrams_to_send()[0][0]
        a.receive_datagram(resp, ("192.0.2.2", 51820), 1000.0)
        data = a.datagrams_to_send()[0][0]
        cookie = ikpsk2.create_cookie_reply(init, our_cookie_key=bytes(32), cookie=bytes(16),
                                            rng=lambda n: bytes(n))
        _wg = (ka, kb, [init, resp, cookie, data])
    return _wg


def target_wireguard(data: bytes) -> None:
    """Datagrams (raw or mutated valid initiation/response/cookie/data) into a fresh responder
    device; every one must be handled or counted, never raise."""
    from tsproxy.wg.device import WgDevice
    ka, kb, templates = _wg_fixture()
    b = WgDevice(kb, now=1000.0, rng=_fixed_rng(), wall_offset=1.7e9)
    b.add_peer(ka.public(), allowed_ips=[ipaddress.ip_network("10.0.0.1/32")])
    now = 1000.0
    for chunk in _split(data, limit=8):
        d = _pick(templates, chunk)
        n0 = b.counters["rx_datagrams"]
        b.receive_datagram(d, ("192.0.2.1", 51820), now)
        assert b.counters["rx_datagrams"] == n0 + 1
        b.datagrams_to_send()
        b.take_packets()
        now += 0.5
        b.handle_timer(now)


# ---- disco and STUN -------------------------------------------------------------------------

_disco = None


def _disco_fixture():
    global _disco
    if _disco is None:
        from tsproxy.disco import wire
        from tsproxy.keys import DiscoPrivate
        a = wire.DiscoCodec(DiscoPrivate(bytes([3]) * 32), rng=_fixed_rng())
        b = wire.DiscoCodec(DiscoPrivate(bytes([4]) * 32), rng=_fixed_rng())
        msgs = [wire.build_ping(bytes(12), bytes(32), 10), wire.build_pong(bytes(12), ("192.0.2.1", 41641)),
                wire.build_pong(bytes(12), ("2001:db8::1", 41641)),
                wire.build_call_me_maybe([("192.0.2.1", 1), ("2001:db8::1", 2)])]
        _disco = (a, b, msgs, [a.seal(b.public, m) for m in msgs])
    return _disco


def target_disco(data: bytes) -> None:
    from tsproxy.disco import wire
    a, b, inner, sealed = _disco_fixture()
    wire.looks_like(data)
    wire.parse_message(data)
    wire.parse_message(_pick(inner, data))
    r = b.open(_pick(sealed, data))
    assert r is None or r[1][0] in ("ping", "pong", "call_me_maybe")


def target_stun(data: bytes) -> None:
    from tsproxy.disco import stun
    txid = bytes(range(12))
    templates = [stun.build_request(txid), stun.build_response(txid, "192.0.2.1", 3478),
                 stun.build_response(txid, "2001:db8::1", 3478)]
    for d in (data, _pick(templates, data)):
        stun.parse_request(d)
        stun.parse_request_lenient(d)
        r = stun.parse_response(d)
        assert r is None or len(r) == 2


# ---- DERP ----------------------------------------------------------------------------------

_derp = None


def _derp_fixture():
    global _derp
    if _derp is None:
        from nacl.public import Box, PrivateKey
        from tsproxy.derp import wire
        from tsproxy.keys import NodePrivate
        server = PrivateKey(bytes([5]) * 32)
        node = NodePrivate(bytes([6]) * 32)
        client_pub = PrivateKey(node.raw).public_key
        info = Box(server, client_pub).encrypt(b'{"version":2}', bytes(24))
        frames = (wire.build_server_key(bytes(server.public_key))
                  + wire.build_frame(wire.SERVER_INFO, bytes(info))
                  + wire.build_recv_packet(bytes(32), b"packet")
                  + wire.build_frame(wire.KEEP_ALIVE)
                  + wire.build_frame(wire.PING, bytes(8))
                  + wire.build_peer_gone(bytes(32))
                  + wire.build_frame(wire.PEER_PRESENT, bytes(32))
                  + wire.build_restarting(100, 1000))
        _derp = (node, frames)
    return _derp


def target_derp(data: bytes) -> None:
    """Bytes from a DERP server into the FrameReader and the DerpClient state machine."""
    from tsproxy.derp import wire
    from tsproxy.derp.client import DerpClient
    node, valid = _derp_fixture()
    r = wire.FrameReader(max_frame=4096)
    try:
        for chunk in _split(data):
            for ftype, payload in r.feed(chunk):
                assert 0 <= ftype <= 255 and len(payload) <= 4096
    except RemoteProtocolError:
        pass
    sel = data[0] if data else 0
    stream = _mutate(valid, data[1:]) if sel >= 128 else data[1:]
    c = DerpClient(node, now=0.0, rng=_fixed_rng())
    try:
        for i, chunk in enumerate(_split(stream) if sel & 1 else [stream]):
            c.receive_data(chunk, float(i))
            while c.next_event() is not None:
                pass
            c.data_to_send()
        c.handle_timer(1000.0)
    except RemoteProtocolError:
        pass
    for parse in (wire.parse_server_key,):
        try:
            parse(data)
        except RemoteProtocolError:
            pass


# ---- Noise (ts2021) handshake and records --------------------------------------------------

_noise = None


def _noise_fixture():
    global _noise
    if _noise is None:
        from tsproxy.control.noiseconn import ClientHandshake, ServerHandshake
        from tsproxy.keys import MachinePrivate
        from tsproxy.noise import ik
        from tsproxy.noise.ik import Responder
        server = MachinePrivate(bytes([7]) * 32)
        machine = MachinePrivate(bytes([8]) * 32)
        ch = ClientHandshake(machine, server.public(), "control.test", rng=_fixed_rng())
        sh = ServerHandshake(Responder(server, rng=_fixed_rng(9)), early_challenge=bytes(32))
        sconn = sh.receive_data(ch.request)
        server_bytes = sh.data_to_send()
        cconn = ch.receive_data(server_bytes)
        sconn.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(40))
        from tsproxy.control import wire
        early = server_bytes[len(wire.UPGRADE_RESPONSE) + ik.RESPONSE_LEN:]   # record nonce 0
        records = early + sconn.data_to_send()
        _noise = (server, machine, ch.request, server_bytes, records, cconn.result)
    return _noise


def target_noise(data: bytes) -> None:
    """Server side: upgrade request + initiation; client side: 101 + response + early payload
    + records; transport: records into a NoiseConnection."""
    from tsproxy.control.noiseconn import ClientHandshake, NoiseConnection, ServerHandshake
    from tsproxy.noise import ik
    server, machine, request, server_bytes, records, result = _noise_fixture()
    sel = data[0] % 3 if data else 0
    body = data[1:]
    if sel == 0:
        sh = ServerHandshake(ik.Responder(server, rng=_fixed_rng(9)))
        stream = _mutate(request, body) if data and data[0] >= 128 else body
        try:
            for chunk in _split(stream) if len(stream) > 300 else [stream]:
                conn = sh.receive_data(chunk)
                if conn is not None:
                    conn.read()
            sh.data_to_send()
        except RemoteProtocolError:
            pass
    elif sel == 1:
        ch = ClientHandshake(machine, server.public(), "control.test", rng=_fixed_rng())
        stream = _mutate(server_bytes, body) if data[0] >= 128 else body
        try:
            conn = ch.receive_data(stream)
            if conn is not None:
                conn.read()
                _ = conn.early_payload
        except RemoteProtocolError:
            pass
    else:
        conn = NoiseConnection(result, expect_early_payload=bool(data[0] & 4))
        stream = _mutate(records, body) if data[0] >= 128 else body
        try:
            for chunk in _split(stream, limit=8):
                conn.receive_data(chunk)
                conn.read(1000)
        except RemoteProtocolError:
            assert conn.failed
    for parse in (ik.parse_error_message,):
        parse(data)
    try:
        ik.parse_initiation_header(data)
    except RemoteProtocolError:
        pass


def target_control_wire(data: bytes) -> None:
    """The HTTP-level pieces of the control protocol: /key JSON, upgrade heads, early payload."""
    from tsproxy.control import wire
    for fn in (wire.parse_key_response, wire.split_http_head, wire.parse_http_head,
               wire.check_upgrade_response, wire.parse_upgrade_request, wire.parse_early_json):
        try:
            fn(data)
        except RemoteProtocolError:
            pass
    try:
        wire.early_payload_length(data[:9].ljust(9, b"\0"))   # callers pass exactly 9 bytes
    except RemoteProtocolError:
        pass


# ---- MapResponse JSON ------------------------------------------------------------------------

def json_from_bytes(data: bytes, depth: int = 0):
    """A deterministic bytes -> JSON-value decoder, so coverage-guided fuzzing explores
    structures (objects keyed by the MapResponse field names) and not only JSON syntax."""
    pos = [0]

    def byte() -> int:
        if pos[0] >= len(data):
            return 0
        pos[0] += 1
        return data[pos[0] - 1]

    def value(d: int):
        t = byte() % 10
        if d > 6:
            t %= 5
        if t == 0:
            return None
        if t == 1:
            return bool(byte() & 1)
        if t == 2:
            return int.from_bytes(bytes(byte() for _ in range(4)), "big", signed=True) >> (byte() % 32)
        if t == 3:
            return _STRINGS[byte() % len(_STRINGS)]
        if t == 4:
            n = byte() % 24
            return bytes(byte() for _ in range(n)).decode("latin-1")
        if t == 5 or t == 9:
            return [value(d + 1) for _ in range(byte() % 5)]
        return {_FIELDS[byte() % len(_FIELDS)]: value(d + 1) for _ in range(byte() % 6)}

    return value(depth)


_FIELDS = ["Node", "Peers", "PeersChanged", "PeersRemoved", "PeersChangedPatch", "DERPMap",
           "DNSConfig", "Domain", "PacketFilter", "PacketFilters", "UserProfiles", "KeepAlive",
           "ControlTime", "PeerSeenChange", "OnlineChange", "CollectServices", "Health",
           "PingRequest", "PopBrowserURL", "SSHPolicy", "Debug", "ID", "StableID", "Name",
           "Key", "KeyExpiry", "Machine", "DiscoKey", "Addresses", "AllowedIPs", "Endpoints",
           "HomeDERP", "DERP", "Hostinfo", "Online", "LastSeen", "Tags", "PrimaryRoutes",
           "Expired", "IsWireGuardOnly", "Cap", "CapMap", "User", "Regions", "RegionID",
           "RegionCode", "RegionName", "Nodes", "HostName", "IPv4", "IPv6", "STUNPort",
           "DERPPort", "STUNOnly", "CanPort80", "InsecureForTests", "omitDefaultRegions",
           "HomeParams", "Resolvers", "Routes", "FallbackResolvers", "Domains", "ExtraRecords",
           "Addr", "Type", "Value", "CertDomains", "Proxied", "NodeID", "SrcIPs", "DstPorts",
           "IP", "Ports", "First", "Last", "IPProto", "SrcBits", "Bits", "Caps", "NodeKeyExpired",
           "MachineAuthorized", "LoginName", "Login", "Error", "AuthURL", "0", "1", "*"]
_STRINGS = ["", "100.64.0.1/32", "fd7a:115c:a1e0::1/128", "0.0.0.0/0", "::/0", "10.0.0.0/8",
            "192.0.2.1:41641", "[2001:db8::1]:41641", "nodekey:" + "00" * 32,
            "discokey:" + "11" * 32, "mkey:" + "22" * 32, "nodekey:zz", "2026-01-01T00:00:00Z",
            "0001-01-01T00:00:00Z", "9999-99-99T99:99:99Z", "peer.tailnet.test.", "tailnet.test",
            "*", "22-80", "100.64.0.0/10", "x" * 300, "tag:web", "1.1.1.1", "https://x/"]


def _map_objects(data: bytes) -> list:
    try:
        obj = json.loads(data)
        return obj if isinstance(obj, list) else [obj]
    except (ValueError, RecursionError):
        return [json_from_bytes(chunk) for chunk in _split(data, limit=6)]


def target_mapresponse(data: bytes) -> None:
    """JSON structures through parse_map_response and a MapSession (apply, netmap, names),
    and the raw bytes through the length-prefixed stream decoder."""
    from tsproxy.control import messages as m
    from tsproxy.control.netmap import MapSession, build_names
    session = MapSession()
    for obj in _map_objects(data):
        for parse in (m.parse_node, m.parse_peer_change, m.parse_dns_config, m.parse_derp_map,
                      m.parse_filter_rules):
            try:
                parse(obj)
            except RemoteProtocolError:
                pass
        try:
            nm = session.apply(m.parse_map_response(obj), 1.7e9)
        except RemoteProtocolError:
            continue
        if nm is not None:
            nm.wireguard_peers()
            nm.split_dns_routes()
            build_names(nm)
            nm.resolve("peer.tailnet.test")
            session.self_expired(1.7e9)
    for compressed in (False, True):
        dec = m.MapStreamDecoder(compressed=compressed, max_message=1 << 16)
        try:
            for obj in dec.feed(data):
                assert isinstance(obj, dict)
        except RemoteProtocolError:
            pass
    try:
        m.parse_register_response(data)
    except RemoteProtocolError:
        pass


# ---- proxies ----------------------------------------------------------------------------------

def target_socks(data: bytes) -> None:
    from tsproxy.proxy import socks5 as s
    for parse in (s.parse_greeting, s.parse_userpass, s.parse_request, s.parse_socks4, s.parse_udp):
        for d in (data, b"\x05" + data, b"\x04\x01" + data, b"\x01" + data, b"\0\0\0" + data):
            try:
                r = parse(d)
            except RemoteProtocolError:
                continue
            if r is not None and parse is not s.parse_udp:
                assert r[-1] <= len(d), (parse.__name__, r)


def target_http(data: bytes) -> None:
    from tsproxy.proxy import http as h
    for parse in (h.parse_request_head, h.parse_response_head):
        for d in (data, b"GET http://x/ HTTP/1.1\r\n" + data, b"HTTP/1.1 200 OK\r\n" + data):
            try:
                r = parse(d)
            except RemoteProtocolError:
                continue
            if r is None:
                continue
            head = r[0]
            for fn in (h.content_length, h.is_chunked, h.end_to_end):
                try:
                    fn(head)
                except RemoteProtocolError:
                    pass
            if head.target is not None:
                t = head.target if isinstance(head.target, str) else bytes(head.target).decode("latin-1")
                for fn in (h.split_absolute, h.split_authority):
                    try:
                        fn(t)
                    except RemoteProtocolError:
                        pass
    text = data.decode("latin-1")
    for fn in (h.split_absolute, lambda t: h.split_authority(t, 80), h.split_authority):
        try:
            fn(text)
        except RemoteProtocolError:
            pass


# ---- configuration -------------------------------------------------------------------------

def target_wgconf(data: bytes) -> None:
    from tsproxy.daemon import wgconf
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    try:
        wgconf.parse(text)
    except ConfigError as e:
        assert str(e)


def target_toml(data: bytes) -> None:
    from tsproxy.daemon import options
    path = os.path.join(_TMP, f"tsproxy-fuzz-{os.getpid()}.toml")
    with open(path, "wb") as f:
        f.write(data)
    try:
        # each setting comes back as (value, "FILE line N: key"), the source errors name
        for k, (v, source) in options._load_toml(path, True).items():
            assert isinstance(v, (str, bool, list)), (k, v)
            assert source.startswith(path), (k, source)
    except ConfigError as e:
        assert str(e)
    try:
        options.merge({"config": path}, environ={})
    except ConfigError:
        pass


def target_specs(data: bytes) -> None:
    """Forward/reverse specs and listen addresses (flags and config values)."""
    from tsproxy.daemon import options
    from tsproxy.proxy import specs
    text = data.decode("utf-8", "replace")
    for fn in (specs.parse_forward, specs.parse_reverse, options.parse_listen_addr,
               lambda t: options.validate(options.UpOptions(port=t))):
        try:
            fn(text)
        except ConfigError as e:
            assert str(e)


# ---- IPC and DNS -----------------------------------------------------------------------------

def target_ipc(data: bytes) -> None:
    from tsproxy.daemon import ipc
    try:
        req = ipc.parse_request(data)
    except ValueError:
        return
    assert isinstance(req, dict) and isinstance(req["op"], str)


def target_dns(data: bytes) -> None:
    from tsproxy.dns import message as m
    try:
        txid, rcode, qname, answers = m.parse_response(data)
    except m.DnsFormatError:
        return
    m.addresses_for(answers, qname)


TARGETS = {name[7:]: fn for name, fn in globals().items() if name.startswith("target_")}
