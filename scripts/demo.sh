#!/usr/bin/env bash
# scripts/demo.sh -- no root, no network: make .venv with tsproxy in it, then run `tsproxy demo`
# (a test control server, a DERP relay, a demo peer and the proxy, all on loopback in one
# process). It prints the curl/status/ping commands to try; Ctrl-C stops it and removes its state.
# Extra arguments go to `tsproxy demo` (e.g. --listen 127.0.0.1:1080).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TSPROXY_VENV:-.venv}

log() { printf '[demo.sh] %s\n' "$*" >&2; }

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  log "tsproxy needs Python 3.11 or newer ($PY is $("$PY" -V 2>&1)); set PYTHON=/path/to/python3.11"
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import tsproxy.testing.demo' 2>/dev/null; then
  log "installing tsproxy into $VENV"
  "$VENV/bin/python" -m pip install -q -e .
fi
exec "$VENV/bin/tsproxy" demo "$@"
