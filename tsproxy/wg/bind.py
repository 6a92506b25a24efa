"""The seam between the WireGuard device and whatever carries its datagrams (after
wireguard-go's conn.Bind): a plain UDP socket in WireGuard mode, magicsock on a tailnet.

A `DeviceLoop` (wg/aio.py) owns one device and one bind and runs

    bind ──receive(batch, now)──► WgDevice ──take_packets──► deliver (filter, netstack)
    netstack ──send_packets──► WgDevice ──datagrams_to_send──► bind.send(batch, now)
    one timer at min(device.next_deadline(), bind.next_deadline()) ──► handle_timer(now) on both

A bind pushes what it reads in batches of `(datagram, endpoint)`; the endpoint is whatever the
bind understands in `send` (an `(ip, port)` tuple for UDP, a peer object for magicsock).  The
bind never calls the device itself; it asks its sink (the loop) to `feed` it batches while the
socket has more (decrypted while the data is in cache) and to `receive` the wakeup's last one
(packets go up, output goes down), to `flush` after its own output, or to `rearm` when one of its
deadlines moved earlier.
"""

from __future__ import annotations

from typing import Protocol


class BindSink(Protocol):
    def feed(self, batch: list, now: float) -> None: ...          # more follows this wakeup
    def receive(self, batch: list, now: float) -> None: ...       # the wakeup's last batch
    def flush(self) -> None: ...
    def rearm(self) -> None: ...


class Bind(Protocol):
    port: int

    def open(self, sink: BindSink) -> None:
        """Start reading; batches go to sink.receive."""

    def send(self, datagrams: list, now: float) -> None:
        """Send [(datagram, endpoint)] the device produced."""

    def after_receive(self, device, now: float) -> None:
        """Called once per received batch after the device has processed it, before its
        output is flushed (magicsock re-attaches peers that roamed to a new address)."""

    def next_deadline(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    async def aclose(self) -> None: ...
