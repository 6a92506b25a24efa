"""STUN binding codec as Tailscale uses it (PROTOCOL.md 6.6, RFC 5389).

Request (40 bytes; PROTOCOL.md says 48/0x1C but 12+8 attribute bytes give 0x14): 00 01 | 00 14 | cookie | txid(12) | SOFTWARE "tailnode" | FINGERPRINT.
Response: 01 01 | len | cookie | txid | XOR-MAPPED-ADDRESS (v4: 8, v6: 20 bytes of value).
Parsers return None on anything malformed; they never raise.
"""
import ipaddress
import struct
import zlib

COOKIE = b"\x21\x12\xa4\x42"
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
SOFTWARE = b"tailnode"
FINGERPRINT_XOR = 0x5354554E
_HDR = struct.Struct(">HH4s12s")
_ATTR = struct.Struct(">HH")


def _fingerprint(b: bytes) -> int:
    return (zlib.crc32(b) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def build_request(txid: bytes) -> bytes:
    assert len(txid) == 12
    b = _HDR.pack(BINDING_REQUEST, 20, COOKIE, txid) + _ATTR.pack(ATTR_SOFTWARE, 8) + SOFTWARE
    return b + _ATTR.pack(ATTR_FINGERPRINT, 4) + struct.pack(">I", _fingerprint(b))


def _attrs(b: bytes):
    """Yield (type, value, offset) for each attribute; None-terminated on malformed length."""
    if len(b) < 20:
        return None
    mtype, alen, cookie, txid = _HDR.unpack_from(b)
    if cookie != COOKIE or b[0] & 0xC0 or 20 + alen > len(b) or alen % 4:
        return None
    out = []
    off, end = 20, 20 + alen
    while off + 4 <= end:
        t, n = _ATTR.unpack_from(b, off)
        if off + 4 + n > end:
            return None
        out.append((t, bytes(b[off + 4:off + 4 + n]), off))
        off += 4 + ((n + 3) & ~3)
    return mtype, txid, out


def parse_request(b: bytes) -> bytes | None:
    """Tailscale-style binding request -> txid, else None (Go requires SOFTWARE and FINGERPRINT)."""
    r = _attrs(b)
    if r is None or r[0] != BINDING_REQUEST:
        return None
    _, txid, attrs = r
    if not attrs or attrs[-1][0] != ATTR_FINGERPRINT or len(attrs[-1][1]) != 4:
        return None
    if struct.unpack(">I", attrs[-1][1])[0] != _fingerprint(b[:attrs[-1][2]]):
        return None
    return txid


def parse_request_lenient(b: bytes) -> bytes | None:
    """Any well-formed binding request -> txid (for a test server that also answers RFC vectors)."""
    r = _attrs(b)
    if r is None or r[0] != BINDING_REQUEST:
        return None
    return r[1]


def build_response(txid: bytes, ip: str, port: int) -> bytes:
    a = ipaddress.ip_address(ip)
    xport = port ^ 0x2112
    if a.version == 4:
        x = bytes(i ^ j for i, j in zip(a.packed, COOKIE))
        val = struct.pack(">BBH", 0, 1, xport) + x
    else:
        x = bytes(i ^ j for i, j in zip(a.packed, COOKIE + txid))
        val = struct.pack(">BBH", 0, 2, xport) + x
    return _HDR.pack(BINDING_SUCCESS, 4 + len(val), COOKIE, txid) + _ATTR.pack(ATTR_XOR_MAPPED_ADDRESS, len(val)) + val


def _decode_addr(val: bytes, txid: bytes, xor: bool):
    if len(val) < 8:
        return None
    fam = val[1]
    port = struct.unpack_from(">H", val, 2)[0]
    if fam == 1:
        raw, mask = val[4:8], COOKIE
    elif fam == 2 and len(val) >= 20:
        raw, mask = val[4:20], COOKIE + txid
    else:
        return None
    if xor:
        port ^= 0x2112
        raw = bytes(i ^ j for i, j in zip(raw, mask))
    return str(ipaddress.ip_address(raw)), port


def parse_response(b: bytes):
    """Binding success -> (txid, (ip, port)), else None."""
    r = _attrs(b)
    if r is None or r[0] != BINDING_SUCCESS:
        return None
    _, txid, attrs = r
    fallback = None
    for t, val, _ in attrs:
        if t in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            a = _decode_addr(val, txid, True)
            if a is not None:
                return txid, a
        elif t == ATTR_MAPPED_ADDRESS and fallback is None:
            fallback = _decode_addr(val, txid, False)
    return (txid, fallback) if fallback is not None else None
