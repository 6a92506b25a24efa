import struct
import zlib

from hypothesis import given, strategies as st

from tsproxy.disco import stun

# RFC 5769 section 2.2 (sample IPv4 response), bytes as printed in the RFC.
RFC5769_V4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96")
RFC5769_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
# RFC 5769 section 2.3: XOR-MAPPED-ADDRESS value for 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
RFC5769_V6_XMA = bytes.fromhex("0002a147" "0113a9faa5d3f179bc25f4b5bed2b9d9")


def test_rfc5769_v4_response_parse_and_fingerprint():
    assert stun.parse_response(RFC5769_V4_RESPONSE) == (RFC5769_TXID, ("192.0.2.1", 32853))
    body = RFC5769_V4_RESPONSE[:-8]
    assert (zlib.crc32(body) ^ 0x5354554E) == struct.unpack(">I", RFC5769_V4_RESPONSE[-4:])[0]


def test_rfc5769_v6_xor_mapped_address():
    r = stun.build_response(RFC5769_TXID, "2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert r[20:24] == bytes.fromhex("00200014") and r[24:] == RFC5769_V6_XMA
    assert stun.parse_response(r) == (RFC5769_TXID, ("2001:db8:1234:5678:11:2233:4455:6677", 32853))


def test_request_golden_and_parse():
    txid = bytes(range(12))
    r = stun.build_request(txid)
    assert r[:20] == bytes.fromhex("000100142112a442") + txid
    assert r[20:32] == b"\x80\x22\x00\x08tailnode"
    assert r[32:36] == b"\x80\x28\x00\x04"
    assert r[36:] == struct.pack(">I", zlib.crc32(r[:32]) ^ 0x5354554E)
    assert stun.parse_request(r) == txid
    bad = bytearray(r)
    bad[-1] ^= 1
    assert stun.parse_request(bytes(bad)) is None
    assert stun.parse_request_lenient(bytes(bad)) == txid


def test_v4_response_golden():
    txid = bytes(12)
    assert stun.build_response(txid, "192.0.2.1", 32853) == (
        bytes.fromhex("0101000c2112a442") + txid + bytes.fromhex("002000080001a147e112a643"))


@given(st.binary(max_size=120))
def test_parsers_never_raise(data):
    stun.parse_response(data)
    stun.parse_request(data)
    stun.parse_response(bytes.fromhex("01010000") + b"\x21\x12\xa4\x42" + data)
