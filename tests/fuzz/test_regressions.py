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
