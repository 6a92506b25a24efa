"""UDP socket buffers: bind_udp asks for UDP_BUFFER, forced past net.core.rmem_max when the
process may (root / CAP_NET_ADMIN), and status reports what the kernel granted."""

import os
import socket

from tsproxy.aio import UDP_BUFFER, bind_udp, process_status, size_udp_buffers, udp_buffer_sizes


def _sysctl(name: str) -> int:
    with open(f"/proc/sys/net/core/{name}") as f:
        return int(f.read())


def test_bind_udp_gets_large_buffers():
    sock = bind_udp("127.0.0.1", 0)
    try:
        got = udp_buffer_sizes(sock)
        # Linux reports twice what was set; without privilege it is capped at the sysctl
        floor = UDP_BUFFER if os.geteuid() == 0 else min(UDP_BUFFER, _sysctl("rmem_max"))
        assert got["rcvbuf"] >= floor and got["sndbuf"] >= min(floor, _sysctl("wmem_max"))
    finally:
        sock.close()


def test_size_udp_buffers_returns_what_the_kernel_granted():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        got = size_udp_buffers(s, 256 * 1024)
        assert got == udp_buffer_sizes(s)
        assert got["rcvbuf"] >= 256 * 1024


def test_process_status_reports_buffers_and_survives_a_closed_socket():
    s = bind_udp("127.0.0.1", 0)
    st = process_status(s)
    assert st["udp_buffers"]["rcvbuf"] > 0 and st["open_fds"] > 0 and st["rss_bytes"] > 0
    assert st["asyncio_tasks"] == 0                  # no running loop here
    s.close()
    assert process_status(s)["udp_buffers"] == {}
    assert "udp_buffers" not in process_status(None)
