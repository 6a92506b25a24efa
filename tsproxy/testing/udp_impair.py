"""A UDP relay that drops, duplicates and reorders datagrams, for tests (this kernel has no netem).

    our daemon  ->  relay (veth address in the peer namespace, port P)  ->  wireguard-go :51820

Each datagram, each way, independently: dropped with probability `loss`; otherwise sent twice
with probability `duplicate`; otherwise held back with probability `reorder` and sent after the
next datagram of the same direction (or after `hold` seconds if none comes).  The RNG is seeded,
so a run is reproducible.  Counters go to a JSON stats file twice a second, so the test can check
that the impairments really happened.  Run it inside a namespace the test created:

    python -m tsproxy.testing.udp_impair --listen 10.x.y.2:51999 --target 127.0.0.1:51820 \\
        --loss 0.05 --duplicate 0.05 --reorder 0.05 --stats FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Impairer:
    """Decides the fate of each datagram of one direction and keeps at most one held back."""

    def __init__(self, rng: random.Random, loss: float, duplicate: float, reorder: float, hold: float,
                 counters: dict, prefix: str):
        self.rng, self.loss, self.duplicate, self.reorder, self.hold = rng, loss, duplicate, reorder, hold
        self.counters, self.prefix = counters, prefix
        self.held: tuple | None = None       # (data, send) waiting for the next datagram
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes, send) -> None:
        c, p = self.counters, self.prefix
        c[p + "in"] += 1
        r = self.rng.random()
        if r < self.loss:
            c[p + "dropped"] += 1
            return
        if r < self.loss + self.duplicate:
            c[p + "duplicated"] += 1
            send(data)
            send(data)
        elif r < self.loss + self.duplicate + self.reorder and self.held is None:
            c[p + "reordered"] += 1
            self.held = (data, send)
            self.timer = asyncio.get_running_loop().call_later(self.hold, self._release)
            return
        else:
            send(data)
        self._release()               # a held datagram goes out after this newer one

    def _release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held is not None:
            data, send = self.held
            self.held = None
            send(data)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: "Relay"):
        self.relay = relay

    def datagram_received(self, data, addr):
        self.relay.from_target(data)


class Relay(asyncio.DatagramProtocol):
    """One client at a time (the last address that sent to us), one upstream socket to the target."""

    def __init__(self, target: tuple[str, int], args):
        self.target = target
        self.client = None
        self.counters = {f"{d}_{k}": 0 for d in ("up", "down")
                         for k in ("in", "dropped", "duplicated", "reordered")}
        rng = random.Random(args.seed)
        self.up = Impairer(rng, args.loss, args.duplicate, args.reorder, args.hold, self.counters, "up_")
        self.down = Impairer(rng, args.loss, args.duplicate, args.reorder, args.hold, self.counters, "down_")
        self.transport = self.upstream = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.client = addr
        if self.upstream is not None:
            self.up.push(data, self.upstream.sendto)

    def from_target(self, data: bytes) -> None:
        if self.client is not None:
            client = self.client
            self.down.push(data, lambda d: self.transport.sendto(d, client))


async def _run(args) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(_addr(args.target), args)
    await loop.create_datagram_endpoint(lambda: relay, local_addr=_addr(args.listen))
    relay.upstream, _ = await loop.create_datagram_endpoint(lambda: _Upstream(relay),
                                                            remote_addr=relay.target)
    print("ready", flush=True)
    while True:
        tmp = args.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump(relay.counters, f)
        os.replace(tmp, args.stats)
        await asyncio.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tsproxy.testing.udp_impair", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to receive the client's datagrams on")
    p.add_argument("--target", required=True, help="HOST:PORT to relay them to")
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--duplicate", type=float, default=0.0)
    p.add_argument("--reorder", type=float, default=0.0)
    p.add_argument("--hold", type=float, default=0.02, help="seconds a reordered datagram waits at most")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--stats", required=True, help="JSON file the counters are written to")
    args = p.parse_args(argv)
    if not 0 <= args.loss + args.duplicate + args.reorder <= 1:
        p.error("loss + duplicate + reorder must be within 0..1")
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
