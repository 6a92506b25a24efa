"""Open a TCP stream (optionally TLS-wrapped by the caller's context) to host:port, directly
(IPv4 and IPv6 raced, happy eyeballs) or through the environment's HTTP CONNECT proxy.

    reader, writer = await open_stream(host, port, scheme="https", ssl=ctx,
                                       server_hostname=host, timeout=10)

The TLS step is the caller's: on the proxy path the CONNECTed socket is handed to
asyncio.open_connection(sock=..., ssl=...), so TLS runs end to end with the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from tsproxy.errors import RemoteProtocolError
from tsproxy.netdial.proxy import (MAX_CONNECT_RESPONSE, ProxyConfig, ProxyURL,
                                   check_connect_response, connect_request)

log = logging.getLogger(__name__)
HAPPY_EYEBALLS_DELAY = 0.2          # Go delays IPv4 200 ms behind IPv6 (PROTOCOL.md 5.1)


def proxy_config(env=None) -> ProxyConfig:
    return ProxyConfig.from_env(os.environ if env is None else env)


async def open_stream(host: str, port: int, *, scheme: str, ssl=None,
                      server_hostname: str | None = None, timeout: float, env=None):
    proxy = proxy_config(env).proxy_for(scheme, host, port)
    async with asyncio.timeout(timeout):
        if proxy is None:
            sock = await connect_tcp(host, port)
        else:
            sock = await connect_via_proxy(proxy, host, port)
        try:
            return await asyncio.open_connection(sock=sock, ssl=ssl,
                                                 server_hostname=server_hostname)
        except BaseException:
            sock.close()
            raise


def _interleave(infos: list) -> list:
    """Alternate address families, keeping the resolver's order within each (RFC 8305)."""
    v6 = [i for i in infos if i[0] == socket.AF_INET6]
    v4 = [i for i in infos if i[0] != socket.AF_INET6]
    first, second = (v6, v4) if infos and infos[0][0] == socket.AF_INET6 else (v4, v6)
    out = []
    for i in range(max(len(first), len(second))):
        out += first[i:i + 1] + second[i:i + 1]
    return out


async def connect_tcp(host: str, port: int, delay: float = HAPPY_EYEBALLS_DELAY) -> socket.socket:
    """Connected non-blocking TCP socket to host:port: every resolved address is tried,
    the next one starting `delay` after the previous (IPv4 and IPv6 raced); first wins."""
    loop = asyncio.get_running_loop()
    infos = _interleave(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    if not infos:
        raise OSError(f"{host}: no address")
    errors: list[OSError] = []

    async def attempt(info, start):
        await asyncio.sleep(start)
        family, type_, proto, _, addr = info
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except BaseException as e:
            sock.close()
            if isinstance(e, OSError):
                errors.append(e)
            raise
        return sock

    tasks = [loop.create_task(attempt(info, i * delay)) for i, info in enumerate(infos)]
    winner = None
    try:
        for fut in asyncio.as_completed(tasks):
            try:
                winner = await fut
                break
            except OSError:
                continue
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        for t in tasks:                       # close a socket that connected after the winner
            if t.done() and not t.cancelled() and t.exception() is None \
                    and t.result() is not winner:
                t.result().close()
    if winner is None:
        raise errors[-1] if errors else OSError(f"cannot connect to {host}:{port}")
    winner.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return winner


async def connect_via_proxy(proxy: ProxyURL, host: str, port: int) -> socket.socket:
    """A non-blocking socket on which the proxy has answered 2xx to CONNECT host:port."""
    loop = asyncio.get_running_loop()
    log.debug("dialing %s:%d through proxy %s", host, port, proxy.display)
    try:
        sock = await connect_tcp(proxy.host, proxy.port)
    except OSError as e:
        raise type(e)(e.errno, f"cannot reach proxy {proxy.display}: {e.strerror or e}") from None
    try:
        await loop.sock_sendall(sock, connect_request(host, port, proxy))
        check_connect_response(await _read_head(loop, sock, proxy), proxy)
        return sock
    except BaseException:
        sock.close()
        raise


async def _read_head(loop, sock, proxy: ProxyURL) -> bytes:
    # byte by byte: nothing after the blank line may be consumed (it belongs to TLS)
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        if len(head) >= MAX_CONNECT_RESPONSE:
            raise RemoteProtocolError(f"proxy {proxy.display}: CONNECT answer too long")
        b = await loop.sock_recv(sock, 1)
        if not b:
            raise RemoteProtocolError(f"proxy {proxy.display} closed the connection on CONNECT")
        head += b
    return bytes(head)
