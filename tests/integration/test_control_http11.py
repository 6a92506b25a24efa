"""The test control server's plain HTTP/1.1 front door, by RFC 9112, over raw loopback sockets:
Connection: close then EOF, HTTP/1.0, pipelining, Content-Length and chunked bodies, bad
framing answered 400 and closed, and Hypothesis over request framing (split points, garbage)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsproxy.testing.control import TestControlServer

pytestmark = [pytest.mark.timeout(120)]

READ_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def srv():
    loop = asyncio.new_event_loop()
    server = TestControlServer("127.0.0.1", derp_map={"Regions": {}})
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(30)
    yield server
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    t.join(30)
    loop.close()


def _addr(server):
    host, port = server.url.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def exchange(server, chunks: list[bytes], *, half_close: bool = False) -> bytes:
    """Send `chunks` as separate writes, then read everything until the server's EOF."""
    s = socket.create_connection(_addr(server), timeout=READ_TIMEOUT)
    try:
        for c in chunks:
            s.sendall(c)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while data := s.recv(65536):        # socket.timeout here is a hang: the test fails
            out += data
        return out
    finally:
        s.close()


def parse_responses(data: bytes, methods: list[str]) -> list[tuple[str, dict, bytes]]:
    """Split a byte stream into responses (status line, headers, body) by their framing."""
    out = []
    for method in methods:
        i = data.index(b"\r\n\r\n")
        lines = data[:i].decode("latin-1").split("\r\n")
        data = data[i + 4:]
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
        body, data = data[:n], data[n:]
        assert len(body) == n
        out.append((lines[0], headers, body))
    assert data == b"", data
    return out


def req(method="GET", path="/key?v=130", *, version="1.1", headers=(), body=b"") -> bytes:
    h = "".join(f"{k}: {v}\r\n" for k, v in headers)
    host = "Host: 127.0.0.1\r\n" if version == "1.1" else ""
    return f"{method} {path} HTTP/{version}\r\n{host}{h}\r\n".encode() + body


def key_body(server) -> bytes:
    from tsproxy.control import wire
    return wire.build_key_response(server.key.public().raw)


def test_connection_close_gets_whole_key_and_eof(srv):
    data = exchange(srv, [req(headers=[("Connection", "close")])])
    [(status, headers, body)] = parse_responses(data, ["GET"])
    assert status == "HTTP/1.1 200 OK"
    assert headers["connection"] == "close"
    assert body == key_body(srv)
    assert json.loads(body)["publicKey"].startswith("mkey:")


def test_http10_closes_after_response_unless_keep_alive(srv):
    data = exchange(srv, [req(version="1.0")])
    [(status, headers, body)] = parse_responses(data, ["GET"])
    assert status.startswith("HTTP/1.1 200")          # RFC 9110 2.5: our highest 1.x version
    assert body == key_body(srv)
    # keep-alive asked: the connection stays open for a second request
    data = exchange(srv, [req(version="1.0", headers=[("Connection", "keep-alive")]),
                          req(version="1.0", path="/generate_204")])
    r = parse_responses(data, ["GET", "GET"])
    assert r[0][1]["connection"] == "keep-alive" and r[0][2] == key_body(srv)
    assert r[1][0] == "HTTP/1.1 204 No Content" and "content-length" not in r[1][1]


@pytest.mark.parametrize("n", [2, 3])
def test_pipelined_requests_in_one_write_answered_in_order(srv, n):
    paths = ["/key?v=130", "/generate_204", "/nope"][-n:]
    methods = ["GET", "HEAD", "GET"][-n:]
    stream = b"".join(req(m, p) for m, p in zip(methods[:-1], paths[:-1])) + \
        req(methods[-1], paths[-1], headers=[("Connection", "close")])
    r = parse_responses(exchange(srv, [stream]), methods)
    assert [x[0] for x in r] == ["HTTP/1.1 200 OK", "HTTP/1.1 204 No Content",
                                 "HTTP/1.1 404 Not Found"][-n:]
    if n == 3:
        assert r[0][2] == key_body(srv)


def test_pipelined_head_has_length_but_no_body(srv):
    stream = req() + req(method="HEAD", path="/key?v=130", headers=[("Connection", "close")])
    r = parse_responses(exchange(srv, [stream]), ["GET", "HEAD"])
    assert r[0][2] == key_body(srv)
    assert r[1][0] == "HTTP/1.1 200 OK" and r[1][1]["content-length"] == str(len(key_body(srv)))
    assert r[1][2] == b""


def test_request_bodies_content_length_chunked_and_none(srv):
    srv.pings["cl"] = srv.pings["ch"] = srv.pings["none"] = None
    stream = (req("POST", "/ping/cl", headers=[("Content-Length", "5")], body=b"hello")
              + req("POST", "/ping/ch", headers=[("Transfer-Encoding", "chunked")],
                    body=b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n")
              + req("POST", "/ping/none", headers=[("Connection", "close")]))
    r = parse_responses(exchange(srv, [stream]), ["POST"] * 3)
    assert [x[0] for x in r] == ["HTTP/1.1 200 OK"] * 3
    assert srv.pings["cl"]["body"] == b"hello"
    assert srv.pings["ch"]["body"] == b"abcdefg"
    assert srv.pings["none"]["body"] == b""


def test_expect_100_continue(srv):
    srv.pings["x"] = None
    s = socket.create_connection(_addr(srv), timeout=READ_TIMEOUT)
    with s:
        s.sendall(req("POST", "/ping/x", headers=[("Content-Length", "2"),
                                                   ("Expect", "100-continue"),
                                                   ("Connection", "close")]))
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += s.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hi")
        out = b""
        while data := s.recv(65536):
            out += data
    assert out.startswith(b"HTTP/1.1 200 OK")
    assert srv.pings["x"]["body"] == b"hi"


@pytest.mark.parametrize("bad, status", [
    (req(headers=[("Content-Length", "3"), ("Content-Length", "4")], body=b"abcd"), "400"),
    (req(headers=[("Content-Length", "3, 4")], body=b"abcd"), "400"),
    (req(headers=[("Content-Length", "-1")]), "400"),
    (req(headers=[("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
         body=b"0\r\n\r\n"), "400"),
    (req(headers=[("Transfer-Encoding", "gzip, chunked")]), "501"),
    (req(headers=[("Transfer-Encoding", "chunked")], body=b"zz\r\n"), "400"),
    (req(headers=[("X", "a" * (20 << 10))]), "431"),
    (b"GET /key HTTP/1.1\r\n\r\n", "400"),                       # no Host
    (b"GET /key HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "400"),  # obs-fold
    (b"GET /key HTTP/1.1\r\nHost : a\r\n\r\n", "400"),
    (b"GET /key HTTP/2.0\r\nHost: a\r\n\r\n", "505"),
    (b"GET  /key HTTP/1.1\r\nHost: a\r\n\r\n", "400"),
    (b"\x16\x03\x01garbage\r\n\r\n", "400"),
])
def test_bad_framing_answered_and_closed(srv, bad, status):
    # a valid request after the bad one must not be answered: the connection is closed
    r = exchange(srv, [bad + req(path="/generate_204")])
    assert r.startswith(f"HTTP/1.1 {status} ".encode()), r[:80]
    [(_, headers, _)] = parse_responses(r, ["GET"])
    assert headers["connection"] == "close"


def test_upgrade_path_still_serves_clients(srv):
    from tsproxy.control.aio import fetch_server_key
    from tsproxy.control.aio import ControlURL

    async def go():
        return await fetch_server_key(ControlURL(srv.url))

    assert asyncio.run(go()).raw == srv.key.public().raw


def test_httpx_keeps_one_connection_for_several_requests(srv):
    import httpx
    with httpx.Client(base_url=srv.url, trust_env=False) as c:
        seen = set()
        for _ in range(3):
            r = c.get("/key?v=130", extensions={"trace": lambda name, info: seen.add(
                id(info.get("return_value"))) if name == "connection.connect_tcp.complete"
                else None})
            assert r.status_code == 200 and r.content == key_body(srv)
        assert len(seen) == 1                     # one TCP connection served all three
        assert c.post("/ping/nope", content=b"x" * 3000).status_code == 200


# -- Hypothesis ----------------------------------------------------------------------------------

PIPELINE = [req(), req("POST", "/ping/h1", headers=[("Content-Length", "3")], body=b"abc"),
            req("POST", "/ping/h2", headers=[("Transfer-Encoding", "chunked")],
                body=b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"),
            req("HEAD", "/generate_204"), req(path="/nope", headers=[("Connection", "close")])]
METHODS = ["GET", "POST", "POST", "HEAD", "GET"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(b"".join(PIPELINE))), max_size=8))
def test_split_points_do_not_change_responses(srv, cuts):
    stream = b"".join(PIPELINE)
    points = sorted(set(cuts))
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)]) if a < b]
    r = parse_responses(exchange(srv, chunks), METHODS)
    assert [x[0] for x in r] == ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.1 200 OK",
                                 "HTTP/1.1 204 No Content", "HTTP/1.1 404 Not Found"]
    assert r[0][2] == key_body(srv)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=300),
       tail=st.sampled_from([b"", b"\r\n\r\n", b"\r\nHost: a\r\n\r\n"]))
def test_garbage_heads_get_an_answer_or_a_clean_close(srv, garbage, tail):
    data = exchange(srv, [garbage + tail], half_close=True)   # EOF must come: no hang
    if data:
        assert data.startswith(b"HTTP/1.1 "), data[:80]
        assert data[9:12].isdigit()


def test_tls_front_door_connection_close_reads_to_eof():
    """The HTTPS listener feeds the same handler: Connection: close ends the TLS stream too."""
    from tsproxy.testing.tlsca import TestCA

    ca = TestCA()

    async def go():
        server = TestControlServer("127.0.0.1", derp_map={"Regions": {}}, tls=ca)
        await server.start()
        try:
            host, port = _addr(server)
            r, w = await asyncio.open_connection(host, port, ssl=ca.client_context(),
                                                 server_hostname=host)
            w.write(req() + req(headers=[("Connection", "close")]))
            async with asyncio.timeout(READ_TIMEOUT):
                data = await r.read()          # to EOF
                while more := await r.read():
                    data += more
            w.close()
            return server, data
        finally:
            await server.stop()

    server, data = asyncio.run(go())
    r = parse_responses(data, ["GET", "GET"])
    assert [x[2] for x in r] == [key_body(server)] * 2
    assert r[1][1]["connection"] == "close"
