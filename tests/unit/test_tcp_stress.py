"""Randomized whole-connection runs over the fault-injecting packet link: each seed picks
sizes, buffer sizes, SACK / window scaling / congestion controller and link faults, then
transfers both ways, closes both ends and checks the bytes and a clean close."""

import random

import pytest

from tsproxy.netstack import tcp as T
from tsproxy.netstack.stack import Stack
from tsproxy.netstack.tcp_cc import Cubic
from tsproxy.testing.link import Link, run_until

from tests.unit.test_netstack import App


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", list(range(24)) + [1273])   # 1273: the RTO-past-SND.MAX bug
def test_random_connection_lifecycle(seed):
    r = random.Random(seed)
    kw = {}
    if r.random() < 0.3:
        kw["sack"] = False
    if r.random() < 0.3:
        kw["wscale"] = None
    if r.random() < 0.5:
        kw["cc"] = Cubic()
    sa, sb = r.choice([0, 1, 1000, 50_000, 300_000]), r.choice([0, 1, 1000, 50_000, 300_000])
    if seed == 1273:
        sa, sb = 50_000, 300_000
    sa = sa or 10
    link = Link(loss=r.choice([0, 0.02, 0.05, 0.1]), reorder=r.choice([0, 0.1, 0.3]),
                dup=r.choice([0, 0.05]), corrupt=r.choice([0, 0.02]), jitter=r.choice([0, 0.003]),
                seed=seed)
    rcv = r.choice([8192, 65536, 4 << 20])
    a = Stack(["10.0.0.1"], mtu=1420, now=0.0, msl=1.0, rcv_buf=rcv)
    b = Stack(["10.0.0.2"], mtu=1420, now=0.0, msl=1.0, rcv_buf=rcv)
    b.tcp_listen(80)
    c = a.tcp_connect("10.0.0.2", 80, 0.0, **kw)
    app = App(a, b, c, r.randbytes(sa), r.randbytes(sb))
    now = run_until([a, b], link, lambda: len(app.got["b"]) == sa and len(app.got["a"]) == sb,
                    now=0.0, on_step=app.step, limit=3000)
    assert bytes(app.got["b"]) == app.data["a"] and bytes(app.got["a"]) == app.data["b"]
    bc = app.bc
    c.close(now)
    a.poke(c)
    bc.close(now)
    b.poke(bc)
    done = (T.CLOSED, T.TIME_WAIT)
    run_until([a, b], link, lambda: c.state in done and bc.state in done, now=now,
              on_step=lambda n: None, limit=3000)
    assert c.error is None and bc.error is None
    assert len(c.sndbuf) == 0 and len(bc.sndbuf) == 0
