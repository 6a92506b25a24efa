"""Sans-IO login decisions (LoginFlow): which keys are sent, followups, expiry, rejection."""

from __future__ import annotations

import pytest

from tsproxy.control.client import AuthKeyRejected, LoginFlow
from tsproxy.control.messages import RegisterResponse
from tsproxy.daemon.state import StateStore
from tsproxy.errors import RemoteProtocolError
from tsproxy.keys import NodePrivate

pytestmark = pytest.mark.timeout(30)


def resp(**kw):
    base = dict(machine_authorized=True, node_key_expired=False, auth_url="", error="",
                login_name="", user_id=0, node_key_signature="")
    base.update(kw)
    return RegisterResponse(**base)


def ident():
    return StateStore(None).load()


def test_first_login_generates_key_with_auth():
    i = ident()
    f = LoginFlow(i, auth_key="tskey-x")
    a = f.next_attempt()
    assert a.old_node_key is None and a.send_auth and a.followup == ""
    f.on_response(resp(login_name="u@x", user_id=4))
    assert f.done and i.node_key == a.node_key and i.old_node_key is None
    assert (i.login_name, i.user_id) == ("u@x", 4)
    assert "privkey" not in repr(a)


def test_restart_reuses_stored_key():
    i = ident()
    i.node_key = NodePrivate.generate()
    f = LoginFlow(i, auth_key=None)
    a = f.next_attempt()
    assert a.node_key == i.node_key and not a.send_auth
    f.on_response(resp())
    assert f.done and i.node_key == a.node_key


def test_interactive_followup_same_key_then_commit():
    i = ident()
    f = LoginFlow(i, auth_key=None)
    a1 = f.next_attempt()
    f.on_response(resp(auth_url="https://c/register/1", machine_authorized=False))
    assert not f.done and f.auth_url_changed and i.node_key is None     # not committed yet
    a2 = f.next_attempt()
    assert a2.node_key == a1.node_key and a2.followup == "https://c/register/1"
    f.on_response(resp(auth_url="https://c/register/1"))
    assert not f.auth_url_changed
    f.on_response(resp())
    assert f.done and i.node_key == a1.node_key


def test_server_expired_key_regenerates_with_old_key():
    i = ident()
    old = NodePrivate.generate()
    i.node_key = old
    f = LoginFlow(i, auth_key="tskey-x")
    assert f.next_attempt().node_key == old
    f.on_response(resp(node_key_expired=True))
    a = f.next_attempt()
    assert a.node_key != old and a.old_node_key == old
    f.on_response(resp())
    assert i.node_key == a.node_key and i.old_node_key == old


def test_forced_regen_after_local_expiry():
    i = ident()
    old = NodePrivate.generate()
    i.node_key = old
    f = LoginFlow(i, auth_key=None, force_regen=True)
    a = f.next_attempt()
    assert a.node_key != old and a.old_node_key == old


def test_errors():
    with pytest.raises(AuthKeyRejected, match="rejected the auth key: bad key"):
        LoginFlow(ident(), auth_key="tskey-secret").on_response(resp(error="bad key"))
    with pytest.raises(RemoteProtocolError):
        LoginFlow(ident(), auth_key=None).on_response(resp(error="nope"))
    f = LoginFlow(ident(), auth_key=None)
    with pytest.raises(RemoteProtocolError, match="keeps expiring"):
        for _ in range(20):
            f.on_response(resp(node_key_expired=True))
