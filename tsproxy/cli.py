"""The `tsproxy` command line.  It talks to the running daemon only through daemon.ipc.

Exit codes: 0 ok, 1 error the user can fix (one line on stderr), 2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import time

from tsproxy.version import __version__
from tsproxy.daemon import ipc, options, statedir
from tsproxy.errors import TsproxyError

PROG = "tsproxy"
STATE_DIR_HELP = "the daemon's state directory (default $TSPROXY_STATE_DIR or $XDG_STATE_HOME/tsproxy)"


def _err(msg: str) -> int:
    print(f"{PROG}: {msg}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Userspace Tailscale and WireGuard proxy: "
                                "join a tailnet (or a plain WireGuard network) without root and reach "
                                "its hosts through SOCKS5/HTTP proxies and port forwards.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    up = sub.add_parser("up", help="start the daemon (detached unless --foreground)",
                        description="Start tsproxy. Settings come from flags, then TSPROXY_* "
                        "environment variables, then the TOML config file.")
    up.add_argument("--login-server", metavar="URL",
                    help="control server (default https://controlplane.tailscale.com; Headscale URL)")
    up.add_argument("--control-ca-file", metavar="PATH",
                    help="also trust this CA certificate (PEM) for the control server and DERP "
                    "relays, e.g. Headscale behind a private CA (system roots and "
                    "SSL_CERT_FILE/SSL_CERT_DIR are always used)")
    up.add_argument("--auth-key", metavar="KEY|file:PATH",
                    help="pre-auth key (or TS_AUTHKEY); without one, tsproxy prints a login URL")
    up.add_argument("--hostname", metavar="NAME", help="node name on the tailnet (default: this host's name)")
    up.add_argument("--ephemeral", action="store_true", default=False,
                    help="keep the node identity in memory; the node is removed when it goes away")
    up.add_argument("--advertise-tags", metavar="tag:a,tag:b", type=_tags, default=[],
                    help="request these ACL tags for the node")
    up.add_argument("--port", metavar="PORT", help="UDP port for WireGuard and disco (default: any)")
    up.add_argument("--wg-config", metavar="FILE", help="plain WireGuard mode: a wg-quick .conf file")
    up.add_argument("--listen", metavar="ADDR",
                    help="SOCKS5 + HTTP proxy on one port (default 127.0.0.1:1055; 'off' to disable)")
    up.add_argument("--socks5", metavar="ADDR", action="append", default=[], help="extra SOCKS5-only listener")
    up.add_argument("--http-proxy", metavar="ADDR", action="append", default=[], help="extra HTTP-proxy-only listener")
    up.add_argument("--proxy-user", metavar="USER", help="require this proxy user name (SOCKS5 and HTTP)")
    up.add_argument("--proxy-password-file", metavar="PATH", help="file holding the proxy password")
    up.add_argument("--allow-public-without-auth", action="store_true", default=False,
                    help="allow a proxy listener on a non-loopback address without --proxy-user")
    up.add_argument("--forward", metavar="[udp:]LPORT:HOST:PORT", action="append", default=[],
                    help="forward 127.0.0.1:LPORT to HOST:PORT through the tunnel (repeatable)")
    up.add_argument("--reverse", metavar="[udp:]TPORT:LOCALHOST:LPORT", action="append", default=[],
                    help="accept tunnel connections to our address on TPORT and connect them to "
                    "LOCALHOST:LPORT (repeatable)")
    up.add_argument("--non-tailnet", choices=options.NON_TAILNET_POLICIES,
                    help="destinations outside the tunnel: direct (dial from this host, the default) "
                    "or refuse (SOCKS 0x02 / HTTP 403)")
    up.add_argument("--state-dir", metavar="DIR", help="state directory (default $XDG_STATE_HOME/tsproxy)")
    up.add_argument("--config", metavar="FILE", help="TOML config file (default $XDG_CONFIG_HOME/tsproxy/config.toml)")
    up.add_argument("--foreground", action="store_true", default=False, help="run in this terminal")
    up.add_argument("--log-level", choices=options.LOG_LEVELS, help="default info")

    for name, text in (("down", "stop the daemon"), ("status", "show the daemon's state, peers and listeners"),
                       ("logout", "log the node out of the tailnet (forget its keys) and stop the daemon")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--state-dir", metavar="DIR")
        if name == "status":
            sp.add_argument("--json", action="store_true", help="one JSON document for scripts")

    nc = sub.add_parser("nc", help="connect stdin/stdout to HOST:PORT through the daemon (ssh ProxyCommand)")
    nc.add_argument("host")
    nc.add_argument("port", type=int)
    nc.add_argument("--state-dir", metavar="DIR")

    fw = sub.add_parser("forward", help="add, list or remove port forwards on the running daemon")
    fw.add_argument("spec", nargs="?", metavar="[udp:]LPORT:HOST:PORT")
    fw.add_argument("--list", action="store_true")
    fw.add_argument("--remove", metavar="[udp:]LPORT")
    fw.add_argument("--state-dir", metavar="DIR")

    pg = sub.add_parser("ping", help="disco-ping a peer, showing the path (DERP or direct) and latency",
                        description="Send disco pings to a peer like 'tailscale ping': one line per "
                        "pong with the path it took. Exit 0 if any pong came back, 1 if none.")
    pg.add_argument("host", metavar="HOST", help="peer name, MagicDNS FQDN or tailnet IP")
    pg.add_argument("-c", "--count", metavar="N", type=_positive_int, default=10,
                    help="send at most N pings (default 10)")
    pg.add_argument("--until-direct", action="store_true",
                    help="stop at the first pong over a direct path")
    pg.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=5.0,
                    help="how long to wait for each pong (default 5)")
    pg.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)

    wh = sub.add_parser("whois", help="show which node has a tailnet IP (name, user, tags, online)",
                        description="Look a tailnet address up in the netmap.")
    wh.add_argument("ip", metavar="IP", help="a tailnet address (100.x.y.z or fd7a:...)")
    wh.add_argument("--json", action="store_true", help="one JSON document for scripts")
    wh.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)

    demo = sub.add_parser("demo", help="run a complete local tailnet with a demo peer and the proxy "
                          "(no root, no network)", description="Start a test control server, a DERP "
                          "relay, a demo peer serving a web page, and the proxy, all on loopback in "
                          "this process; print the commands that reach the peer; Ctrl-C stops and "
                          "removes everything.")
    demo.add_argument("--listen", metavar="ADDR",
                      help="proxy address (default 127.0.0.1:1055, or a free port if that is taken)")
    demo.add_argument("--log-level", choices=options.LOG_LEVELS, default="warning",
                      help="daemon log detail on stderr (default warning)")

    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            return cmd_up(args, argv)
        if args.cmd == "down":
            return cmd_down(args)
        if args.cmd == "status":
            return cmd_status(args)
        if args.cmd == "logout":
            return cmd_logout(args)
        if args.cmd == "nc":
            return cmd_nc(args)
        if args.cmd == "forward":
            return cmd_forward(args, parser)
        if args.cmd == "ping":
            return cmd_ping(args)
        if args.cmd == "whois":
            return cmd_whois(args)
        if args.cmd == "demo":
            from tsproxy.testing import demo
            if args.listen:
                options.parse_listen_addr(args.listen)
            return demo.main(args.listen, args.log_level)
        if args.cmd == "version":
            print(f"{PROG} {__version__}")
            return 0
        parser.print_help()
        return 2
    except TsproxyError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return 130


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1
    if not 0 < v <= 60:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 60, not {text!r}")
    return v


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _state_dir(args) -> str:
    return os.path.abspath(getattr(args, "state_dir", None) or os.environ.get("TSPROXY_STATE_DIR")
                           or statedir.default_state_dir())


def cmd_up(args, argv) -> int:
    from tsproxy.daemon import runtime

    flags = {k: v for k, v in vars(args).items() if k != "cmd"}
    opts = options.merge(flags)
    plan = runtime.prepare(opts)          # every user error surfaces here, before we detach
    if opts.foreground:
        return runtime.run_foreground(plan)
    return _spawn_and_wait(plan, argv)


def _spawn_and_wait(plan, argv) -> int:
    state = plan.state_dir
    if statedir.DaemonLock(state).is_held_elsewhere():
        return _err(f"{state}: a tsproxy daemon is already running with this state dir"
                    " (stop it with 'tsproxy down')")
    logf = statedir.log_path(state)
    with open(logf, "ab", buffering=0) as out:
        os.chmod(logf, 0o600)
        start = out.tell()
        child = subprocess.Popen([sys.executable, "-m", "tsproxy", *argv, "--foreground"],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, close_fds=True)
    sock = statedir.socket_path(state)
    deadline = time.monotonic() + 30
    shown_url = None
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return _err(_last_error(logf, start) or f"the daemon exited with status {child.returncode}"
                        f" (see {logf})")
        try:
            st = ipc.call(sock, {"op": "status"}, timeout=2)
        except (ipc.DaemonNotRunning, OSError, ValueError):
            time.sleep(0.1)
            continue
        if st.get("state") == "Running":
            print(summary_line(st))
            return 0
        url = st.get("auth_url")
        if url and url != shown_url:
            print(f"To authenticate, visit:\n\n\t{url}\n", flush=True)
            shown_url = url
            deadline = float("inf")            # waiting for a person: no time limit
        time.sleep(0.1)
    detail = ""
    try:
        st = ipc.call(sock, {"op": "status"}, timeout=2)
        err = (st.get("control") or {}).get("last_error")
        detail = f" ({st.get('state')}{': ' + err if err else ''})"
    except (ipc.DaemonNotRunning, OSError, ValueError):
        pass
    return _err(f"not up after 30 s{detail}; the daemon keeps trying in the background"
                f" ('tsproxy status' to watch, 'tsproxy down' to stop; log: {logf})")


def _last_error(logf: str, start: int) -> str | None:
    try:
        with open(logf, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith(f"{PROG}: "):
            return line[len(PROG) + 2:]
    return None


def summary_line(st: dict) -> str:
    parts = [f"tsproxy is up: {', '.join(st.get('addresses', []))}"]
    lst = [entry["address"] for entry in st.get("listeners", [])]
    if lst:
        parts.append("proxy on " + ", ".join(lst))
    fws = [f"{f['listen']}->{f['target']}" for f in st.get("forwards", [])]
    if fws:
        parts.append("forwards " + ", ".join(fws))
    if st.get("self"):
        parts[0] = f"tsproxy is up as {st['self']['name']}: {', '.join(st.get('addresses', []))}"
    n = len(st.get("peers", []))
    parts.append(f"{n} peer{'s' if n != 1 else ''}")
    return "; ".join(parts)


def cmd_down(args) -> int:
    resp = ipc.call(statedir.socket_path(_state_dir(args)), {"op": "down"})
    if not resp.get("ok"):
        return _err(resp.get("error", "the daemon refused to stop"))
    print("tsproxy stopped")
    return 0


def cmd_logout(args) -> int:
    resp = ipc.call(statedir.socket_path(_state_dir(args)), {"op": "logout"}, timeout=30)
    if not resp.get("ok"):
        return _err(resp.get("error", "logout failed"))
    if resp.get("warning"):
        print(f"{PROG}: {resp['warning']}", file=sys.stderr)
    print("logged out; tsproxy stopped")
    return 0


def cmd_status(args) -> int:
    st = ipc.call(statedir.socket_path(_state_dir(args)), {"op": "status"})
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(format_status(st))
    return 0


def _ago(seconds) -> str:
    if seconds is None:
        return "never"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s ago"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_status(st: dict) -> str:
    lines = [f"state:     {st.get('state')} ({st.get('mode')})",
             f"addresses: {', '.join(st.get('addresses', []))}"]
    for entry in st.get("listeners", []):
        lines.append(f"listen:    {entry['address']} ({entry['kind']})")
    for f in st.get("forwards", []):
        lines.append(f"forward:   {f['listen']} -> {f['target']}")
    for r in st.get("reverse", []):
        lines.append(f"reverse:   tunnel {r.get('proto', 'tcp')} port {r['tunnel_port']} -> {r['target']}")
    if st.get("mode") == "tailscale":
        ctl = st.get("control") or {}
        lines.append(f"control:   {ctl.get('url')} ({ctl.get('state')}"
                     + (f", last error: {ctl['last_error']}" if ctl.get("last_error") else "") + ")")
        if st.get("self"):
            lines.append(f"name:      {st['self']['name']}")
        lines.append(f"DERP home: {st.get('home_derp') or '-'}")
        if st.get("auth_url"):
            lines.append(f"login:     {st['auth_url']}")
    lines.append("")
    lines.append(f"{'peer':<14} {'path':<28} {'handshake':<12} {'rx':>10} {'tx':>10}")
    for p in st.get("peers", []):
        name = p['name'] + ("" if p.get("online", True) is not False else " (offline)")
        lines.append(f"{name:<14} {str(p.get('path') or p.get('endpoint') or '-'):<28} "
                     f"{_ago(p.get('handshake_age')):<12} {_bytes(p.get('rx_bytes', 0)):>10} "
                     f"{_bytes(p.get('tx_bytes', 0)):>10}")
    return "\n".join(lines)


def cmd_ping(args) -> int:
    sock = statedir.socket_path(_state_dir(args))
    pongs = 0
    for i in range(args.count):
        started = time.monotonic()
        resp = ipc.call(sock, {"op": "ping", "host": args.host, "timeout": args.timeout},
                        timeout=args.timeout + 10)
        if not resp.get("ok"):
            return _err(resp.get("error", "ping failed"))
        who = f"{resp['name']} ({resp['ip']})"
        if resp.get("pong"):
            pongs += 1
            print(f"pong from {who} via {resp['via']} in {resp['latency_ms']:.0f}ms", flush=True)
            if args.until_direct and resp.get("direct"):
                return 0
        else:
            print(f"no pong from {who} within {args.timeout:g} s", flush=True)
        if i + 1 < args.count:
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    if not pongs:
        return _err(f"no reply from {args.host} after {args.count} ping{'s' if args.count > 1 else ''}")
    if args.until_direct:
        return _err(f"{args.host} answered only through DERP after {args.count} pings "
                    "(no direct path yet)")
    return 0


def cmd_whois(args) -> int:
    resp = ipc.call(statedir.socket_path(_state_dir(args)), {"op": "whois", "ip": args.ip})
    if not resp.get("ok"):
        return _err(resp.get("error", "whois failed"))
    if args.json:
        print(json.dumps(resp, indent=2, sort_keys=True))
        return 0
    online = {True: "yes", False: "no", None: "unknown"}[resp.get("online")]
    print("\n".join([f"name:      {resp['fqdn']}" + (" (this node)" if resp.get("self") else ""),
                     f"user:      {resp.get('user') or '-'}",
                     f"tags:      {', '.join(resp.get('tags') or []) or '-'}",
                     f"addresses: {', '.join(resp.get('addresses', []))}",
                     f"online:    {online}" + (" (key expired)" if resp.get("expired") else "")]))
    return 0


def cmd_forward(args, parser) -> int:
    sock = statedir.socket_path(_state_dir(args))
    if args.list:
        resp = ipc.call(sock, {"op": "forward.list"})
        for f in resp.get("forwards", []):
            print(f"{f['listen']} -> {f['target']}")
        return 0
    if args.remove:
        resp = ipc.call(sock, {"op": "forward.remove", "port": args.remove})
    elif args.spec:
        resp = ipc.call(sock, {"op": "forward.add", "spec": args.spec})
    else:
        parser.error("forward needs a SPEC, --list or --remove")
    if not resp.get("ok"):
        return _err(resp.get("error", "failed"))
    if "forward" in resp:
        print(f"{resp['forward']['listen']} -> {resp['forward']['target']}")
    return 0


def cmd_nc(args) -> int:
    resp, s = ipc.request(statedir.socket_path(_state_dir(args)),
                          {"op": "dial", "host": args.host, "port": args.port}, timeout=30)
    if not resp.get("ok"):
        s.close()
        return _err(resp.get("error", "dial failed"))
    s.settimeout(None)
    return _pipe(s, sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno())


def _pipe(s: socket.socket, fd_in: int, fd_out: int) -> int:
    """Copy fd_in -> s and s -> fd_out until the remote side closes; stdin EOF half-closes."""
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ, "sock")
    try:
        sel.register(fd_in, selectors.EVENT_READ, "stdin")
    except (PermissionError, ValueError):
        # regular files cannot be polled: send them whole first
        while data := os.read(fd_in, 65536):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "stdin":
                    data = os.read(fd_in, 65536)
                    if data:
                        s.sendall(data)
                    else:
                        sel.unregister(fd_in)
                        s.shutdown(socket.SHUT_WR)
                else:
                    data = s.recv(65536)
                    if not data:
                        return 0
                    view = memoryview(data)
                    while view:
                        n = os.write(fd_out, view)
                        view = view[n:]
    except (BrokenPipeError, ConnectionResetError):
        return 1
    finally:
        s.close()
