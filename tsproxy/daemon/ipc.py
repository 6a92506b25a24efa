"""Daemon control socket: newline-delimited JSON over a Unix socket in the state dir.

Each connection carries one request line `{"op": ..., ...}` and gets one response line
`{"ok": true, ...}` or `{"ok": false, "error": "one line for the user"}`.  The `dial` op
turns the connection into a raw byte pipe after its response (used by `tsproxy nc`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from typing import Awaitable, Callable

from tsproxy.errors import TsproxyError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[dict | None]]


def parse_request(line: bytes) -> dict:
    """One request line -> dict with a str 'op'; ValueError for anything else (including
    JSON nested too deep for the decoder, which raises RecursionError)."""
    try:
        request = json.loads(line)
    except RecursionError:
        raise ValueError("request nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise ValueError("request must be a JSON object with an 'op'")
    return request


class IpcServer:
    """Serves `handler(request, reader, writer) -> response dict`; None means the handler
    took over the connection (it already replied and owns the streams)."""

    def __init__(self, path: str, handler: Handler):
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self.counters = {"peer_uid_rejected": 0}

    async def start(self) -> None:
        try:
            os.unlink(self.path)          # stale socket from a daemon that died; the lock says we own it
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        took_over = False
        if not _peer_is_us(writer):
            # the socket is 0600 in a 0700 dir; this catches what slips past (a loosened mode,
            # an fd passed to another user): their uid could steer our tunnel
            self.counters["peer_uid_rejected"] += 1
            writer.close()
            return
        try:
            try:
                async with asyncio.timeout(10):
                    line = await reader.readline()
                request = parse_request(line)
            except (ValueError, asyncio.LimitOverrunError, TimeoutError) as e:
                await _reply(writer, {"ok": False, "error": f"bad request: {e}"})
                return
            try:
                response = await self.handler(request, reader, writer)
            except TsproxyError as e:
                response = {"ok": False, "error": str(e)}
            if response is None:
                took_over = True
                return
            await _reply(writer, response)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not took_over:
                writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _peer_is_us(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.geteuid()


async def _reply(writer: asyncio.StreamWriter, response: dict) -> None:
    writer.write(json.dumps(response).encode() + b"\n")
    await writer.drain()


class DaemonNotRunning(TsproxyError):
    """The daemon is not there, or did not answer sensibly (the message says which)."""


def request(path: str, req: dict, timeout: float = 10.0) -> tuple[dict, socket.socket]:
    """Blocking client for the CLI: send one request, return (response, connected socket).
    Every failure is a TsproxyError with one line for the user."""
    try:
        return _request(path, req, timeout)
    except TimeoutError:
        raise DaemonNotRunning(f"the daemon did not answer within {timeout:g} s") from None
    except OSError as e:
        raise DaemonNotRunning(f"cannot talk to the daemon at {path} ({e.strerror or e})") from None
    except ValueError:
        raise DaemonNotRunning("the daemon sent a garbled answer") from None


def _request(path: str, req: dict, timeout: float) -> tuple[dict, socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        s.close()
        raise DaemonNotRunning("tsproxy is not running (start it with 'tsproxy up')") from None
    s.sendall(json.dumps(req).encode() + b"\n")
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = s.recv(1) if req.get("op") == "dial" else s.recv(65536)   # dial: never read past the line
        if not chunk:
            s.close()
            raise DaemonNotRunning("tsproxy closed the control connection unexpectedly")
        buf += chunk
        if len(buf) > 16 * 1024 * 1024:
            s.close()
            raise TsproxyError("oversized response from the daemon")
    try:
        resp = json.loads(buf)
    except ValueError:
        s.close()
        raise
    if not isinstance(resp, dict):
        s.close()
        raise ValueError("not an object")
    return resp, s


def call(path: str, req: dict, timeout: float = 10.0) -> dict:
    resp, s = request(path, req, timeout)
    s.close()
    return resp
