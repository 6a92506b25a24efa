import ipaddress
import struct

import pytest
from hypothesis import given, strategies as st

from tsproxy.dns import message as m


def _answer(txid, name, records, rcode=0):
    q = m.encode_name(name) + struct.pack("!HH", m.TYPE_A, 1)
    out = struct.pack("!HHHHHH", txid, 0x8180 | rcode, 1, len(records), 0, 0) + q
    for rname, rtype, rdata in records:
        nm = b"\xc0\x0c" if rname == name else m.encode_name(rname)
        out += nm + struct.pack("!HHIH", rtype, 1, 60, len(rdata)) + rdata
    return out


def test_query_bytes_golden():
    # dig-style query for example.com A with RD, id 0x1234
    q = m.build_query(0x1234, "example.com", m.TYPE_A)
    assert q.hex() == "123401000001000000000000076578616d706c6503636f6d0000010001"


def test_parse_answers_with_compression_and_cname():
    cname = m.encode_name("real.example")
    resp = _answer(7, "www.example", [
        ("www.example", m.TYPE_CNAME, cname),
        ("real.example", m.TYPE_A, bytes([100, 64, 0, 2])),
        ("real.example", m.TYPE_AAAA, ipaddress.IPv6Address("fd7a:115c:a1e0::2").packed),
        ("other.example", m.TYPE_A, bytes([1, 2, 3, 4])),
    ])
    txid, rcode, qname, answers = m.parse_response(resp)
    assert (txid, rcode, qname) == (7, 0, "www.example")
    assert m.addresses_for(answers, "www.example") == [
        ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd7a:115c:a1e0::2")]


def test_nxdomain_rcode():
    _, rcode, _, answers = m.parse_response(_answer(1, "nope.example", [], rcode=3))
    assert rcode == m.RCODE_NXDOMAIN and answers == []


@pytest.mark.parametrize("bad", [b"", b"\x00" * 11, bytes.fromhex("0001" "0100" "0001000000000000") + b"\x01a\x00\x00\x01\x00\x01"])
def test_malformed(bad):
    with pytest.raises(m.DnsFormatError):
        m.parse_response(bad)


def test_pointer_loop_rejected():
    hdr = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0)
    with pytest.raises(m.DnsFormatError, match="loop"):
        m.parse_response(hdr + b"\xc0\x0c" + b"\x00\x01\x00\x01")


def test_name_limits():
    with pytest.raises(ValueError):
        m.encode_name("a" * 64 + ".example")
    with pytest.raises(ValueError):
        m.encode_name(".".join(["abcdefgh"] * 40))


@given(st.binary(max_size=300))
def test_fuzz_parse_never_crashes(data):
    try:
        m.parse_response(data)
    except m.DnsFormatError:
        pass
