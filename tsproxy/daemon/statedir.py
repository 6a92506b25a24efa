"""The state directory: where the daemon keeps its lock, control socket, log and keys.

`$XDG_STATE_HOME/tsproxy` (default `~/.local/state/tsproxy`) or `--state-dir`.  The directory is
made 0700; an existing one with looser bits is tightened with a warning when we own it and
refused when another user owns it (they could read or swap our keys).  Key files get the same
rule at 0600 (`check_private_file`).  One daemon per directory, enforced by an flock on
`daemon.lock` that the kernel drops however the process dies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat

from tsproxy.errors import ConfigError

SOCKET_NAME = "tsproxy.sock"
LOCK_NAME = "daemon.lock"
LOG_NAME = "tsproxy.log"
log = logging.getLogger(__name__)


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "tsproxy")


def ensure_state_dir(path: str) -> str:
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError("state dir is not a directory", path=path)
        _owned_and_private(st, path, 0o700, "state dir", lambda m: os.chmod(path, m))
    except OSError as e:
        raise ConfigError(f"cannot use state dir ({e.strerror})", path=path) from None
    return path


def check_private_file(fd: int, path: str) -> None:
    """A key file (open as `fd`) must be ours and 0600: looser bits are tightened with a warning,
    another owner is refused."""
    try:
        _owned_and_private(os.fstat(fd), path, 0o600, "key file", lambda m: os.fchmod(fd, m))
    except OSError as e:
        raise ConfigError(f"cannot secure key file ({e.strerror})", path=path) from None


def _owned_and_private(st: os.stat_result, path: str, mode: int, what: str, chmod) -> None:
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{what} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); "
                          "refusing to keep secrets there: use your own --state-dir", path=path)
    loose = stat.S_IMODE(st.st_mode) & 0o077
    if loose:
        log.warning("%s %s was mode %03o (readable by others): tightened to %03o",
                    what, path, stat.S_IMODE(st.st_mode), mode)
        chmod(mode)


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


def log_path(state_dir: str) -> str:
    return os.path.join(state_dir, LOG_NAME)


class DaemonLock:
    """Exclusive, non-blocking flock held for the daemon's lifetime."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("a tsproxy daemon is already running with this state dir"
                              " (stop it with 'tsproxy down')", path=os.path.dirname(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def is_held_elsewhere(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
