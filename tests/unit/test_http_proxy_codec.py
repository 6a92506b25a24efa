"""HTTP proxy heads: whole, byte by byte, trailing bytes, limits, hop-by-hop, fuzzing."""

import pytest
from hypothesis import given, settings, strategies as st

from tsproxy.errors import RemoteProtocolError
from tsproxy.proxy import http
from tsproxy.proxy.auth import ProxyAuth

REQ = (b"POST http://peer.tunnel.test:8080/up?x=1 HTTP/1.1\r\nHost: peer.tunnel.test:8080\r\n"
       b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nProxy-Authorization: Basic abc\r\n"
       b"Content-Length: 5\r\nTE: trailers\r\nX-Keep: yes\r\n\r\n")


def test_request_whole_bytewise_trailing():
    head, used = http.parse_request_head(REQ)
    assert used == len(REQ)
    assert head.method == "POST" and head.target == "http://peer.tunnel.test:8080/up?x=1"
    assert http.content_length(head) == 5 and not http.is_chunked(head)
    for i in range(len(REQ)):
        assert http.parse_request_head(REQ[:i]) is None
    head2, used2 = http.parse_request_head(REQ + b"hello")
    assert used2 == len(REQ) and head2.headers == head.headers


def test_hop_by_hop_removed():
    head, _ = http.parse_request_head(REQ)
    kept = http.end_to_end(head)
    assert kept == [(b"Host", b"peer.tunnel.test:8080"), (b"Content-Length", b"5"), (b"X-Keep", b"yes")]


def test_limits_and_malformed():
    with pytest.raises(http.HeaderTooLarge):
        http.parse_request_head(b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * 40000)
    with pytest.raises(http.HeaderTooLarge):
        http.parse_request_head(b"GET http://a/ HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n")
    for bad in (b"GET http://a/\r\n\r\n", b"GET  http://a/ HTTP/1.1\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n",
                b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", b"G(T / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\n: v\r\n\r\n"):
        with pytest.raises(RemoteProtocolError):
            http.parse_request_head(bad)
    h, _ = http.parse_request_head(b"GET http://a/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        http.content_length(h)
    h, _ = http.parse_request_head(b"GET http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        http.is_chunked(h)


def test_response_head():
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello"
    head, used = http.parse_response_head(data)
    assert head.status == 200 and head.reason == b"OK" and http.is_chunked(head)
    assert data[used:] == b"5\r\nhello"
    assert http.parse_response_head(b"HTTP/1.1 204\r\n\r\n")[0].status == 204
    with pytest.raises(RemoteProtocolError):
        http.parse_response_head(b"HTTP/1.1 2x0 OK\r\n\r\n")


@pytest.mark.parametrize("target,expect", [
    ("http://peer/", ("peer", 80, "/")),
    ("http://peer:8080", ("peer", 8080, "/")),
    ("http://[fd7a:115c:a1e0::2]:81/a?b", ("fd7a:115c:a1e0::2", 81, "/a?b")),
    ("HTTP://100.64.0.2?q", ("100.64.0.2", 80, "/?q")),
])
def test_split_absolute(target, expect):
    assert http.split_absolute(target) == expect


@pytest.mark.parametrize("target", ["/relative", "https://a/", "http://u:p@a/", "http://a:0/", "http://a:99999/",
                                    "http://[::1/", "http://:80/"])
def test_split_absolute_rejects(target):
    with pytest.raises(RemoteProtocolError):
        http.split_absolute(target)


def test_split_authority_for_connect():
    assert http.split_authority("peer.tunnel.test:443") == ("peer.tunnel.test", 443)
    assert http.split_authority("[fd7a::2]:22") == ("fd7a::2", 22)
    with pytest.raises(RemoteProtocolError):
        http.split_authority("peer")


def test_auth_basic_and_redaction():
    a = ProxyAuth("alice", "s3cret")
    assert a.check(b"alice", b"s3cret") and not a.check(b"alice", b"s3cre") and not a.check(b"bob", b"s3cret")
    assert a.check_basic("Basic YWxpY2U6czNjcmV0")
    assert a.check_basic("basic  YWxpY2U6czNjcmV0 ")
    for bad in (None, "", "Bearer x", "Basic !!!", "Basic YWxpY2U=", "Basic YWxpY2U6d3Jvbmc="):
        assert not a.check_basic(bad)
    assert "s3cret" not in repr(a)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_heads_never_crash(data):
    for parse in (http.parse_request_head, http.parse_response_head):
        try:
            r = parse(data, 256)
        except RemoteProtocolError:
            continue
        if r is not None:
            head, used = r
            assert used <= len(data)
            try:
                http.content_length(head)
                http.is_chunked(head)
                http.end_to_end(head)
            except RemoteProtocolError:
                pass
