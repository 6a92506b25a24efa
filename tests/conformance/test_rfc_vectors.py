"""Our primitives against published test vectors and independent implementations.

Each expected value is copied from the RFC named beside it (or, for the WireGuard HMAC/HKDF
construction, computed by a second implementation: Python's `hmac` module and
cryptography's HKDF), never produced by the code under test.
"""

import hashlib
import hmac as std_hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tsproxy.netstack.wire import checksum as ck
from tsproxy.noise import primitives as P

hx = bytes.fromhex


# ---- RFC 1071: Internet checksum ------------------------------------------------------------

def test_rfc1071_section_3_example():
    """RFC 1071 3: bytes 00 01 f2 03 f4 f5 f6 f7 sum (ones' complement) to ddf2."""
    data = hx("0001f203f4f5f6f7")
    assert ck.ones_sum(data) == 0xDDF2
    assert ck.checksum(data) == 0x220D
    assert ck.reference_checksum(data) == 0x220D


def test_ipv4_header_checksum_and_verification():
    """A real IPv4 header (192.168.0.1 -> 192.168.0.199, UDP, total length 0x73) whose
    checksum field is b861; summing the header including it gives zero."""
    with_sum = hx("4500007300004000" "4011b861" "c0a80001" "c0a800c7")
    zeroed = with_sum[:10] + b"\0\0" + with_sum[12:]
    assert ck.checksum(zeroed) == 0xB861
    assert ck.checksum(with_sum) == 0
    # RFC 1071 2(B)/(C): the sum is independent of how it is split into even-sized pieces
    assert ck.finish(ck.combine(ck.ones_sum(zeroed[:4]), ck.ones_sum(zeroed[4:]))) == 0xB861


def test_odd_length_is_padded_with_a_zero_byte():
    """RFC 1071 4.1: an odd trailing byte is the high byte of a last word."""
    assert ck.checksum(b"\x01") == ck.checksum(b"\x01\x00") == 0xFEFF


# ---- RFC 8439: ChaCha20-Poly1305 AEAD ---------------------------------------------------

RFC8439_PT = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
              b"the future, sunscreen would be it.")
RFC8439_CT = hx(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116")
RFC8439_TAG = hx("1ae10b594f09e26a7e902ecbd0600691")


def test_rfc8439_2_8_2_aead_vector():
    key = bytes(range(0x80, 0xA0))
    nonce = hx("070000004041424344454647")
    aad = hx("50515253c0c1c2c3c4c5c6c7")
    box = P.aead(key)
    assert box.encrypt(nonce, RFC8439_PT, aad) == RFC8439_CT + RFC8439_TAG
    assert box.decrypt(nonce, RFC8439_CT + RFC8439_TAG, aad) == RFC8439_PT


def test_wireguard_nonce_layout():
    """WireGuard: 32 zero bits then the 64-bit counter little-endian; TS2021: big-endian."""
    assert P.NONCE_LE.pack(0x0102030405060708) == hx("000000000807060504030201")
    assert P.NONCE_BE.pack(0x0102030405060708) == hx("000000000102030405060708")


# ---- RFC 7693: BLAKE2s ------------------------------------------------------------------

def test_rfc7693_appendix_b_blake2s_abc():
    assert P.hash_(b"abc") == hx("508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
    assert P.hash_(b"a", b"b", b"c") == P.hash_(b"abc")          # parts are concatenated


def test_keyed_blake2s_128_is_the_wireguard_mac():
    key, data = bytes(range(32)), b"mac1 input"
    assert P.mac(key, data) == hashlib.blake2s(data, digest_size=16, key=key).digest()


# ---- RFC 2104 HMAC over BLAKE2s, RFC 5869 HKDF (WireGuard KDF1..3) -----------------------

@pytest.mark.parametrize("klen", [0, 1, 32, 63, 64, 65, 200])
def test_hmac_blake2s_matches_the_stdlib_hmac(klen):
    key, msg = bytes((i * 7 + 3) & 0xFF for i in range(klen)), b"Hi There" * 9
    assert P.hmac(key, msg) == std_hmac.new(key, msg, hashlib.blake2s).digest()
    assert P.hmac(key, msg[:5], msg[5:]) == std_hmac.new(key, msg, hashlib.blake2s).digest()


def test_kdf_is_hkdf_with_hmac_blake2s_and_empty_info():
    """WireGuard's KDFn(key, input) = the first n 32-byte blocks of HKDF(salt=key, ikm=input,
    info=empty) over HMAC-BLAKE2s (whitepaper 5.4, RFC 5869 2.2-2.3)."""
    key, data = bytes(range(32)), b"input keying material"

    def hkdf(n):
        out = HKDF(algorithm=hashes.BLAKE2s(32), length=32 * n, salt=key, info=b"").derive(data)
        return tuple(out[i:i + 32] for i in range(0, 32 * n, 32))
    assert (P.kdf1(key, data),) == hkdf(1)
    assert P.kdf2(key, data) == hkdf(2)
    assert P.kdf3(key, data) == hkdf(3)


# ---- RFC 7748: X25519 -------------------------------------------------------------------

def test_rfc7748_6_1_x25519_alice_and_bob():
    a = hx("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b = hx("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    a_pub = hx("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    b_pub = hx("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = hx("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert P.dh_public(a) == a_pub and P.dh_public(b) == b_pub
    assert P.dh(a, b_pub) == P.dh(b, a_pub) == shared


def test_rfc7748_6_1_all_zero_shared_secret_is_refused():
    """A low-order public key (here zero) gives the all-zero output, which must be rejected."""
    with pytest.raises(ValueError):
        P.dh(hx("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"), bytes(32))
