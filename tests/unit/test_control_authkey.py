"""Auth-key lifecycle (issue 16 item 3), Retry-After and PingRequest/c2n decisions, sans-IO."""

from __future__ import annotations

import base64
from email.utils import format_datetime
from datetime import datetime, timezone

import pytest

from tsproxy.control.client import (AuthKeyRejected, LoginFlow, is_auth_key_error,
                                    retry_after_seconds)
from tsproxy.control.messages import RegisterResponse
from tsproxy.control.ping import c2n_response, parse_ping_request
from tsproxy.daemon.state import StateStore
from tsproxy.errors import RemoteProtocolError
from tsproxy.keys import NodePrivate

pytestmark = pytest.mark.timeout(30)


def resp(**kw):
    base = dict(machine_authorized=True, node_key_expired=False, auth_url="", error="",
                login_name="", user_id=0, node_key_signature="")
    base.update(kw)
    return RegisterResponse(**base)


def registered():
    i = StateStore(None).load()
    i.node_key = NodePrivate.generate()
    return i


def test_auth_key_sent_only_without_an_identity():
    assert LoginFlow(StateStore(None).load(), auth_key="tskey-x").next_attempt().send_auth
    i = registered()
    f = LoginFlow(i, auth_key="tskey-x")
    a = f.next_attempt()
    assert a.node_key == i.node_key and not a.send_auth       # reconnect / restart
    f.on_response(resp())
    assert f.done


def test_key_regen_after_expiry_never_sends_the_key_and_waits_for_login():
    i = registered()
    old = i.node_key
    f = LoginFlow(i, auth_key="tskey-reusable", force_regen=True)
    a = f.next_attempt()
    assert a.old_node_key == old and not a.send_auth
    f.on_response(resp(auth_url="http://c/register/1", machine_authorized=False))
    assert f.auth_url == "http://c/register/1" and not f.done
    b = f.next_attempt()
    assert b.followup == "http://c/register/1" and not b.send_auth
    assert i.node_key == old                                   # nothing committed


def test_stored_identity_unknown_to_the_server_presents_the_key_once():
    i = registered()
    f = LoginFlow(i, auth_key="tskey-x")
    f.on_response(resp(auth_url="http://c/register/1", machine_authorized=False))
    a = f.next_attempt()
    assert a.send_auth and a.followup == "" and a.node_key == i.node_key
    with pytest.raises(AuthKeyRejected):
        f.on_response(resp(error="authkey already used"))


def test_only_auth_errors_reject_the_key():
    for text in ("invalid authkey", "authkey expired", "AuthKey already used", "bad key",
                 "invalid key: API key does not exist", "unauthorized"):
        assert is_auth_key_error(text), text
    for text in ("node key already in use", "nodekey mismatch", "internal server error",
                 "machine key belongs to another node", "database is locked",
                 "authentication backend unavailable"):
        assert not is_auth_key_error(text), text
    f = LoginFlow(StateStore(None).load(), auth_key="tskey-x")
    with pytest.raises(RemoteProtocolError) as e:
        f.on_response(resp(error="node key already in use"))
    assert not isinstance(e.value, AuthKeyRejected)
    with pytest.raises(AuthKeyRejected):
        LoginFlow(StateStore(None).load(), auth_key="tskey-x").on_response(
            resp(error="invalid authkey"))


def test_retry_after():
    now = 1_760_000_000.0
    assert retry_after_seconds("7", now, 0.5) == 7.0
    date = format_datetime(datetime.fromtimestamp(now + 30, timezone.utc), usegmt=True)
    assert retry_after_seconds(date, now, 0.5) == pytest.approx(30.0)
    for bad in (None, "", "soon", "0", "-3", "99999"):
        assert retry_after_seconds(bad, now, 0.0) == 5.0
        assert retry_after_seconds(bad, now, 1.0) == 10.0


def test_ping_request_parse_and_c2n_echo():
    assert parse_ping_request(None) is None
    assert parse_ping_request({"URL": "file:///etc/passwd"}) is None
    pr = parse_ping_request({"URL": "http://c/p/1", "Log": True})
    assert pr.kind == "head" and not pr.url_is_noise
    assert parse_ping_request({"URL": "http://c/p", "Types": "disco,TSMP"}).kind == "unsupported"
    req = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    pr = parse_ping_request({"URL": "https://c/p/2", "Types": "c2n",
                             "Payload": base64.b64encode(req).decode()})
    assert pr.kind == "c2n" and pr.payload == req
    out = c2n_response(pr.payload)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nhello")
    assert b"Content-Length: 5\r\n" in out
    assert c2n_response(b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert c2n_response(b"garbage").startswith(b"HTTP/1.1 400 ")
    assert c2n_response(b"POST /echo HTTP/1.1\r\nContent-Length: 99\r\n\r\nx").startswith(
        b"HTTP/1.1 400 ")
