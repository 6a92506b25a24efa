"""Persisted control identity: permissions, atomic writes, corrupt files, ephemeral mode."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tsproxy.daemon import state as st
from tsproxy.errors import ConfigError
from tsproxy.keys import NodePrivate

pytestmark = pytest.mark.timeout(30)


def test_new_identity_persisted_with_modes(tmp_path):
    d = tmp_path / "s"
    store = st.StateStore(str(d))
    ident = store.load()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    p = d / st.STATE_FILE
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    obj = json.loads(p.read_text())
    assert obj["machine_key"] == ident.machine_key.text() and obj["node_key"] is None
    assert not [x for x in os.listdir(d) if ".tmp" in x]
    # restart: same machine key, new disco key
    again = st.StateStore(str(d)).load()
    assert again.machine_key == ident.machine_key
    assert again.disco_key != ident.disco_key


def test_node_keys_roundtrip_and_clear(tmp_path):
    store = st.StateStore(str(tmp_path))
    ident = store.load()
    ident.node_key = NodePrivate.generate()
    ident.old_node_key = NodePrivate.generate()
    ident.node_id, ident.login_name, ident.user_id = "nSTABLE", "a@b", 7
    store.save(ident)
    back = st.StateStore(str(tmp_path)).load()
    assert (back.node_key, back.old_node_key, back.node_id, back.login_name, back.user_id) == \
        (ident.node_key, ident.old_node_key, "nSTABLE", "a@b", 7)
    store.clear_node(back)
    cleared = st.StateStore(str(tmp_path)).load()
    assert cleared.node_key is None and cleared.machine_key == ident.machine_key
    assert "privkey" not in repr(back)


def test_loose_dir_tightened(tmp_path):
    d = tmp_path / "loose"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    st.StateStore(str(d)).load()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"version":1}', b'{"version":2}',
                                     b'{"version":1,"machine_key":"privkey:zz"}',
                                     b'{"version":1,"machine_key":"nodekey:' + b"1" * 64 + b'"}',
                                     b"\xff\xfe", b"x" * (st.MAX_STATE_FILE + 10)])
def test_corrupt_file_is_error_naming_file(tmp_path, content):
    p = tmp_path / st.STATE_FILE
    p.write_bytes(content)
    with pytest.raises(ConfigError) as ei:
        st.StateStore(str(tmp_path)).load()
    assert str(p) in str(ei.value)
    assert p.read_bytes() == content            # never overwritten with a new identity


def test_unreadable_file_is_error(tmp_path):
    # a directory where the file should be: unreadable even for root
    (tmp_path / st.STATE_FILE).mkdir()
    with pytest.raises(ConfigError, match="cannot read state file") as ei:
        st.StateStore(str(tmp_path)).load()
    assert st.STATE_FILE in str(ei.value)


def test_atomic_replace_keeps_old_file_on_failure(tmp_path, monkeypatch):
    store = st.StateStore(str(tmp_path))
    ident = store.load()
    before = (tmp_path / st.STATE_FILE).read_bytes()
    ident.node_key = NodePrivate.generate()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(st.os, "replace", boom)
    with pytest.raises(ConfigError, match="No space left"):
        store.save(ident)
    assert (tmp_path / st.STATE_FILE).read_bytes() == before
    assert os.listdir(tmp_path) == [st.STATE_FILE]


def test_ephemeral_never_touches_disk(tmp_path):
    store = st.StateStore(str(tmp_path), ephemeral=True)
    ident = store.load()
    ident.node_key = NodePrivate.generate()
    store.save(ident)
    assert os.listdir(tmp_path) == []
    again = store.load()
    assert again.node_key == ident.node_key
