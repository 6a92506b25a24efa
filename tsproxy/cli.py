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
                    help="allow a proxy listener or forward on a non-loopback address without "
                         "--proxy-user (forwards never authenticate, so they always need it)")
    up.add_argument("--forward", metavar="[udp:]LPORT:HOST:PORT", action="append", default=[],
                    help="forward 127.0.0.1:LPORT to HOST:PORT through the tunnel (repeatable)")
    up.add_argument("--reverse", metavar="[udp:]TPORT:LOCALHOST:LPORT", action="append", default=[],
                    help="accept tunnel connections to our address on TPORT and connect them to "
                    "LOCALHOST:LPORT (repeatable)")
    up.add_argument("--non-tailnet", choices=options.NON_TAILNET_POLICIES,
                    help="destinations outside the tunnel without an exit node: direct (dial from "
                    "this host, the default), refuse (SOCKS 0x02 / HTTP 403), or exit-node (only "
                    "ever through the selected --exit-node: refused while none is selected)")
    up.add_argument("--exit-node", metavar="NAME|IP",
                    help="send destinations outside the tailnet, and the DNS lookups of names "
                    "outside it, through this peer (it must offer 0.0.0.0/0 and ::/0); if it is "
                    "offline or missing they fail, never go direct. Change it later with "
                    "'tsproxy set --exit-node'")
    up.add_argument("--exit-node-allow-lan-access", action="store_true", default=False,
                    help="with --exit-node: private and link-local addresses (10/8, 172.16/12, "
                    "192.168/16, 169.254/16, fc00::/7, fe80::/10) follow --non-tailnet instead")
    up.add_argument("--accept-routes", action="store_true", default=False,
                    help="use the subnet routes peers advertise (as tailscale up --accept-routes)")
    up.add_argument("--state-dir", metavar="DIR", help="state directory (default $XDG_STATE_HOME/tsproxy)")
    up.add_argument("--config", metavar="FILE", help="TOML config file (default $XDG_CONFIG_HOME/tsproxy/config.toml)")
    up.add_argument("--foreground", action="store_true", default=False, help="run in this terminal")
    up.add_argument("--log-level", choices=options.LOG_LEVELS, help="daemon log detail (default info)")
    up.add_argument("--log-format", choices=options.LOG_FORMATS,
                    help="daemon log lines as text (default) or one JSON object per line")
    up.add_argument("--metrics", metavar="ADDR",
                    help="serve Prometheus /metrics, /healthz and /readyz on ADDR (PORT alone means "
                    "127.0.0.1:PORT)")

    for name, text in (("down", "stop the daemon"), ("status", "show the daemon's state, peers and listeners"),
                       ("logout", "log the node out of the tailnet (forget its keys) and stop the daemon")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)
        if name == "status":
            sp.add_argument("--json", action="store_true", help="one JSON document for scripts")

    st = sub.add_parser("set", help="change the running daemon's exit node or routes",
                        description="Change settings of the running daemon without a restart "
                        "(Tailscale mode). Only the settings given change.")
    st.add_argument("--exit-node", metavar="NAME|IP",
                    help="use this peer as the exit node; \"\" to stop using one")
    st.add_argument("--exit-node-allow-lan-access", metavar="true|false", type=_bool,
                    help="leave private and link-local addresses to --non-tailnet")
    st.add_argument("--accept-routes", metavar="true|false", type=_bool,
                    help="use the subnet routes peers advertise")
    st.add_argument("--json", action="store_true", help="one JSON document for scripts")
    st.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)

    nc = sub.add_parser("nc", help="connect stdin/stdout to HOST:PORT through the daemon (ssh ProxyCommand)",
                        description="Connect stdin/stdout to HOST:PORT through the running daemon "
                        "(ssh -o ProxyCommand='tsproxy nc %%h %%p' peer-a).")
    nc.add_argument("host", metavar="HOST", help="tailnet name, MagicDNS FQDN or IP address")
    nc.add_argument("port", metavar="PORT", type=_port, help="TCP port (1-65535)")
    nc.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)

    fw = sub.add_parser("forward", help="add, list or remove port forwards on the running daemon",
                        description="Add a forward from 127.0.0.1:LPORT (or [ADDR:]LPORT) to HOST:PORT "
                        "on the tailnet, list them, or remove one.")
    fw.add_argument("spec", nargs="?", metavar="[udp:]LPORT:HOST:PORT",
                    help="listen on LPORT and forward each connection (or UDP datagrams) to HOST:PORT")
    fw.add_argument("--list", action="store_true", help="list the daemon's forwards")
    fw.add_argument("--remove", metavar="[udp:]LPORT", help="remove the forward listening on LPORT")
    fw.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)

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

    nk = sub.add_parser("netcheck", help="check UDP, the STUN-mapped addresses and the latency to "
                        "every DERP region", description="Measure, from this host, whether UDP gets "
                        "out, our STUN-mapped IPv4/IPv6 addresses, and the latency to each DERP "
                        "region of the tailnet's DERP map (progress on stderr).")
    nk.add_argument("--json", action="store_true", help="one JSON document for scripts")
    nk.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)

    demo = sub.add_parser("demo", help="run a complete local tailnet with a demo peer and the proxy "
                          "(no root, no network)", description="Start a test control server, a DERP "
                          "relay, a demo peer serving a web page, and the proxy, all on loopback in "
                          "this process; print the commands that reach the peer; Ctrl-C stops and "
                          "removes everything.")
    demo.add_argument("--listen", metavar="ADDR",
                      help="proxy address (default 127.0.0.1:1055, or a free port if that is taken)")
    demo.add_argument("--log-level", choices=options.LOG_LEVELS, default="warning",
                      help="daemon log detail on stderr (default warning)")

    sub.add_parser("version", help="print the version", description="Print the version.")
    p.sub = sub
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:       # the sub-command's own usage, not the top-level one
            (parser.sub.choices.get(args.cmd) or parser).error(
                f"unrecognized arguments: {' '.join(extra)}")
        rc = _dispatch(parser, args)
        sys.stdout.flush()          # a reader that left shows up here, not at interpreter exit
        return rc
    except TsproxyError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `tsproxy status | head -1`: the reader left; no traceback, and none at exit either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _dispatch(parser, args) -> int:
    if args.cmd == "up":
        return cmd_up(args, parser.sub.choices["up"])
    if args.cmd == "down":
        return cmd_down(args)
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "logout":
        return cmd_logout(args)
    if args.cmd == "nc":
        return cmd_nc(args)
    if args.cmd == "set":
        return cmd_set(args, parser.sub.choices["set"])
    if args.cmd == "forward":
        return cmd_forward(args, parser)
    if args.cmd == "ping":
        return cmd_ping(args)
    if args.cmd == "whois":
        return cmd_whois(args)
    if args.cmd == "netcheck":
        return cmd_netcheck(args)
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


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port 1-65535, not {text!r}")
    return int(text)


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "yes", "on", "1"):
        return True
    if t in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


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


AUTH_KEY_FD_ENV = "TSPROXY_AUTH_KEY_FD"     # the detached daemon reads its auth key from this pipe


def cmd_up(args, up_parser) -> int:
    from tsproxy.daemon import runtime

    flags = {k: v for k, v in vars(args).items() if k != "cmd"}
    if AUTH_KEY_FD_ENV in os.environ:
        flags["auth_key"] = _read_secret_fd(os.environ.pop(AUTH_KEY_FD_ENV))
    opts = options.merge(flags)
    plan = runtime.prepare(opts)          # every user error surfaces here, before we detach
    if opts.foreground:
        return runtime.run_foreground(plan)
    return _spawn_and_wait(plan, _child_argv(up_parser, args, plan.state_dir))


def _read_secret_fd(text: str) -> str:
    try:
        fd = int(text)
        with os.fdopen(fd, "rb") as f:
            return f.read(64 * 1024).decode().strip()
    except (ValueError, OSError) as e:
        raise TsproxyError(f"{AUTH_KEY_FD_ENV}: cannot read the auth key ({e})") from None


def _child_argv(up_parser, args, state_dir: str) -> list[str]:
    """The detached daemon's `up --foreground` flags, rebuilt from the parsed ones with the auth
    key left out (it goes through a pipe: a command line is readable by every local user)."""
    out = ["up", "--foreground", "--state-dir", state_dir]
    for action in up_parser._actions:
        if not action.option_strings or action.dest in ("help", "auth_key", "foreground", "state_dir"):
            continue
        value, flag = getattr(args, action.dest, None), action.option_strings[-1]
        if action.nargs == 0:
            out += [flag] if value else []
        elif isinstance(value, list):
            if action.dest == "advertise_tags":
                out += [flag, ",".join(value)] if value else []
            else:
                for v in value:
                    out += [flag, v]
        elif value is not None:
            out += [flag, str(value)]
    return out


def _spawn_and_wait(plan, child_args) -> int:
    state = plan.state_dir
    if statedir.DaemonLock(state).is_held_elsewhere():
        return _err(f"{state}: a tsproxy daemon is already running with this state dir"
                    " (stop it with 'tsproxy down')")
    logf = statedir.log_path(state)
    with open(logf, "ab", buffering=0) as out:
        os.chmod(logf, 0o600)
        start = out.tell()
        env = {k: v for k, v in os.environ.items() if k not in ("TS_AUTHKEY", "TSPROXY_AUTH_KEY")}
        fds = ()
        if plan.auth_key:
            rfd, wfd = os.pipe()
            os.write(wfd, plan.auth_key.encode())    # a key is far below the pipe buffer
            os.close(wfd)
            env[AUTH_KEY_FD_ENV], fds = str(rfd), (rfd,)
        try:
            child = subprocess.Popen([sys.executable, "-m", "tsproxy", *child_args],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                     start_new_session=True, close_fds=True, pass_fds=fds)
        finally:
            for fd in fds:
                os.close(fd)
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


def cmd_set(args, set_parser) -> int:
    req = {"op": "set"}
    if args.exit_node is not None:
        req["exit_node"] = options.check_exit_node(args.exit_node) if args.exit_node.strip() else ""
    if args.exit_node_allow_lan_access is not None:
        req["exit_node_allow_lan_access"] = args.exit_node_allow_lan_access
    if args.accept_routes is not None:
        req["accept_routes"] = args.accept_routes
    if len(req) == 1:
        set_parser.error("nothing to set; give --exit-node, --exit-node-allow-lan-access or "
                         "--accept-routes")
    resp = ipc.call(statedir.socket_path(_state_dir(args)), req)
    if not resp.get("ok"):
        return _err(resp.get("error", "the daemon refused the change"))
    if args.json:
        print(json.dumps(resp, indent=2, sort_keys=True))
        return 0
    print(exit_node_line(resp.get("routing") or {}))
    ex = (resp.get("routing") or {}).get("exit_node")
    if ex and not ex.get("usable"):
        print(f"{PROG}: warning: {ex.get('problem')}; destinations outside the tailnet fail "
              "until it is usable", file=sys.stderr)
    return 0


def exit_node_text(routing: dict) -> str:
    """`tsd (100.64.0.5) in use` / `none (outside the tailnet: --non-tailnet refuse)`."""
    ex = routing.get("exit_node")
    if not ex:
        return f"none (outside the tailnet: --non-tailnet {routing.get('policy', '?')})"
    what = ex.get("name") or ex.get("selected")
    addr = f" ({', '.join(ex['addresses'])})" if ex.get("addresses") else ""
    state = "in use" if ex.get("usable") else f"NOT usable: {ex.get('problem')}"
    lan = ", LAN addresses follow --non-tailnet" if routing.get("allow_lan_access") else ""
    return f"{what}{addr} {state}{lan}"


def exit_node_line(routing: dict) -> str:
    routes = "accepting subnet routes" if routing.get("accept_routes") else "not accepting subnet routes"
    return f"exit node: {exit_node_text(routing)}; {routes}"


def summary_line(st: dict) -> str:
    parts = [f"tsproxy is up: {', '.join(st.get('addresses', []))}"]
    lst = [entry["address"] for entry in st.get("listeners", [])]
    if lst:
        parts.append("proxy on " + ", ".join(lst))
    fws = [f"{_fw_listen(f)}->{f['target']}" for f in st.get("forwards", [])]
    if fws:
        parts.append("forwards " + ", ".join(fws))
    if st.get("self"):
        parts[0] = f"tsproxy is up as {st['self']['name']}: {', '.join(st.get('addresses', []))}"
    peers = st.get("peers", [])
    n = sum(1 for p in peers if p.get("online") is not False and not p.get("expired"))
    parts.append(f"{n} peer{'s' if n != 1 else ''}" + (" online" if st.get("self") else ""))
    return "; ".join(parts)


def _fw_listen(f: dict) -> str:
    return ("udp:" if f.get("proto") == "udp" else "") + f["listen"]


DOWN_WAIT = 20.0


def cmd_down(args) -> int:
    state = _state_dir(args)
    sock = statedir.socket_path(state)
    pid = ipc.call(sock, {"op": "status"}).get("pid")
    resp = ipc.call(sock, {"op": "down"})
    if not resp.get("ok"):
        return _err(resp.get("error", "the daemon refused to stop"))
    deadline = time.monotonic() + DOWN_WAIT
    while _daemon_alive(state, pid):
        if time.monotonic() > deadline:
            return _err(f"the daemon (pid {pid}) is still shutting down after {DOWN_WAIT:.0f} s")
        time.sleep(0.05)
    print("tsproxy stopped")
    return 0


def _daemon_alive(state: str, pid) -> bool:
    """The daemon holds its state-dir lock until it exits; then its pid is gone (or a zombie)."""
    if statedir.DaemonLock(state).is_held_elsewhere():
        return True
    if not isinstance(pid, int):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


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
    if st.get("metrics"):
        lines.append(f"metrics:   http://{st['metrics']}/metrics")
    for f in st.get("forwards", []):
        lines.append(f"forward:   {_fw_listen(f)} -> {f['target']}"
                     + (f" (last error: {f['last_error']})" if f.get("last_error") else ""))
    for r in st.get("reverse", []):
        lines.append(f"reverse:   tunnel {r.get('proto', 'tcp')} port {r['tunnel_port']} -> {r['target']}")
    if st.get("mode") == "tailscale":
        ctl = st.get("control") or {}
        lines.append(f"control:   {ctl.get('url')} ({ctl.get('state')}"
                     + (f", last error: {ctl['last_error']}" if ctl.get("last_error") else "") + ")")
        if st.get("self"):
            lines.append(f"name:      {st['self']['name']}")
        lines.append(f"DERP home: {st.get('home_derp') or '-'}")
        routing = st.get("routing") or {}
        if routing:
            lines.append(f"exit node: {exit_node_text(routing)}")
            for sub_ in routing.get("subnets", []):
                lines.append(f"route:     {sub_}")
        if st.get("auth_url"):
            lines.append(f"login:     {st['auth_url']}")
    lines.append("")
    rows = [("peer", "path", "handshake", "rx", "tx")]
    for p in st.get("peers", []):
        name = p['name'] + ("" if p.get("online", True) is not False else " (offline)")
        rows.append((name, str(p.get("path") or p.get("endpoint") or "-"), _ago(p.get("handshake_age")),
                     _bytes(p.get("rx_bytes", 0)), _bytes(p.get("tx_bytes", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:      # columns as wide as their widest cell: long names never shift the rest
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  "
                     f"{r[3]:>{max(widths[3], 8)}}  {r[4]:>{max(widths[4], 8)}}".rstrip())
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


def cmd_netcheck(args) -> int:
    sock = statedir.socket_path(_state_dir(args))
    info = ipc.call(sock, {"op": "netcheck.regions"})
    if not info.get("ok"):
        return _err(info.get("error", "netcheck failed"))
    regions, results = info["regions"], {}
    for i, r in enumerate(regions, 1):
        label = f"{r['id']}" + (f" ({r['code'] or r['name']})" if r['code'] or r['name'] else "")
        print(f"measuring DERP region {label} [{i}/{len(regions)}]...", end="", file=sys.stderr,
              flush=True)
        res = ipc.call(sock, {"op": "netcheck.probe", "region": r["id"]}, timeout=30)
        if not res.get("ok"):
            print("", file=sys.stderr)
            return _err(res.get("error", "netcheck failed"))
        results[r["id"]] = res
        best = min((x["latency_ms"] for x in (res["v4"], res["v6"]) if x), default=None)
        print(f" {best:.1f}ms" if best is not None else " no answer", file=sys.stderr, flush=True)
    report = _netcheck_report(regions, results, info.get("home"))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_netcheck(report))
    return 0


def _netcheck_report(regions, results, home) -> dict:
    def first(fam):
        for r in regions:
            x = results[r["id"]][fam]
            if x:
                return x["mapped"]
        return None
    lat = {}
    for r in regions:
        vals = [x["latency_ms"] for x in (results[r["id"]]["v4"], results[r["id"]]["v6"]) if x]
        lat[r["id"]] = min(vals) if vals else None
    answered = {rid: v for rid, v in lat.items() if v is not None}
    names = {r["id"]: r["code"] or r["name"] or "" for r in regions}
    return {"udp": bool(answered), "ipv4": first("v4"), "ipv6": first("v6"),
            "preferred_derp": min(answered, key=answered.get) if answered else None,
            "home_derp": home, "derp_latency_ms": lat, "region_names": names}


def format_netcheck(rep: dict) -> str:
    names = rep["region_names"]
    lines = ["Report:",
             f"\t* UDP: {'true' if rep['udp'] else 'false'}",
             "\t* IPv4: " + (f"yes, {rep['ipv4']}" if rep["ipv4"] else "(no STUN answer)"),
             "\t* IPv6: " + (f"yes, {rep['ipv6']}" if rep["ipv6"] else "no"),
             "\t* Nearest DERP: " + (f"{rep['preferred_derp']}" + (
                 f" ({names[rep['preferred_derp']]})" if names.get(rep['preferred_derp']) else "")
                 if rep["preferred_derp"] is not None else "none answered"),
             f"\t* DERP home now: {rep['home_derp'] or '-'}",
             "\t* DERP latency:"]
    order = sorted(rep["derp_latency_ms"].items(), key=lambda kv: (kv[1] is None, kv[1] or 0))
    for rid, ms in order:
        name = f" ({names[rid]})" if names.get(rid) else ""
        lines.append(f"\t\t- {rid}: " + (f"{ms:.1f}ms" if ms is not None else "no answer") + name)
    return "\n".join(lines)


def cmd_forward(args, parser) -> int:
    sock = statedir.socket_path(_state_dir(args))
    if args.list:
        resp = ipc.call(sock, {"op": "forward.list"})
        for f in resp.get("forwards", []):
            print(f"{_fw_listen(f)} -> {f['target']}"
                  + (f" (last error: {f['last_error']})" if f.get("last_error") else ""))
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
        print(f"{_fw_listen(resp['forward'])} -> {resp['forward']['target']}")
    if resp.get("warning"):
        print(f"{PROG}: warning: {resp['warning']}", file=sys.stderr)
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
