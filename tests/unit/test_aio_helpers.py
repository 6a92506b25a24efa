"""tsproxy/aio.py: the deadline timer only moves earlier; endpoint/sockaddr mapping."""

import asyncio
import socket

from tsproxy.aio import DeadlineTimer, UdpAddrs, bind_udp


async def test_deadline_timer_moves_only_earlier_and_cancels():
    loop = asyncio.get_running_loop()
    fired = []
    t = DeadlineTimer(loop, lambda: fired.append(loop.time()))
    now = loop.time()
    t.arm(now + 0.20)
    t.arm(now + 5.0)                  # later: ignored
    t.arm(None)                       # nothing due: ignored
    t.arm(now + 0.05)                 # earlier: moves
    await asyncio.sleep(0.1)
    assert len(fired) == 1 and fired[0] - now < 0.15
    await asyncio.sleep(0.15)
    assert len(fired) == 1            # the 0.20 s handle was replaced, not kept
    t.arm(loop.time() + 0.05)
    t.cancel()
    await asyncio.sleep(0.1)
    assert len(fired) == 1


def test_udp_addrs_fold_mapped_v4_and_map_back():
    six = UdpAddrs(socket.AF_INET6)
    assert six.norm(("::ffff:10.0.0.1", 5, 0, 0)) == ("10.0.0.1", 5)
    assert six.norm(("fd00::1", 5, 0, 0)) == ("fd00::1", 5)
    assert six.sockaddr(("10.0.0.1", 5)) == ("::ffff:10.0.0.1", 5)
    assert UdpAddrs(socket.AF_INET).sockaddr(("10.0.0.1", 5)) == ("10.0.0.1", 5)


def test_bind_udp_families():
    with bind_udp("127.0.0.1", 0) as s4:
        assert s4.family == socket.AF_INET and not s4.getblocking()
    with bind_udp(None, 0) as s:
        assert s.getsockname()[1] > 0
