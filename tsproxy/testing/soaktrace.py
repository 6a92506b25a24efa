"""Event trace of a daemon under soak (bench/bench_soak.py --trace; nothing in the product reads
this): what happened inside the daemon when a transfer stalled.  Started by
tsproxy.testing.fastrekey when TSPROXY_SOAK_TRACE names a file; one JSON object a line, every
`t` on time.monotonic() (the same clock as the soak client's chunk timestamps):

    lag        the event loop ran a 20 ms timer this late (ms), over 50 ms
    gc         a collection of generation `gen` took `ms`, over 10 ms
    hs_init    WireGuard initiation sent (attempt n)       hs_done   handshake completed
    confirm    responder: first data on the `next` keypair rotated it in
    rto        a netstack connection's retransmission timer fired (its key, rto, retries)
    ctr        counter deltas over the last 250 ms (only the ones that moved)
"""

from __future__ import annotations

import asyncio
import gc
import json
import time

from tsproxy.testing.soak import runqueue_wait

_out = None


def _emit(kind: str, **kw) -> None:
    if _out is not None:
        _out.write(json.dumps({"t": round(time.monotonic(), 4), "ev": kind, **kw}, default=str) + "\n")


def install(path: str) -> None:
    global _out
    _out = open(path, "a", buffering=1 << 16)
    _hook_gc()
    _hook_wireguard()
    _hook_netstack()
    _hook_daemon()


def _hook_gc() -> None:
    start = {}

    def cb(phase, info):
        if phase == "start":
            start["t"] = time.perf_counter()
        elif "t" in start:
            ms = (time.perf_counter() - start.pop("t")) * 1000
            if ms > 10:
                _emit("gc", gen=info.get("generation"), ms=round(ms, 1))
    gc.callbacks.append(cb)


def _hook_wireguard() -> None:
    from tsproxy.wg import device, peer

    dev = device.WgDevice
    orig_init, orig_done = dev._initiate, dev._handshake_done

    def _initiate(self, p, now, *, retry=False):
        before = self.counters["handshake_initiated"]
        orig_init(self, p, now, retry=retry)
        if self.counters["handshake_initiated"] != before:
            _emit("hs_init", attempt=p.handshake_attempts, retry=retry, staged=len(p.staged))

    def _handshake_done(self, p, now):
        orig_done(self, p, now)
        _emit("hs_done", n=p.handshakes_completed, staged=len(p.staged),
              initiator=p.handshake is None and p.current is not None and p.current.initiator)
    dev._initiate, dev._handshake_done = _initiate, _handshake_done

    orig_confirm = peer.Peer.confirm_next

    def confirm_next(self, kp):
        _emit("confirm", staged=len(self.staged))
        return orig_confirm(self, kp)
    peer.Peer.confirm_next = confirm_next


def _hook_netstack() -> None:
    from tsproxy.netstack import tcp_send
    orig = tcp_send.SendSide._on_rto

    def _on_rto(self, now):
        _emit("rto", key=getattr(self, "key", None), rto=round(self.rto, 3), retries=self.retries,
              state=self.state, flight=self.snd_max - self.snd_una, snd_wnd=self.snd_wnd)
        return orig(self, now)
    tcp_send.SendSide._on_rto = _on_rto


def _hook_daemon() -> None:
    from tsproxy.daemon import runtime
    orig_run = runtime.Daemon.run

    async def run(self):
        tasks = [asyncio.ensure_future(_lag()), asyncio.ensure_future(_counters(self))]
        try:
            return await orig_run(self)
        finally:
            for t in tasks:
                t.cancel()
    runtime.Daemon.run = run


async def _lag() -> None:
    while True:
        t0, w0 = time.monotonic(), runqueue_wait()
        await asyncio.sleep(0.02)
        late = (time.monotonic() - t0 - 0.02) * 1000
        if late > 50:
            _emit("lag", ms=round(late, 1), runq_ms=round((runqueue_wait() - w0) * 1000, 1))


async def _counters(daemon) -> None:
    last: dict = {}
    while True:
        await asyncio.sleep(0.25)
        try:
            now = daemon._counters()
        except Exception:                        # noqa: BLE001 - not up yet / shutting down
            continue
        d = {k: v - last.get(k, 0) for k, v in now.items() if v != last.get(k, 0)}
        last = now
        if d:
            _emit("ctr", d=d)
        _out.flush()
