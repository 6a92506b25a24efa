"""The one environment every Go Tailscale peer gets (tsproxy/testing/peers.py): the network
safety settings are always there, whichever peer builds it, and a peer's log reads as ''
before it exists."""

import pytest

from tsproxy.testing.peers import go_tailscale_env, read_log
from tsproxy.testing.tailscaled import Tailscaled
from tsproxy.testing.tsgo import GoTailscaleNode

SAFETY = {"TS_NO_LOGS_NO_SUPPORT": "true", "TS_PANIC_IF_HIT_MAIN_CONTROL": "1",
          "TS_DISABLE_PORTMAPPER": "1"}


class _NS:
    name = "unused"


def _as_dict(env: list[str]) -> dict:
    return dict(x.split("=", 1) for x in env)


def test_both_go_peers_run_with_the_safety_settings(tmp_path):
    go = GoTailscaleNode(_NS(), control_url="http://127.0.0.1:9/", auth_key="k",
                         workdir=str(tmp_path), hostname="g", ca_file="/the/ca.pem")
    tsd = Tailscaled(_NS(), control_url="http://127.0.0.1:9/", auth_key="k", hostname="t")
    try:
        for env in (_as_dict(go.env()), _as_dict(tsd._env())):
            assert SAFETY.items() <= env.items()
            assert env["TS_LOGS_DIR"].startswith(("/tmp", str(tmp_path)))
        assert _as_dict(go.env())["SSL_CERT_FILE"] == "/the/ca.pem"
        assert "SSL_CERT_FILE" not in _as_dict(tsd._env())
    finally:
        tsd.stop()                                  # removes its temporary directory


def test_extra_settings_are_added_but_never_replace_the_safety_ones():
    env = _as_dict(go_tailscale_env("/h", "/l", None, path="/bin", FOO="1"))
    assert env == {"PATH": "/bin", "HOME": "/h", "TS_LOGS_DIR": "/l", "FOO": "1", **SAFETY}
    with pytest.raises(ValueError, match="TS_NO_LOGS_NO_SUPPORT"):
        go_tailscale_env("/h", "/l", None, TS_NO_LOGS_NO_SUPPORT="false")


def test_read_log_before_and_after_the_file_exists(tmp_path):
    p = tmp_path / "x.log"
    assert read_log(str(p)) == ""
    p.write_bytes(b"line\xff\n")
    assert read_log(str(p)) == "line\ufffd\n"
