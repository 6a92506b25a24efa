"""Where the third-party peers live, and what a test does when one is missing.

Binaries are looked up in $TSPROXY_BIN_DIR, then the repository's .cache/bin (scripts/test.sh
unpacks sing-box and caddy there), then $PATH.  Under CI=true a missing peer or missing root
fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PeerMissing(RuntimeError):
    pass


def find_binary(name: str) -> str:
    for d in (os.environ.get("TSPROXY_BIN_DIR"), os.path.join(REPO, ".cache", "bin")):
        if d:
            path = os.path.join(d, name)
            if os.access(path, os.X_OK):
                return path
    path = shutil.which(name)
    if path is None:
        raise PeerMissing(f"{name} not found (run scripts/test.sh, which installs the test peers)")
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(*names: str, root: bool = True) -> None:
    """Skip (or, in CI, fail) the calling test unless the peers and root are available."""
    import pytest
    problems = []
    if root and os.geteuid() != 0:
        problems.append("needs root for network namespaces")
    for n in names:
        try:
            find_binary(n)
        except PeerMissing as e:
            problems.append(str(e))
    if problems:
        msg = "; ".join(problems)
        if in_ci():
            pytest.fail(f"interop peer unavailable in CI: {msg}", pytrace=False)
        pytest.skip(msg)


def go_tailscale_env(home: str, logs_dir: str, ca_file: str | None = None,
                     path: str = "/usr/bin:/bin", **extra: str) -> list[str]:
    """The environment every Go Tailscale peer (caddy/tsnet, tailscaled) runs with, as
    `env -i` arguments: no log upload or support reports, a panic instead of ever dialing the
    real control plane, no port mapping, logs kept in the test's directory, and the test CA
    (Go's crypto/x509 reads SSL_CERT_FILE on Linux)."""
    env = {"PATH": path, "HOME": home, "TS_NO_LOGS_NO_SUPPORT": "true",
           "TS_PANIC_IF_HIT_MAIN_CONTROL": "1", "TS_DISABLE_PORTMAPPER": "1",
           "TS_LOGS_DIR": logs_dir}
    if ca_file:
        env["SSL_CERT_FILE"] = ca_file
    clash = sorted(set(extra) & set(env))
    if clash:
        raise ValueError(f"go_tailscale_env: {', '.join(clash)} cannot be overridden")
    env.update(extra)
    return [f"{k}={v}" for k, v in env.items()]


def read_log(path: str) -> str:
    """A peer's log file so far ('' before it exists)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
