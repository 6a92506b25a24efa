"""Every crash the fuzzers found, as the input bytes that triggered it (fuzz/targets.py runs
them through the same entry points the harness uses) plus the clear error now expected."""

import pytest

from fuzz import targets
from tsproxy.control import messages, wire as control_wire
from tsproxy.daemon import ipc, options
from tsproxy.errors import ConfigError, RemoteProtocolError

DEEP_JSON = b"[" * 100_000          # json.loads raises RecursionError, not ValueError


@pytest.mark.parametrize("parse", [
    messages.parse_register_response,
    control_wire.parse_key_response,
    control_wire.parse_early_json,
    lambda b: messages.MapStreamDecoder(compressed=False).feed(len(b).to_bytes(4, "little") + b),
    lambda b: messages.MapStreamDecoder().feed(_zstd_frame(b)),
], ids=["register", "key", "early", "map-plain", "map-zstd"])
def test_deeply_nested_json_from_control_is_a_protocol_error(parse):
    with pytest.raises(RemoteProtocolError, match="not JSON"):
        parse(DEEP_JSON[:60_000])


def _zstd_frame(raw: bytes) -> bytes:
    import zstandard
    comp = zstandard.ZstdCompressor().compress(raw)
    return len(comp).to_bytes(4, "little") + comp


def test_deeply_nested_ipc_request_is_a_bad_request():
    with pytest.raises(ValueError, match="nested too deeply"):
        ipc.parse_request(DEEP_JSON[:60_000] + b"\n")
    targets.target_ipc(DEEP_JSON[:60_000])


@pytest.mark.parametrize("data, reason", [
    (b"8X\x91+\xa27\xc1\xd3", "not UTF-8"),                         # found by the smoke run
    (b"a = " + b"[" * 5000, "nested too deeply"),
])
def test_bad_toml_config_is_a_config_error(tmp_path, data, reason):
    p = tmp_path / "config.toml"
    p.write_bytes(data)
    with pytest.raises(ConfigError, match=reason) as e:
        options._load_toml(str(p), True)
    assert str(p) in str(e.value)
    targets.target_toml(data)


# atheris, target http, within 3 s: the authority "G\0\0\0\0\0\0\0:\xb9" decodes (latin-1) to
# a port "¹", which str.isdigit() accepts and int() refuses: ValueError out of split_authority
# (reached from a CONNECT target or an absolute URI).
HTTP_SUPERSCRIPT_PORT = b"G\x00\x00\x00\x00\x00\x00\x00:\xb9"


def test_superscript_digit_port_in_http_authority_is_a_protocol_error():
    from tsproxy.proxy import http
    for authority in ("h:0\xb2", "[::1]:1\xb9", "h:\u0661"):
        with pytest.raises(RemoteProtocolError, match="bad port"):
            http.split_authority(authority)
    with pytest.raises(RemoteProtocolError, match="bad port"):
        http.split_absolute("http://h:8\xb2/")
    targets.target_http(HTTP_SUPERSCRIPT_PORT)
    targets.target_http(b"CONNECT h:0\xb2 HTTP/1.1\r\n\r\n")


@pytest.mark.parametrize("text", ["127.0.0.1:1\xb2", "\xb2", "[::1]:\xb3"])
def test_superscript_digit_in_listen_address_is_a_config_error(text):
    with pytest.raises(ConfigError, match="listen address"):
        options.parse_listen_addr(text)


def test_superscript_digit_in_port_option_and_specs_is_a_config_error():
    from tsproxy.proxy import specs
    with pytest.raises(ConfigError, match="--port"):
        options.validate(options.UpOptions(port="\xb2"))
    with pytest.raises(ConfigError, match="port"):
        specs.parse_forward("127.0.0.1:22\xb2=peer:22")
    targets.target_specs("8\xb2=h:1".encode())


# atheris, target derp, in the CI-length run: a ServerKey frame carrying a low-order key
# (all zeros) made libsodium's crypto_box_beforenm fail; nacl's RuntimeError escaped
# DerpClient.receive_data instead of a RemoteProtocolError.
DERP_ZERO_SERVER_KEY = bytes.fromhex("010000002844455250f09f9491" + "00" * 32)


def test_low_order_derp_server_key_is_a_protocol_error():
    from tsproxy.derp.client import DerpClient
    from tsproxy.keys import NodePrivate
    c = DerpClient(NodePrivate.generate(), now=0.0)
    with pytest.raises(RemoteProtocolError, match="ServerKey"):
        c.receive_data(DERP_ZERO_SERVER_KEY, 0.0)
    with pytest.raises(RemoteProtocolError):          # the client stays failed
        c.receive_data(b"", 0.0)
    targets.target_derp(b"\x00" + DERP_ZERO_SERVER_KEY)


# Hypothesis, chunked bodies: int(size, 16) accepts "0x10", "1_0" and "+5".  copy_chunked
# forwards the size line untouched, so a server that reads "0x10" as 0 would take the next
# 16 bytes as a new request (request smuggling); the proxy now refuses such sizes.
def test_lenient_chunk_sizes_are_refused():
    import asyncio
    from tests.fuzz.test_http_bodies import _run
    for size in (b"0x10", b"1_0", b"+10", b" ", b"-0", b"1" * 17):
        body = size + b"\r\n" + bytes(16) + b"\r\n0\r\n\r\n"
        for dechunk in (False, True):
            assert asyncio.run(_run(body, dechunk)) == b""
    assert asyncio.run(_run(b"10\r\n" + bytes(16) + b"\r\n0\r\n\r\n", True)) == bytes(16)
