"""`tsproxy demo`: a complete tailnet on loopback, in this one process, for a first look.

    TestControlServer + TestDerpServer (loopback)
        ▲                         ▲
    demo-peer (a tsproxy node: reverse forwards 80 -> a small web page, 7 -> a TCP echo)
    demo-proxy (a tsproxy node: the SOCKS5/HTTP proxy on 127.0.0.1:1055, or a free port)

Both nodes are ordinary daemons (daemon.runtime.Daemon) with their own state dirs and control
sockets under one temporary directory, so `tsproxy status/ping/nc --state-dir ...` work against
the proxy node.  Nothing leaves loopback: the proxy refuses non-tailnet destinations.  Ctrl-C
(or SIGTERM) stops everything and removes the directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile

from tsproxy.daemon import options, runtime
from tsproxy.errors import TsproxyError

log = logging.getLogger("tsproxy.demo")
PEER = "demo-peer"
PROXY = "demo-proxy"
PAGE = ("<!doctype html>\n<title>tsproxy demo</title>\n"
        "<h1>Hello from demo-peer</h1>\n"
        "<p>This page came through the tailnet: curl -> tsproxy (SOCKS5) -> WireGuard -> "
        "demo-peer's reverse forward.</p>\n")
START_TIMEOUT = 30.0


def _command_prefix() -> str:
    """How to run this same tsproxy again from a shell."""
    exe = shutil.which("tsproxy")
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if exe and os.path.basename(argv0) == "tsproxy" and os.path.samefile(exe, argv0):
        return "tsproxy"
    if os.path.basename(argv0) == "tsproxy" and os.access(argv0, os.X_OK):
        return shlex.quote(argv0)
    return f"{shlex.quote(sys.executable)} -m tsproxy"


def _proxy_listen(addr: str | None) -> str:
    """The requested address, or 127.0.0.1:1055 when free, else any free loopback port."""
    if addr:
        return addr
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 1055))
            return "127.0.0.1:1055"
        except OSError:
            return "127.0.0.1:0"


async def _serve_page(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        method = head.split(b" ", 1)[0]
        body = PAGE.encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        if method != b"HEAD":
            writer.write(body)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Demo:
    def __init__(self, listen: str | None = None, state_root: str | None = None,
                 out=None):
        self.listen = listen
        self.root = state_root
        self.out = out or (lambda line: print(line, flush=True))
        self.derp = self.control = None
        self.servers: list[asyncio.AbstractServer] = []
        self.daemons: list[runtime.Daemon] = []
        self.tasks: list[asyncio.Task] = []

    def _plan(self, name: str, auth_key: str, listen: str | None = None, **kw) -> runtime.Plan:
        opts = options.UpOptions(login_server=self.control.url, auth_key=auth_key, hostname=name,
                                 state_dir=os.path.join(self.root, name), non_tailnet="refuse",
                                 listen=listen, **kw)
        options.validate(opts)
        return runtime.prepare(opts)

    async def run(self, stop: asyncio.Event) -> int:
        from tsproxy.testing.control import TestControlServer
        from tsproxy.testing.derp_server import TestDerpServer, derp_map

        made_root = self.root is None
        self.root = self.root or tempfile.mkdtemp(prefix="tsproxy-demo-")
        os.chmod(self.root, 0o700)
        try:
            self.derp = TestDerpServer(host="127.0.0.1", tls=True, stun_port=0, region_id=900)
            await self.derp.start()
            self.control = TestControlServer("127.0.0.1", 0, derp_map=derp_map(self.derp))
            await self.control.start()
            key = self.control.create_auth_key(reusable=True).key
            web = await asyncio.start_server(_serve_page, "127.0.0.1", 0)
            echo = await asyncio.start_server(_serve_echo, "127.0.0.1", 0)
            self.servers += [web, echo]
            peer = runtime.Daemon(self._plan(PEER, key, reverse=[
                f"80:127.0.0.1:{web.sockets[0].getsockname()[1]}",
                f"7:127.0.0.1:{echo.sockets[0].getsockname()[1]}"]))
            proxy = runtime.Daemon(self._plan(PROXY, key, listen=_proxy_listen(self.listen)))
            self.daemons = [peer, proxy]
            for d in self.daemons:
                self.tasks.append(asyncio.create_task(d.run(), name=f"demo:{d.plan.hostname}"))
            if not await self._wait_ready(stop):
                return 1 if not stop.is_set() else 0
            self._print_intro(proxy)
            # the daemons installed their own signal handlers; one Ctrl-C stops the whole demo
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([stopper, *self.tasks], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            failed = [t for t in self.tasks if t.done()]
            for t in failed:
                self._report_exit(t)
            return 1 if failed and not stop.is_set() else 0
        finally:
            await self._teardown()
            if made_root:
                shutil.rmtree(self.root, ignore_errors=True)
                self.out(f"demo stopped; removed {self.root}")

    async def _wait_ready(self, stop: asyncio.Event) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        proxy = self.daemons[1]
        while loop.time() < deadline and not stop.is_set():
            for t in self.tasks:
                if t.done():
                    self._report_exit(t)
                    return False
            if all(d.state == "Running" for d in self.daemons):
                nm = proxy.tailnet.netmap
                if nm is not None and PEER in nm.names:
                    return True
            await asyncio.sleep(0.05)
        if not stop.is_set():
            self.out(f"tsproxy: the demo tailnet did not come up within {START_TIMEOUT:.0f} s")
        return False

    def _report_exit(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, TsproxyError):
            self.out(f"tsproxy: {task.get_name()}: {exc}")
        elif exc is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)
            self.out(f"tsproxy: {task.get_name()} failed: {exc!r}")

    def _print_intro(self, proxy: runtime.Daemon) -> None:
        tsp = _command_prefix()
        addr = proxy.servers[0][1].address_text()
        sd = shlex.quote(proxy.plan.state_dir)
        peer_ip = self.daemons[0].tailnet.addresses()[0]
        self.out("\n".join([
            f"tsproxy demo: a tailnet on loopback (control {self.control.url}, DERP region 900),",
            f"  node {PEER} ({peer_ip}) serving a web page on port 80 and a TCP echo on port 7,",
            f"  node {PROXY}: SOCKS5/HTTP proxy on {addr}, state dir {proxy.plan.state_dir}",
            "",
            "Try, in another terminal:",
            "",
            f"  curl --socks5-hostname {addr} http://{PEER}/",
            f"  curl --proxy http://{addr} http://{PEER}/",
            f"  {tsp} status --state-dir {sd}",
            f"  {tsp} ping -c 3 --state-dir {sd} {PEER}",
            f"  {tsp} whois --state-dir {sd} {peer_ip}",
            f"  echo hello | {tsp} nc --state-dir {sd} {PEER} 7",
            "",
            "Ctrl-C stops the demo and removes its state.",
        ]))

    async def _teardown(self) -> None:
        for d in self.daemons:
            if d.stopping is not None:
                d.stopping.set()
        if self.tasks:
            done, pending = await asyncio.wait(self.tasks, timeout=15)
            for t in pending:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for srv in self.servers:
            srv.close()
        if self.control is not None:
            await self.control.stop()
        if self.derp is not None:
            await self.derp.stop()


def main(listen: str | None = None, log_level: str = "warning") -> int:
    runtime.setup_logging(log_level)

    async def _main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await Demo(listen).run(stop)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_main())
