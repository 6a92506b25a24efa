"""Proxy credentials: compared with hmac.compare_digest over user AND password (no early exit on
a wrong user, so timing does not tell which half was wrong), every wrong combination rejected."""

import base64
import hmac

import pytest

from tsproxy.proxy.auth import ProxyAuth


def test_both_halves_compared_with_compare_digest_even_when_user_is_wrong(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((bytes(a), bytes(b)))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", counting)
    auth = ProxyAuth("alice", "s3cret")
    assert auth.check(b"mallory", b"s3cret") is False
    assert calls == [(b"mallory", b"alice"), (b"s3cret", b"s3cret")]     # no early exit on the user
    calls.clear()
    assert auth.check(b"alice", b"s3cret") is True
    assert len(calls) == 2
    calls.clear()
    assert auth.check_basic("Basic " + base64.b64encode(b"bob:nope").decode()) is False
    assert len(calls) == 2


@pytest.mark.parametrize("user,password", [
    (b"alice", b"wrong"), (b"bob", b"s3cret"), (b"bob", b"wrong"), (b"", b""), (b"alice", b""),
    (b"", b"s3cret"), (b"alic", b"s3cret"), (b"alice", b"s3cret\x00"), (b"ALICE", b"s3cret"),
])
def test_every_wrong_combination_rejected(user, password):
    auth = ProxyAuth("alice", "s3cret")
    assert auth.check(user, password) is False
    assert auth.check_basic("Basic " + base64.b64encode(user + b":" + password).decode()) is False
    assert auth.check(b"alice", b"s3cret") is True


def test_basic_header_forms():
    auth = ProxyAuth("alice", "pa:ss")
    good = base64.b64encode(b"alice:pa:ss").decode()
    assert auth.check_basic(f"Basic {good}") and auth.check_basic(f"basic  {good} ")
    for bad in (None, "", "Bearer " + good, "Basic !!!", "Basic " + base64.b64encode(b"alice").decode()):
        assert auth.check_basic(bad) is False
    assert "pa:ss" not in repr(auth)
