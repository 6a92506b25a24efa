"""Property-based fuzzing of every untrusted-input parser (bounded for CI).

Three kinds: arbitrary bytes into each target of fuzz/targets.py; valid seed messages
(fuzz/make_corpus.py) with random byte-level mutations; and structure-aware inputs (JSON
shaped like a MapResponse, wg-quick lines, TOML tables, HTTP heads, SOCKS requests, DNS
messages with compression pointers, checksum-correct packets into a netstack).  The
contract each time: the documented error or a counted drop, nothing else, bounded memory.
The unit tests already throw plain random bytes at several parsers; these go deeper.
"""

import ipaddress
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fuzz import make_corpus, targets
from tsproxy.errors import ConfigError, RemoteProtocolError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = make_corpus.seeds()
NAMES = sorted(targets.TARGETS)


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(data=st.binary(max_size=600))
def test_random_bytes(name, data):
    targets.TARGETS[name](data)


_mutation = st.one_of(
    st.tuples(st.just("xor"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.integers(0, 0)),
    st.tuples(st.just("del"), st.integers(0, 10_000), st.integers(1, 16)),
    st.tuples(st.just("ins"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])),
)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        i = pos % (len(b) + 1)
        if op == "xor" and i < len(b):
            b[i] ^= arg
        elif op == "cut":
            del b[i:]
        elif op == "del":
            del b[i:i + arg]
        elif op == "ins":
            b[i:i] = arg
        elif op == "set" and i < len(b):
            b[i] = arg
    return bytes(b)


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(pick=st.integers(0, 100), ops=st.lists(_mutation, min_size=1, max_size=6))
def test_mutated_valid_messages(name, pick, ops):
    seeds = SEEDS[name]
    targets.TARGETS[name](mutate(seeds[pick % len(seeds)], ops))


# ---- MapResponse-shaped JSON ---------------------------------------------------------------

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.floats(allow_nan=True),
                  st.sampled_from(targets._STRINGS), st.text(max_size=20))
_json = st.recursive(_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.sampled_from(targets._FIELDS), kids, max_size=6)), max_leaves=40)


@settings(max_examples=100, deadline=None)
@given(msgs=st.lists(st.dictionaries(st.sampled_from(targets._FIELDS), _json, max_size=8),
                     min_size=1, max_size=4))
def test_mapresponse_structures(msgs):
    targets.target_mapresponse(json.dumps(msgs).encode())


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(sorted(make_corpus._MAP)), value=_json)
def test_mapresponse_one_field_replaced(field, value):
    """A valid MapResponse with one top-level field swapped for an arbitrary value."""
    obj = dict(make_corpus._MAP, **{field: value})
    targets.target_mapresponse(json.dumps([obj, make_corpus._DELTA]).encode())


@settings(max_examples=100, deadline=None)
@given(node_field=st.sampled_from(sorted(make_corpus._MAP["Node"])), value=_json)
def test_mapresponse_self_node_field_replaced(node_field, value):
    obj = dict(make_corpus._MAP, Node=dict(make_corpus._MAP["Node"], **{node_field: value}))
    targets.target_mapresponse(json.dumps(obj).encode())


# ---- configuration files -------------------------------------------------------------------

_WG_KEYS = ["PrivateKey", "Address", "DNS", "MTU", "ListenPort", "PublicKey", "PresharedKey",
            "AllowedIPs", "Endpoint", "PersistentKeepalive", "Table", "PostUp", "FwMark", "Bogus"]
_WG_VALUES = st.one_of(
    st.sampled_from(["10.0.0.1/32", "fd00::1/128, 10.0.0.0/8", "0.0.0.0/0", "1420", "0", "-1",
                     "65536", "1279", "[::1]:51820", "host.test:51820", "::1:51820", "[::1]",
                     "a" * 44, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "10.0.0.53, corp.test",
                     "", "off", "999999999999999999999"]),
    st.text(max_size=30))


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.one_of(
    st.sampled_from(["[Interface]", "[Peer]", "[interface]", "[Other]", "[", "# c", "", "=", "x"]),
    st.tuples(st.sampled_from(_WG_KEYS), _WG_VALUES).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.text(max_size=40)), max_size=25))
def test_wgconf_lines(lines):
    base = SEEDS["wgconf"][0].decode().splitlines()
    for text in ("\n".join(lines), "\n".join(base[:3] + lines + base[3:])):
        targets.target_wgconf(text.encode())


_toml_scalar = st.one_of(st.text(max_size=20).map(json.dumps), st.sampled_from(["true", "false"]),
                         st.integers(-10, 10**20).map(str), st.sampled_from(["1.5", "inf", "nan",
                         "1979-05-27T07:32:00Z", "{a = 1}", "[]", '["a", 1]', '["x", "y"]']))
_toml_keys = st.sampled_from(["login-server", "login_server", "auth-key", "hostname", "listen",
                              "socks5", "http-proxy", "forward", "reverse", "non-tailnet", "port",
                              "advertise-tags", "ephemeral", "foreground", "config", "log-level",
                              "wg-config", "proxy-user", "allow-public-without-auth", "bogus",
                              '"quoted key"', "a.b"])


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.tuples(_toml_keys, _toml_scalar), max_size=12),
       table=st.sampled_from(["", "[tbl]\n", "[[arr]]\n"]))
def test_toml_config_tables(items, table):
    text = "".join(f"{k} = {v}\n" for k, v in items[:6]) + table + "".join(
        f"{k} = {v}\n" for k, v in items[6:])
    targets.target_toml(text.encode())


# ---- proxies -------------------------------------------------------------------------------

_hdr_text = st.binary(max_size=30).map(lambda b: b.replace(b"\r\n\r\n", b""))


@settings(max_examples=200, deadline=None)
@given(method=st.sampled_from([b"GET", b"CONNECT", b"POST", b"G T", b"", b"\xff"]),
       target=st.one_of(st.sampled_from([b"http://a/", b"http://[::1]:80/", b"http://u:p@h/",
                                         b"host:443", b"[fd7a::1]:443", b"h:99999", b"h:", b":80",
                                         b"https://x/", b"http://h:0/", b"*", b"/", b"[::1"]),
                        _hdr_text),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b""]),
       headers=st.lists(st.tuples(st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding",
                                                   b"Connection", b"Proxy-Authorization", b"X y", b""]),
                                  st.one_of(_hdr_text, st.sampled_from([b"chunked", b"gzip, chunked",
                                            b"12", b"-1", b"1" * 30, b"close, te"]))), max_size=8),
       tail=st.binary(max_size=20))
def test_http_heads(method, target, version, headers, tail):
    head = method + b" " + target + b" " + version + b"\r\n" + b"".join(
        k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + tail
    targets.target_http(head)
    status = version + b" " + target[:3] + b" " + method + b"\r\n" + head.split(b"\r\n", 1)[1]
    targets.target_http(status)


@settings(max_examples=200, deadline=None)
@given(ver=st.sampled_from([4, 5, 1, 0]), cmd=st.integers(0, 4), atyp=st.sampled_from([1, 3, 4, 0, 9]),
       n=st.integers(0, 255), body=st.binary(max_size=300), cut=st.integers(0, 400))
def test_socks_requests(ver, cmd, atyp, n, body, cut):
    req = bytes((ver, cmd, 0, atyp, n)) + body
    targets.target_socks(req[:cut])
    targets.target_socks(bytes((ver, cmd)) + body[:cut])


# ---- DNS with compression pointers ---------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(qd=st.integers(0, 3), an=st.integers(0, 5), labels=st.lists(st.one_of(
    st.binary(min_size=1, max_size=10).map(lambda b: bytes((len(b),)) + b),
    st.integers(0, 0x3FFF).map(lambda o: struct.pack("!H", 0xC000 | o)),
    st.sampled_from([b"\0", b"\x40", b"\x80", b"\x3f"])), max_size=30), rdata=st.binary(max_size=40))
def test_dns_messages_with_pointers(qd, an, labels, rdata):
    body = b"".join(labels)
    msg = struct.pack("!HHHHHH", 1, 0x8180, qd, an, 0, 0) + body + b"\0\0\1\0\1" + (
        b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, len(rdata)) + rdata) * an
    targets.target_dns(msg)


# ---- checksum-correct packets into the netstack --------------------------------------------

A4, B4 = ipaddress.ip_address("10.0.0.2").packed, ipaddress.ip_address("10.0.0.1").packed
A6, B6 = ipaddress.ip_address("fd00::2").packed, ipaddress.ip_address("fd00::1").packed


@settings(max_examples=150, deadline=None)
@given(segs=st.lists(st.tuples(st.booleans(), st.sampled_from([80, 443, 81, 53]),
                               st.integers(0, 65535), st.integers(0, 2**32 - 1),
                               st.integers(0, 2**32 - 1), st.integers(0, 0xFF), st.integers(0, 65535),
                               st.binary(max_size=40), st.binary(max_size=1400),
                               st.sampled_from(["tcp", "udp", "icmp-echo", "icmp-err"])),
                     max_size=25))
def test_netstack_valid_checksum_packets(segs):
    """Well-formed, checksum-correct TCP/UDP/ICMP with random fields and options, to the
    stack's listener, its connections' ports and closed ports, IPv4 and IPv6."""
    from tsproxy.netstack.wire import icmp, udp
    from tsproxy.netstack.wire import tcp as W
    s = targets._fresh_stack(True)
    known = {k[3]: k for k in s.conns}             # our local port -> conn key
    now = 0.0
    for v6, dport, sport, seq, ack, flags, win, opts, payload, kind in segs:
        src, dst = (A6, B6) if v6 else (A4, B4)
        if kind == "tcp":
            opts = opts[:len(opts) - len(opts) % 4]        # whole 32-bit words, as TCP needs
            if sport % 3 == 0 and known:           # aim at an existing connection
                key = list(known.values())[sport % len(known)]
                src, sport, dst, dport = key
            pkt = W.Packetizer(src, dst, sport, dport).build(seq, ack, flags, win, opts[:40], payload)
        elif kind == "udp":
            pkt = udp.build(src, dst, sport, dport, payload)
        elif kind == "icmp-echo":
            pkt = icmp.echo_reply(6 if v6 else 4, src, dst, bytes((128 if v6 else 8, 0, 0, 0)) + payload)
        else:
            quoted = W.Packetizer(dst, src, dport, sport).build(seq, ack, flags, win)
            pkt = icmp.port_unreachable(6 if v6 else 4, src, dst, bytes(quoted))
            pkt = bytearray(pkt)
            t = (20 if not v6 else 40)
            pkt[t] = flags % 12                    # type: unreachable, time exceeded, others
        s.receive_packet(bytes(pkt), now)
        now += 0.01
        s.handle_timer(now)
        s.packets_to_send()
        for conn in s.take_touched():
            conn.recv(1 << 16, now)
    s.handle_timer(now + 1000.0)
    assert len(s.conns) <= 2 + len(segs)


# ---- bounded memory ------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(ftype=st.integers(0, 255), length=st.integers(4097, 2**32 - 1), junk=st.binary(max_size=64))
def test_derp_reader_refuses_oversized_frames_before_buffering(ftype, length, junk):
    from tsproxy.derp import wire
    r = wire.FrameReader(max_frame=4096)
    with pytest.raises(RemoteProtocolError):
        r.feed(struct.pack(">BI", ftype, length) + junk)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 200))
def test_noise_receive_buffer_is_bounded(n):
    from tsproxy.control.noiseconn import NoiseConnection
    *_, result = targets._noise_fixture()
    conn = NoiseConnection(result, max_buffer=4096)
    partial = b"\x04\x0f\xfd" + bytes(100)         # a record header that never completes
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(partial)
        for _ in range(n):
            conn.receive_data(bytes(4096))
        raise RemoteProtocolError("fed everything")  # reached only if nothing bounded it
    assert conn.failed


@settings(max_examples=30, deadline=None)
@given(size=st.integers(33 * 1024, 200 * 1024), crlf=st.booleans())
def test_http_head_without_end_is_bounded(size, crlf):
    from tsproxy.proxy import http
    line = b"X: y\r\n" if crlf else b"x"
    buf = b"GET / HTTP/1.1\r\n" + line * (size // len(line))
    with pytest.raises(http.HeaderTooLarge):
        http.parse_request_head(buf)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(65537, 2**32 - 1))
def test_map_stream_refuses_oversized_length_before_buffering(n):
    from tsproxy.control import messages
    dec = messages.MapStreamDecoder(max_message=65536)
    with pytest.raises(RemoteProtocolError, match="exceeds limit"):
        dec.feed(n.to_bytes(4, "little") + bytes(16))


def test_config_errors_are_config_errors():
    """Sanity for the contract the targets rely on: a wrong wg-quick file is a ConfigError."""
    from tsproxy.daemon import wgconf
    with pytest.raises(ConfigError):
        wgconf.parse("[Interface]\nPrivateKey = nope\n")
