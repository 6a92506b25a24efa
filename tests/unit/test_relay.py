"""The byte relay's copy loop (proxy/aio/relay.py): bytes arrive whole and in order, a small
read from a tunnel stream is coalesced with what the next loop pass brings, and a message
shorter than a couple of segments is passed on at once."""

import asyncio

from tsproxy.proxy.aio.relay import STREAMING, relay


class TunnelSource:
    """Reads like a netstack TcpStream: what has arrived, plus read_nowait for more."""

    def __init__(self, chunks, later):
        self.chunks = list(chunks)
        self.later = list(later)              # arrives during the next loop pass
        self.nowait_calls = 0

    async def read(self, n):
        await asyncio.sleep(0)
        return self.chunks.pop(0) if self.chunks else b""

    def read_nowait(self, n):
        self.nowait_calls += 1
        return self.later.pop(0) if self.later else b""


class Sink:
    def __init__(self):
        self.writes = []
        self.eof = False
        self.closed = False

    def write(self, data):
        self.writes.append(bytes(data))

    async def drain(self):
        pass

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    def close(self):
        self.closed = True


class Empty:
    async def read(self, n):
        return b""


async def test_a_streaming_read_is_coalesced_with_the_next_batch():
    src = TunnelSource([b"a" * 4096, b"c" * 10], [b"b" * 4096])
    out, back = Sink(), Sink()
    await relay(src, back, Empty(), out)
    assert out.writes == [b"a" * 4096 + b"b" * 4096, b"c" * 10]
    assert out.eof and out.closed and back.closed


async def test_a_short_message_goes_out_at_once():
    src = TunnelSource([b"x" * (STREAMING - 1)], [b"never"])
    out = Sink()
    await relay(src, Sink(), Empty(), out)
    assert out.writes == [b"x" * (STREAMING - 1)]
    assert src.nowait_calls == 0
