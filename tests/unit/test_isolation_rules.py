"""Isolation rules without a network: which listeners and forwards may face beyond loopback, and
the permissions of the state dir and key files (tightened when ours, refused when not)."""

import logging
import os
import stat

import pytest

from tsproxy.daemon import options, runtime, state, statedir
from tsproxy.errors import ConfigError


def prepare(tmp_path, **kw):
    return runtime.prepare(options.UpOptions(state_dir=str(tmp_path / "st"), **kw))


def test_loopback_by_default(tmp_path):
    plan = prepare(tmp_path, forward=["8022:peer:22"])
    assert [(h, p) for _, h, p in plan.listeners] == [("127.0.0.1", 1055)]
    assert plan.forwards[0].listen_host == "127.0.0.1"


@pytest.mark.parametrize("kw", [
    {"listen": "0.0.0.0:1055"},
    {"listen": None, "socks5": ["[::]:1080"]},
    {"listen": None, "forward": ["0.0.0.0:8022:peer:22"]},
    {"listen": None, "forward": ["udp:192.0.2.1:5353:peer:53"]},
])
def test_public_without_auth_refused_unless_allowed(tmp_path, kw):
    with pytest.raises(ConfigError, match="--allow-public-without-auth"):
        prepare(tmp_path, **kw)
    prepare(tmp_path, allow_public_without_auth=True, **kw)


def test_proxy_auth_covers_proxy_listeners_but_not_forwards(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    auth = {"proxy_user": "u", "proxy_password_file": str(pw)}
    prepare(tmp_path, listen="0.0.0.0:1055", **auth)
    with pytest.raises(ConfigError, match="forwards have no authentication") as e:
        prepare(tmp_path, listen="0.0.0.0:1055", forward=["0.0.0.0:8022:peer:22"], **auth)
    assert "hunter2" not in str(e.value)


def test_loose_state_dir_we_own_is_tightened_with_a_warning(tmp_path, caplog):
    d = tmp_path / "st"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with caplog.at_level(logging.WARNING, logger="tsproxy.daemon.statedir"):
        statedir.ensure_state_dir(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert any("state dir" in r.message and "755" in r.message and "tightened" in r.message
               for r in caplog.records)


def test_loose_key_file_we_own_is_tightened_with_a_warning(tmp_path, caplog):
    store = state.StateStore(str(tmp_path))
    ident = store.load()
    path = os.path.join(tmp_path, state.STATE_FILE)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="tsproxy.daemon.statedir"):
        again = state.StateStore(str(tmp_path)).load()
    assert again.machine_key.raw == ident.machine_key.raw
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert any("key file" in r.message and "644" in r.message for r in caplog.records)
    assert ident.machine_key.raw.hex() not in caplog.text


def _need_root():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true runs as root: chown to another user needs it")
        pytest.skip("needs root to chown a file to another user")


def test_state_dir_owned_by_another_user_is_refused(tmp_path):
    _need_root()
    d = tmp_path / "st"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534, not by us"):
        statedir.ensure_state_dir(str(d))


def test_key_file_owned_by_another_user_is_refused(tmp_path):
    _need_root()
    state.StateStore(str(tmp_path)).load()
    path = os.path.join(tmp_path, state.STATE_FILE)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="key file is owned by uid 65534"):
        state.StateStore(str(tmp_path)).load()
