"""tsproxy/aio.py: the deadline timer only moves earlier; endpoint/sockaddr mapping."""

import asyncio
import socket

from tsproxy.aio import DeadlineTimer, UdpAddrs, bind_udp


class _FakeLoop:
    """call_at only: the test decides when handles run (no clock, no sleeps)."""

    class Handle:
        def __init__(self, when, cb):
            self.when, self.cb, self.cancelled = when, cb, False

        def cancel(self):
            self.cancelled = True

    def __init__(self):
        self.handles = []

    def call_at(self, when, cb):
        self.handles.append(self.Handle(when, cb))
        return self.handles[-1]

    def live(self):
        return [h.when for h in self.handles if not h.cancelled]

    def run_due(self, now):
        for h in sorted(self.handles, key=lambda h: h.when):
            if not h.cancelled and h.when <= now:
                h.cancelled = True
                h.cb()


def test_deadline_timer_moves_only_earlier_and_cancels():
    loop = _FakeLoop()
    fired = []
    t = DeadlineTimer(loop, lambda: fired.append(1))
    t.arm(100.20)
    t.arm(105.0)                      # later: ignored
    t.arm(None)                       # nothing due: ignored
    assert loop.live() == [100.20]
    t.arm(100.05)                     # earlier: moves (the 100.20 handle is cancelled)
    assert loop.live() == [100.05]
    loop.run_due(100.10)
    assert fired == [1] and loop.live() == []
    loop.run_due(200.0)
    assert fired == [1]               # the replaced handle never fires
    t.arm(300.0)                      # after firing, any deadline arms again
    assert loop.live() == [300.0]
    t.cancel()
    loop.run_due(400.0)
    assert fired == [1] and loop.live() == []


async def test_deadline_timer_fires_on_a_real_loop():
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    t = DeadlineTimer(loop, done.set)
    t.arm(loop.time() + 0.01)
    await asyncio.wait_for(done.wait(), 10)


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
