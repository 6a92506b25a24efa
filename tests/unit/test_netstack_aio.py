"""Two NetstackRuntimes in one event loop, joined by an in-process packet pipe."""

import asyncio
import os

import pytest

from tsproxy.errors import ConnectionRefused, DialTimeout
from tsproxy.netstack import tcp as T
from tsproxy.netstack.aio import NetstackRuntime
from tsproxy.netstack.stack import Stack
from tests.waiting import until


async def make_pair(drop=lambda p: False, **kw):
    loop = asyncio.get_running_loop()
    now = loop.time()
    sa = Stack(["10.0.0.1"], mtu=1420, now=now, **kw)
    sb = Stack(["10.0.0.2"], mtu=1420, now=now, **kw)
    rts = {}

    def sender(dst):
        def send(pkts):
            pkts = [p for p in pkts if not drop(p)]
            if pkts:
                loop.call_soon(rts[dst].deliver, pkts)
        return send
    rts["a"] = NetstackRuntime(sa, sender("b"))
    rts["b"] = NetstackRuntime(sb, sender("a"))
    return rts["a"], rts["b"]


async def echo_server(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


async def test_open_connection_echo_and_large_transfer():
    a, b = await make_pair()
    await b.start_server(7, echo_server)
    r, w = await a.open_connection("10.0.0.2", 7)
    assert w.get_extra_info("peername") == ("10.0.0.2", 7)
    data = os.urandom(5_000_000)

    async def send():
        for i in range(0, len(data), 100_000):
            w.write(data[i:i + 100_000])
            await w.drain()
        w.write_eof()
    t = asyncio.create_task(send())
    got = bytearray()
    while chunk := await r.read(1 << 20):
        got += chunk
    await t
    assert bytes(got) == data
    w.close()
    await asyncio.wait_for(w.wait_closed(), 5)
    await a.aclose()
    await b.aclose()


async def test_readexactly_readline_and_eof():
    a, b = await make_pair()

    async def srv(reader, writer):
        writer.write(b"line one\nline two\n0123456789")
        writer.close()
    await b.start_server(80, srv)
    r, w = await a.open_connection("10.0.0.2", 80)
    assert await r.readline() == b"line one\n"
    assert await r.readuntil(b"\n") == b"line two\n"
    assert await r.readexactly(4) == b"0123"
    with pytest.raises(asyncio.IncompleteReadError) as e:
        await r.readexactly(100)
    assert e.value.partial == b"456789"
    assert await r.read() == b"" and r.at_eof()
    await a.aclose()
    await b.aclose()


async def test_refused_and_timeout_errors():
    a, b = await make_pair()
    with pytest.raises(ConnectionRefused):
        await a.open_connection("10.0.0.2", 9)
    c, d = await make_pair(drop=lambda p: True)
    with pytest.raises(DialTimeout, match=r"10\.0\.0\.2:9: no answer within 0\.5 s"):
        await c.open_connection("10.0.0.2", 9, timeout=0.5)
    assert not c.stack.conns                     # the half-open attempt was cleaned up
    for rt in (a, b, c, d):
        await rt.aclose()


async def test_backpressure_slow_reader_blocks_the_writer():
    a, b = await make_pair(rcv_buf=128 * 1024, snd_buf=128 * 1024)
    accepted = asyncio.get_running_loop().create_future()

    async def srv(reader, writer):
        accepted.set_result((reader, writer))
        await asyncio.sleep(3600)
    await b.start_server(80, srv)
    r, w = await a.open_connection("10.0.0.2", 80)
    sreader, _ = await accepted
    sent = 0
    blocked = False
    for _ in range(100):
        w.write(b"x" * 65536)
        sent += 65536
        try:
            await asyncio.wait_for(w.drain(), 0.3)
        except TimeoutError:
            blocked = True
            break
    assert blocked and sent < 2_000_000          # the writer was stopped, memory stays bounded
    conn = sreader.conn
    assert conn.readable_bytes() <= 128 * 1024
    # the reader catches up and everything arrives
    got = 0
    w.write_eof()
    while got < sent:
        chunk = await asyncio.wait_for(sreader.read(1 << 20), 10)
        assert chunk
        got += len(chunk)
    assert got == sent
    await a.aclose()
    await b.aclose()


async def test_cancelled_reader_and_abort_leave_nothing_behind():
    a, b = await make_pair()
    await b.start_server(7, echo_server)
    streams = [await a.open_connection("10.0.0.2", 7) for _ in range(20)]
    readers = [asyncio.create_task(r.read(10)) for r, _ in streams]
    await asyncio.sleep(0)                       # let every reader start waiting
    for t in readers:
        t.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    assert all(t.cancelled() for t in readers)
    for _, w in streams:
        w.abort()
    await until(lambda: not a.stack.conns and not a.streams, "a forgets every connection")
    await until(lambda: not any(c.state == T.ESTABLISHED for c in b.stack.conns.values()),
                "b sees every connection reset")
    await a.aclose()
    await b.aclose()


async def test_udp_endpoints():
    a, b = await make_pair()
    eb = await b.open_udp(53)
    ea = await a.open_udp()
    ea.sendto(b"query", ("10.0.0.2", 53))
    data, addr = await asyncio.wait_for(eb.recvfrom(), 2)
    assert data == b"query"
    eb.sendto(b"answer", addr)
    assert await asyncio.wait_for(ea.recvfrom(), 2) == (b"answer", ("10.0.0.2", 53))
    ea.sendto(b"nobody", ("10.0.0.2", 54))
    with pytest.raises(ConnectionRefused):
        await asyncio.wait_for(ea.recvfrom(), 2)
    await a.aclose()
    await b.aclose()


async def test_writer_resumes_when_an_ack_drains_the_whole_send_buffer():
    """Regression: an ACK that empties the send buffer must still wake a parked writer.
    Two-segment buffers make every delayed ACK drain it completely."""
    a, b = await make_pair(snd_buf=2 * 1380)
    done = asyncio.get_running_loop().create_future()

    async def sink(reader, writer):
        n = 0
        while chunk := await reader.read(1 << 20):
            n += len(chunk)
        done.set_result(n)
        writer.close()
    await b.start_server(9, sink)
    r, w = await a.open_connection("10.0.0.2", 9)
    w.write(b"p" * 500_000)                 # almost all of it parks in the stream
    await asyncio.wait_for(w.drain(), 10)
    w.write_eof()
    assert await asyncio.wait_for(done, 10) == 500_000
    await a.aclose()
    await b.aclose()
