"""Bidirectional byte relay between two stream pairs, with half-close and backpressure.

Each direction reads at most 256 KiB, writes it and awaits drain() before reading again, so
a slow side slows the other down instead of filling memory.  A small read from a tunnel
stream waits one loop pass for what the next input batch brings (coalesced local writes).  EOF on one side is passed on as
write_eof() and the other direction keeps going; an error on either side aborts both.
"""

from __future__ import annotations

import asyncio

CHUNK = 256 * 1024
COALESCE = 64 * 1024        # below this, wait one loop pass for more from a tunnel stream...
STREAMING = 2 * 1024        # ...unless it is less than a couple of segments: a message, not a
                            # stream, so no added latency for request/response traffic


def abort(writer) -> None:
    try:
        if hasattr(writer, "abort"):
            writer.abort()
        else:
            writer.transport.abort()
    except Exception:
        pass


async def _pipe(src, dst, counter: list | None) -> None:
    # a tunnel stream hands over what one input batch brought, often a few segments; one
    # pass of the loop lets the next batch land so the local socket gets fewer, larger writes
    read_nowait = getattr(src, "read_nowait", None)
    while True:
        data = await src.read(CHUNK)
        if not data:
            break
        if read_nowait is not None and STREAMING <= len(data) < COALESCE:
            await asyncio.sleep(0)
            more = read_nowait(CHUNK - len(data))
            if more:
                data += more
        dst.write(data)
        if counter is not None:
            counter[0] += len(data)
        await dst.drain()
    try:
        if dst.can_write_eof():
            dst.write_eof()
    except (OSError, RuntimeError):
        pass


async def relay(ar, aw, br, bw, *, counters: list | None = None) -> None:
    """Relay a<->b until both directions finish; always closes (or aborts) both writers."""
    c_ab = c_ba = None
    if counters is not None:
        c_ab, c_ba = counters
    t1 = asyncio.ensure_future(_pipe(ar, bw, c_ab))
    t2 = asyncio.ensure_future(_pipe(br, aw, c_ba))
    failed = False
    try:
        done, pending = await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                failed = True
        if failed:
            for t in pending:
                t.cancel()
        else:
            await asyncio.gather(*pending)
            for t in (t1, t2):
                if t.exception() is not None:
                    failed = True
    except BaseException:
        failed = True
        raise
    finally:
        for t in (t1, t2):
            if not t.done():
                t.cancel()
        await asyncio.gather(t1, t2, return_exceptions=True)
        for w in (aw, bw):
            if failed:
                abort(w)
            else:
                try:
                    w.close()
                except Exception:
                    abort(w)
