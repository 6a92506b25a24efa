"""SOCKS5/SOCKS4a codec: whole messages, byte by byte, trailing bytes, hostile input, fuzzing."""

import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

from tsproxy.errors import RemoteProtocolError
from tsproxy.proxy import socks5 as socks

V4_REQ = b"\x05\x01\x00\x01" + socket.inet_aton("100.64.0.2") + struct.pack("!H", 80)
V6_REQ = b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "fd7a:115c:a1e0::2") + struct.pack("!H", 443)
NAME_REQ = b"\x05\x03\x00\x03\x10peer.tunnel.test" + struct.pack("!H", 53)

CASES = [
    (socks.parse_greeting, b"\x05\x02\x00\x02", ({0, 2}, 4)),
    (socks.parse_userpass, b"\x01\x05alice\x06s3cret", ((b"alice", b"s3cret"), 14)),
    (socks.parse_userpass, b"\x01\x00\x00", ((b"", b""), 3)),
    (socks.parse_request, V4_REQ, ((1, "100.64.0.2", 80), 10)),
    (socks.parse_request, V6_REQ, ((1, "fd7a:115c:a1e0::2", 443), 22)),
    (socks.parse_request, NAME_REQ, ((3, "peer.tunnel.test", 53), 23)),
    (socks.parse_socks4, b"\x04\x01\x00\x50" + socket.inet_aton("100.64.0.2") + b"bob\x00",
     ((1, "100.64.0.2", 80, b"bob"), 12)),
    (socks.parse_socks4, b"\x04\x01\x00\x50\x00\x00\x00\x01\x00peer.tunnel.test\x00",
     ((1, "peer.tunnel.test", 80, b""), 26)),
]


@pytest.mark.parametrize("parse,data,expect", CASES)
def test_whole_bytewise_and_trailing(parse, data, expect):
    assert parse(data) == expect
    for i in range(len(data)):                 # every strict prefix asks for more
        assert parse(data[:i]) is None
    value, used = parse(data + b"TRAILING")
    assert (value, used) == expect             # trailing bytes are left for the caller
    assert parse(bytearray(data)) == expect


@pytest.mark.parametrize("parse,data", [
    (socks.parse_greeting, b"\x04\x01\x00"),
    (socks.parse_greeting, b"\x05\x00"),
    (socks.parse_userpass, b"\x02\x01a\x01b"),
    (socks.parse_request, b"\x04\x01\x00\x01\x00\x00\x00\x00\x00\x00"),
    (socks.parse_request, b"\x05\x01\x00\x09\x00\x00"),
    (socks.parse_request, b"\x05\x01\x00\x03\x00\x00\x50"),
    (socks.parse_request, b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50"),
    (socks.parse_socks4, b"\x05\x01\x00\x50\x01\x02\x03\x04\x00"),
    (socks.parse_socks4, b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 300),
    (socks.parse_socks4, b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"h" * 300),
])
def test_hostile_input_raises(parse, data):
    with pytest.raises(RemoteProtocolError):
        parse(data)


def test_unknown_atyp_is_its_own_error():
    with pytest.raises(socks.AddressTypeError):
        socks.parse_request(b"\x05\x01\x00\x07")


def test_replies_and_udp_roundtrip():
    assert socks.reply(0, "127.0.0.1", 1055) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x1f"
    assert socks.reply(5) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    r6 = socks.reply(0, "::1", 80)
    assert r6[3] == 4 and len(r6) == 22
    assert socks.socks4_reply(socks.S4_GRANTED) == b"\x00\x5a" + b"\0" * 6
    for host in ("100.64.0.2", "fd7a:115c:a1e0::2", "peer.tunnel.test"):
        d = socks.build_udp(host, 53, b"payload")
        assert socks.parse_udp(d) == (0, host, 53, b"payload")
    assert socks.parse_udp(b"\0\0\x01\x01\x01\x02\x03\x04\x00\x35x")[0] == 1      # FRAG visible
    for bad in (b"", b"\0\0\0", b"\x01\0\0\x01\x01\x02\x03\x04\x00\x35", b"\0\0\0\x01\x01\x02"):
        with pytest.raises(RemoteProtocolError):
            socks.parse_udp(bad)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_parsers_never_crash(data):
    for parse in (socks.parse_greeting, socks.parse_userpass, socks.parse_request, socks.parse_socks4):
        try:
            r = parse(data)
        except RemoteProtocolError:
            continue
        if r is not None:
            _, used = r
            assert 0 < used <= len(data)
    try:
        socks.parse_udp(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 3]), st.one_of(st.ip_addresses().map(str),
       st.from_regex(r"[a-z][a-z0-9-]{0,30}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True)),
       st.integers(0, 65535), st.binary(max_size=20))
def test_fuzz_request_roundtrip(cmd, host, port, tail):
    req = bytes((5, cmd, 0)) + socks.encode_addr(host, port)
    assert socks.parse_request(req + tail) == ((cmd, host, port), len(req))
