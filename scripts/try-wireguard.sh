#!/usr/bin/env bash
# scripts/try-wireguard.sh -- see tsproxy work against a real WireGuard peer, no account needed.
#
# Installs what it needs (as root: wireguard-go, wireguard-tools, iproute2, curl; a .venv
# with tsproxy), starts a real WireGuard peer (wireguard-go + Linux TCP) in a private network
# namespace with a web server behind it, runs `tsproxy up --wg-config` against it in plain
# WireGuard mode with a port forward, and fetches pages through it.  Interactive: stays up
# until Enter so you can try it yourself; otherwise it exits after the demo.  Everything it
# started is stopped and removed on exit.  Needs root (network namespaces, TUN for the peer).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "try-wireguard.sh needs root: it creates a network namespace for the demo peer" >&2; exit 1; }

need=()
for p in wireguard-go wireguard-tools iproute2 curl; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1
.venv/bin/python -m pip install -q -e . >"${TMPDIR:-/tmp}/tsproxy-try-install.log" 2>&1 || {
  echo "installing tsproxy failed; see ${TMPDIR:-/tmp}/tsproxy-try-install.log" >&2; exit 1; }

WORK=$(mktemp -d /tmp/tsproxy-try.XXXXXX)
PEER_PID=""
cleanup() {
  .venv/bin/tsproxy down --state-dir "$WORK/state" >/dev/null 2>&1 || true
  [ -n "$PEER_PID" ] && kill "$PEER_PID" 2>/dev/null && wait "$PEER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== starting a real WireGuard peer (wireguard-go) in a network namespace"
.venv/bin/python -m tsproxy.testing.wgpeer up --state "$WORK/peer" > "$WORK/peer.json" 2> "$WORK/peer.log" &
PEER_PID=$!
for _ in $(seq 100); do [ -s "$WORK/peer.json" ] && break; sleep 0.1; done
[ -s "$WORK/peer.json" ] || { cat "$WORK/peer.log" >&2; exit 1; }
CONF=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['client_conf'])" "$WORK/peer.json")

echo "== tsproxy up --wg-config $CONF --forward 8080:100.64.0.2:80"
.venv/bin/tsproxy up --wg-config "$CONF" --state-dir "$WORK/state" --listen off \
  --forward 8080:100.64.0.2:80 --forward '8081:[fd7a:115c:a1e0::2]:80'
echo
echo "== curl http://127.0.0.1:8080/   (IPv4 through the tunnel)"
curl -sS http://127.0.0.1:8080/
echo "== curl http://127.0.0.1:8081/   (IPv6 through the tunnel)"
curl -sS http://127.0.0.1:8081/
echo "== 50 MB download through our pure-Python WireGuard + TCP/IP stack"
curl -sS -o /dev/null -w '   %{size_download} bytes at %{speed_download} B/s\n' http://127.0.0.1:8080/bytes/50000000
echo
.venv/bin/tsproxy status --state-dir "$WORK/state"
if [ -t 0 ]; then
  echo
  echo "Try it:  curl http://127.0.0.1:8080/      .venv/bin/tsproxy status --state-dir $WORK/state"
  read -r -p "Press Enter to stop everything... " _
fi
