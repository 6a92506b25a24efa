"""UDP adapter for a WgDevice: one socket, drained per wakeup, one timer.

asyncio's DatagramProtocol reads one datagram per loop iteration into a 256 KiB buffer (see
the harness README); here `loop.add_reader` drains the socket until EAGAIN, feeds every
datagram to the device, then hands the decrypted packets up in one batch and sends what the
device queued.  Endpoints are `(ip, port)` with IPv4-mapped IPv6 folded back to IPv4, so a
peer's endpoint looks the same whether the socket is dual-stack or not.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable

from tsproxy.aio import DeadlineTimer, UdpAddrs, bind_udp

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65536
MAX_PER_WAKEUP = 4096          # yield to the loop now and then under a flood


class WgUdpTransport:
    def __init__(self, device, sock: socket.socket, on_packets: Callable[[list[bytes]], None]):
        self.device = device
        self.sock = sock
        self.on_packets = on_packets
        self.loop = asyncio.get_running_loop()
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)
        self._timer = DeadlineTimer(self.loop, self._on_timer)
        self.addrs = UdpAddrs(sock.family)
        self.counters = {"rx_datagrams": 0, "tx_datagrams": 0, "tx_errors": 0, "rx_errors": 0}
        self.closed = False
        # TAI64N timestamps need wall time; the core only sees the loop clock
        device.wall_offset = time.time() - self.loop.time()
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self._after_input()

    @classmethod
    async def create(cls, device, *, port: int = 0, host: str | None = None,
                     on_packets: Callable[[list[bytes]], None]) -> "WgUdpTransport":
        sock = bind_udp(host, port)
        return cls(device, sock, on_packets)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    # -- receive --------------------------------------------------------------------------
    def _on_readable(self) -> None:
        recvfrom_into = self.sock.recvfrom_into
        view = self._view
        receive = self.device.receive_datagram
        norm = self.addrs.norm
        now = self.loop.time()
        n_read = 0
        while n_read < MAX_PER_WAKEUP:
            try:
                n, addr = recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:                   # e.g. ICMP errors queued on the socket
                self.counters["rx_errors"] += 1
                log.debug("udp receive error: %s", e)
                break
            n_read += 1
            receive(bytes(view[:n]), norm(addr), now)
        self.counters["rx_datagrams"] += n_read
        self._after_input()

    def _after_input(self) -> None:
        pkts = self.device.take_packets()
        if pkts:
            self.on_packets(pkts)
        self._flush()

    # -- send -----------------------------------------------------------------------------
    def send_packets(self, packets: list[bytes]) -> None:
        """IP packets from the netstack: encrypt and send now."""
        now = self.loop.time()
        send = self.device.send_packet
        for p in packets:
            send(p, now)
        self._flush()

    def _flush(self) -> None:
        if self.closed:
            return
        out = self.device.datagrams_to_send()
        if out:
            sendto = self.sock.sendto
            sockaddr = self.addrs.sockaddr
            sent = 0
            for data, ep in out:
                try:
                    sendto(data, sockaddr(ep))
                    sent += 1
                except (BlockingIOError, InterruptedError):
                    self.counters["tx_errors"] += 1     # socket buffer full: UDP may drop
                except OSError as e:
                    self.counters["tx_errors"] += 1
                    log.debug("udp send to %s failed: %s", ep, e)
            self.counters["tx_datagrams"] += sent
        self._arm()

    def _arm(self) -> None:
        self._timer.arm(self.device.next_deadline())

    def _on_timer(self) -> None:
        if self.closed:
            return
        self.device.handle_timer(self.loop.time())
        self._after_input()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

