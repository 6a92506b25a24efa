"""The one WireGuard device loop and the plain UDP bind (WireGuard mode).

`DeviceLoop(device, bind, deliver)` is the data path for both modes (the seam is described in
wg/bind.py): the bind pushes received batches, the device decrypts them, the decrypted packets
go up in one batch, and whatever the device queued goes down to `bind.send` in one batch.  One
DeadlineTimer sits on the earliest of the device's and the bind's deadlines; nothing polls.

`UdpBind` is one UDP socket read until EAGAIN per wakeup (UDP_GRO where the kernel has it) and
written in runs of UDP_SEGMENT sends (tsproxy.aio.UdpBatchSocket).  Endpoints are `(ip, port)`
with IPv4-mapped IPv6 folded back to IPv4, so a peer's endpoint looks the same whether the socket
is dual-stack or not.

`WgUdpTransport.create(device, on_packets=...)` is the two together, for callers that want a
ready WireGuard-over-UDP link (tests, interop).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Callable

from tsproxy.aio import DeadlineTimer, UdpBatchSocket, bind_udp

MAX_PER_WAKEUP = 4096          # yield to the loop now and then under a flood
RECV_CHUNK = 64                # datagrams read before the device decrypts them (cache-warm)


class DeviceLoop:
    def __init__(self, device, bind, deliver: Callable[[list[bytes]], None]):
        self.device = device
        self.bind = bind
        self.deliver = deliver
        self.loop = asyncio.get_running_loop()
        self._timer = DeadlineTimer(self.loop, self._on_timer)
        self.closed = False
        # TAI64N timestamps need wall time; the core only sees the loop clock
        device.wall_offset = time.time() - self.loop.time()
        bind.open(self)
        self._after_input()

    # -- from the bind ------------------------------------------------------------------------
    def feed(self, batch: list, now: float) -> None:
        """Datagrams (bytes, or memoryview slices of a GRO buffer) into the device; their
        packets go up at the next receive()."""
        self.device.receive_datagrams(batch, now)

    def receive(self, batch: list, now: float) -> None:
        """The last (or only) batch of a wakeup: into the device, packets up, output down."""
        if batch:
            self.feed(batch, now)
        self.bind.after_receive(self.device, now)
        self._after_input()

    def _after_input(self) -> None:
        pkts = self.device.take_packets()
        if pkts:
            self.deliver(pkts)
        self.flush()

    # -- from the netstack --------------------------------------------------------------------
    def send_packets(self, packets: list[bytes]) -> None:
        """IP packets from the netstack: encrypt and send now."""
        self.device.send_packets(packets, self.loop.time())
        self.flush()

    def flush(self) -> None:
        if self.closed:
            return
        out = self.device.datagrams_to_send()
        if out:
            self.bind.send(out, self.loop.time())
        self.rearm()

    def rearm(self) -> None:
        d = self.device.next_deadline()
        b = self.bind.next_deadline()
        if b is not None and (d is None or b < d):
            d = b
        self._timer.arm(d)

    def _on_timer(self) -> None:
        if self.closed:
            return
        # a loop may fire a timer a hair early; the deadline it was armed for has come
        now = max(self.loop.time(), self._timer.fired_at or 0.0)
        self.device.handle_timer(now)
        self.bind.handle_timer(now)
        self._after_input()

    def stop(self) -> None:
        """No more timers or sends (the bind closes itself)."""
        self.closed = True
        self._timer.cancel()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.stop()
        await self.bind.aclose()


class UdpBind:
    """WireGuard mode's bind: one UDP socket, no deadlines of its own."""

    def __init__(self, sock: socket.socket, *, gro: bool = True, gso: bool = True):
        self.io = UdpBatchSocket(sock, gro=gro, gso=gso)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.counters = self.io.counters
        self.closed = False
        self._sink = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def open(self, sink) -> None:
        self._sink = sink
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        # read and decrypt in chunks (the data is still in cache), hand packets up once
        recv, sink = self.io.recv_batch, self._sink
        now = self.loop.time()
        total = 0
        while total < MAX_PER_WAKEUP:
            batch = recv(RECV_CHUNK)
            if len(batch) < RECV_CHUNK:          # the socket ran dry
                if batch or total:
                    sink.receive(batch, now)
                return
            sink.feed(batch, now)
            total += len(batch)
        sink.receive([], now)

    def send(self, datagrams: list, now: float) -> None:
        if not self.closed:
            self.io.send_batch(datagrams)

    def after_receive(self, device, now: float) -> None:
        pass

    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sink is not None:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class WgUdpTransport:
    """A WgDevice on its own UDP socket: `DeviceLoop(device, UdpBind(sock), on_packets)`."""

    def __init__(self, device, sock: socket.socket, on_packets: Callable[[list[bytes]], None],
                 *, gro: bool = True, gso: bool = True):
        self.bind = UdpBind(sock, gro=gro, gso=gso)
        self.loop = DeviceLoop(device, self.bind, on_packets)
        self.device = device
        self.counters = self.bind.counters
        self.send_packets = self.loop.send_packets

    @classmethod
    async def create(cls, device, *, port: int = 0, host: str | None = None,
                     on_packets: Callable[[list[bytes]], None], gro: bool = True,
                     gso: bool = True) -> "WgUdpTransport":
        return cls(device, bind_udp(host, port), on_packets, gro=gro, gso=gso)

    @property
    def port(self) -> int:
        return self.bind.port

    @property
    def sock(self) -> socket.socket:
        return self.bind.sock

    @property
    def closed(self) -> bool:
        return self.loop.closed

    async def aclose(self) -> None:
        await self.loop.aclose()
