"""An HTTP CONNECT proxy for tests: counts CONNECTs by target, checks Basic credentials, and
splices bytes.  Targets are dialed as given (IP literals in tests; `names` maps any other name
to an address so the host's resolver is never asked).

    proxy = TestConnectProxy(host="10.231.0.1", credentials=("user", "pw")); await proxy.start()
    env = {"HTTPS_PROXY": proxy.url_with_credentials}; ...; proxy.connects  # {"h:p": n}
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections import Counter
from urllib.parse import quote

log = logging.getLogger(__name__)
MAX_HEAD = 16 << 10


class TestConnectProxy:
    __test__ = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 credentials: tuple[str, str] | None = None, names: dict | None = None):
        self.host, self.port = host, port
        self.credentials = credentials
        self.names = dict(names or {})
        self.connects: Counter = Counter()           # "host:port" -> CONNECTs answered 200
        self.counters = Counter()                    # auth_failed, bad_request, dial_failed
        self.auth_headers: list[str | None] = []     # every Proxy-Authorization seen
        self._server = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url_with_credentials(self) -> str:
        user, pw = self.credentials
        return f"http://{quote(user, safe='')}:{quote(pw, safe='')}@{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _expected_auth(self) -> str | None:
        if self.credentials is None:
            return None
        return "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()

    async def _handle(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head[:MAX_HEAD].decode("latin-1").split("\r\n")
            method, target, *_ = lines[0].split(" ") + ["", ""]
            hdrs = {}
            for ln in lines[1:]:
                k, sep, v = ln.partition(":")
                if sep:
                    hdrs[k.strip().lower()] = v.strip()
            auth = hdrs.get("proxy-authorization")
            self.auth_headers.append(auth)
            if method != "CONNECT" or ":" not in target:
                self.counters["bad_request"] += 1
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            expected = self._expected_auth()
            if expected is not None and auth != expected:
                self.counters["auth_failed"] += 1
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            host = host.strip("[]")
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(self.names.get(host, host), int(port)), 10)
            except (OSError, ValueError, TimeoutError):
                self.counters["dial_failed"] += 1
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            self.connects[target] += 1
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                TimeoutError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()

    @staticmethod
    async def _pipe(reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
