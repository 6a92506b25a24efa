"""A test tailnet back end (control server + DERP relays) on its own event-loop thread.

Tests that drive subprocesses (tsproxy daemons, Go nodes) need the servers to keep running
while the test blocks; a thread with its own loop does that without tying the servers to
pytest's loop.

    with TestTailnet(host="127.0.0.1") as net:
        net.control_url, net.auth_key
        net.call(lambda: net.control.expire_node(3))      # runs on the server loop
        net.wait(lambda: net.control.node("peer-a"))       # polls on the server loop

    with TestTailnet(tls=True) as net:      # as production: HTTPS control, verified DERP
        net.control_url                     # https://...; net.http_control_url is plain HTTP
        net.ca_file                         # the throwaway CA's certificate (PEM) for clients

    with TestTailnet(profile="headscale", tls=True) as net:   # Headscale's quirks; its DERP
        net.control.embedded_derp                             # is served at control_url/derp
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time

from tsproxy.testing.control import TestControlServer
from tsproxy.testing.derp_server import TestDerpServer, derp_map


class TestTailnet:
    __test__ = False

    def __init__(self, host: str = "127.0.0.1", *, derp_regions: int = 1, port: int = 0,
                 keepalive: float = 50.0, stun: bool = True, ephemeral_idle: float = 30.0,
                 tls: bool = False, profile: str = "tailscale", embedded_derp: str = "headscale"):
        self.host = host
        self.profile = profile
        self._embedded_derp = embedded_derp
        self.tls = tls
        self.ca = None                  # testing.tlsca.TestCA when tls
        self.ca_file: str | None = None
        self._ca_dir: str | None = None
        self._regions = derp_regions
        self._port = port
        self._keepalive = keepalive
        self._stun = stun
        self._ephemeral_idle = ephemeral_idle
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-tailnet",
                                        daemon=True)
        self.control: TestControlServer | None = None
        self.derps: list[TestDerpServer] = []

    def start(self) -> "TestTailnet":
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        if self.tls:
            from tsproxy.testing.tlsca import TestCA
            self.ca = TestCA()
            self._ca_dir = tempfile.mkdtemp(prefix="tsp-test-ca-")
            os.chmod(self._ca_dir, 0o755)         # unprivileged clients (tailscaled) read it
            self.ca_file = self.ca.write(self._ca_dir)
            os.chmod(self.ca_file, 0o644)
        for i in range(self._regions if self.profile != "headscale" else 0):
            d = TestDerpServer(host=self.host, tls=True, stun_port=0 if self._stun else None,
                               region_id=900 + i, ca=self.ca)
            await d.start()
            self.derps.append(d)
        self.control = TestControlServer(self.host, self._port,
                                         derp_map=derp_map(*self.derps) if self.derps else None,
                                         keepalive=self._keepalive,
                                         ephemeral_idle=self._ephemeral_idle, tls=self.ca,
                                         profile=self.profile,
                                         embedded_derp=self._embedded_derp)
        await self.control.start()
        if self.control.embedded_derp is not None:
            self.derps.append(self.control.embedded_derp)     # stopped by the control server
        self.auth_key = self.control.create_auth_key(reusable=True).key
        self.ephemeral_key = self.control.create_auth_key(reusable=True, ephemeral=True).key

    @property
    def control_url(self) -> str:
        return self.control.url

    @property
    def http_control_url(self) -> str:
        """Plain-HTTP control URL (the same as control_url without tls)."""
        return self.control.http_url

    def run(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        """Call a plain function on the server loop (registry state is loop-owned)."""
        if threading.current_thread() is self._thread:        # already there (e.g. in wait())
            return fn(*args)

        async def _c():
            return fn(*args)
        return self.run(_c())

    def wait(self, predicate, timeout: float = 60.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.call(predicate)
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(f"test tailnet: {what} not reached in {timeout}s")

    def node(self, hostname: str):
        return self.call(self.control.node, hostname)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        async def _stop():
            if self.control is not None:
                await self.control.stop()
            for d in self.derps:
                await d.stop()
        try:
            self.run(_stop(), timeout=20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if self._ca_dir is not None:
                shutil.rmtree(self._ca_dir, ignore_errors=True)

    def __enter__(self) -> "TestTailnet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
