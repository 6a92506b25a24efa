"""Chunked bodies from clients and upstreams (proxy/aio/http_server.py's _Body and _dechunk):
random and mutated chunked streams end in a copy or RemoteProtocolError, never another
exception or a hang; what is copied is a prefix of what came in (framing untouched)."""

import asyncio

from hypothesis import given, settings, strategies as st

from tests.fuzz.test_hypothesis import _mutation, mutate
from tsproxy.errors import RemoteProtocolError
from tsproxy.proxy.aio import http_server as hs


class Sink:
    def __init__(self):
        self.out = bytearray()

    def write(self, b):
        self.out += b

    async def drain(self):
        pass


async def _run(data: bytes, dechunk: bool):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    body, sink = hs._Body(reader, bytearray()), Sink()
    try:
        async with asyncio.timeout(10):        # a hang fails the test instead of blocking CI
            await (hs._dechunk(body, sink) if dechunk else body.copy_chunked(sink))
    except RemoteProtocolError:
        pass
    return sink.out


VALID = b"5\r\nhello\r\n1;ext=1\r\n!\r\n10\r\n" + bytes(16) + b"\r\n0\r\nTrailer: x\r\n\r\n"


@settings(max_examples=80, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), st.lists(_mutation, min_size=1, max_size=5)
                      .map(lambda ops: mutate(VALID, ops))), dechunk=st.booleans())
def test_chunked_bodies(data, dechunk):
    out = asyncio.run(_run(data, dechunk))
    if not dechunk:
        assert data.startswith(bytes(out))


def test_valid_chunked_body_round_trips():
    assert asyncio.run(_run(VALID, False)) == VALID
    assert asyncio.run(_run(VALID, True)) == b"hello!" + bytes(16)
