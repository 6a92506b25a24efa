"""`tsproxy.sync.Node`: the Python API for synchronous programs.

    with tsproxy.sync.Node(control_url=url, auth_key=key, hostname="script") as node:
        s = node.socket("peer-a", 22)          # a real, blocking socket.socket

The node's event loop runs on a background thread; every method hands its work to that loop and
blocks for the answer.  Leaving the `with` block (or close()) stops the node and joins the thread.
"""

from __future__ import annotations

import asyncio
import threading

from tsproxy.node import Node as AsyncNode


class Node:
    """Same keyword arguments as tsproxy.Node, plus `timeout` for reaching Running in start()
    (None: wait as long as it takes; the typed outcomes of wait_running() are raised)."""

    def __init__(self, *, timeout: float | None = None, **kwargs):
        self._node = AsyncNode(**kwargs)        # TypeError/ConfigError here, in the caller's thread
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "Node":
        if self._thread is not None:
            raise RuntimeError("this Node was already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tsproxy-node",
                                        daemon=True)
        self._thread.start()
        try:
            self._call(self._node.start())
            self._call(self._node.wait_running(self._timeout))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._loop is None or not self._thread.is_alive():
            return
        try:
            self._call(self._node.aclose(), timeout=30)
            self._call(_cancel_the_rest(), timeout=10)   # as asyncio.run does before closing
            # and its executor threads (getaddrinfo for a control/DERP host name) end too
            self._call(self._loop.shutdown_default_executor(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, coro, timeout: float | None = None):
        if self._loop is None:
            coro.close()
            raise RuntimeError("the node is not started (use `with` or node.start())")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("tsproxy.sync.Node methods block: do not call them on its own loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- the API ---------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._node.state

    @property
    def auth_url(self) -> str | None:
        return self._node.auth_url

    @property
    def addresses(self) -> list[str]:
        return self._node.addresses

    def wait_running(self, timeout: float | None = None) -> None:
        self._call(self._node.wait_running(timeout))

    def socket(self, host: str, port: int, *, timeout: float | None = None):
        """A connected, blocking socket.socket to host:port over the tailnet."""
        return self._call(self._node.socket(host, port, timeout=timeout))

    def serve_proxy(self, listen: str = "127.0.0.1:0", **kw) -> tuple[str, int]:
        return self._call(self._node.serve_proxy(listen, **kw))

    def forward(self, spec: str) -> dict:
        return self._call(self._node.forward(spec))

    def reverse(self, spec: str) -> dict:
        return self._call(self._node.reverse(spec))

    def whois(self, ip: str) -> dict | None:
        return self._call(self._node.whois(ip))

    def status(self) -> dict:
        return self._call(_now(self._node.status))

    def peers(self) -> list[dict]:
        return self._call(_now(self._node.peers))


async def _cancel_the_rest() -> None:
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


async def _now(fn):
    return fn()
