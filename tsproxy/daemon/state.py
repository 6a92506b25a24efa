"""Persisted control identity: machine key, node key, old node key, stable node ID, login.

One JSON file `control-state.json` in the state dir (dir 0700, file 0600), replaced atomically
(write tmp in the same dir, fsync, rename, fsync the dir).  A file that exists but cannot be
read or parsed is a ConfigError naming the file: we never silently mint a new identity, which
would orphan the registered node.  The disco key is never stored (fresh per process, as Go).
With `ephemeral=True` nothing touches the disk.

    {"version": 1, "machine_key": "privkey:<hex>", "node_key": "privkey:<hex>" | null,
     "old_node_key": "privkey:<hex>" | null, "node_id": "", "login_name": "", "user_id": 0}
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field

from tsproxy.daemon import statedir
from tsproxy.errors import ConfigError
from tsproxy.keys import DiscoPrivate, MachinePrivate, NodePrivate

STATE_FILE = "control-state.json"
FORMAT_VERSION = 1
MAX_STATE_FILE = 1 << 20


@dataclass
class ControlIdentity:
    machine_key: MachinePrivate
    node_key: NodePrivate | None = None          # None until the first successful register
    old_node_key: NodePrivate | None = None
    node_id: str = ""                             # StableNodeID of self
    login_name: str = ""
    user_id: int = 0
    disco_key: DiscoPrivate = field(default=None, repr=False)  # type: ignore[assignment]

    def __repr__(self) -> str:   # keys are redacted by their own repr; keep it short anyway
        return (f"ControlIdentity(machine={self.machine_key.public().short()}, "
                f"node={'-' if self.node_key is None else self.node_key.public().short()}, "
                f"node_id={self.node_id!r})")


def _key_text(k) -> str | None:
    return None if k is None else k.text()


class StateStore:
    """Load/save a ControlIdentity.  `state_dir=None` or `ephemeral=True` keeps it in memory."""

    def __init__(self, state_dir: str | None, *, ephemeral: bool = False, rng=os.urandom):
        self.ephemeral = ephemeral or state_dir is None
        self.path = None if self.ephemeral else os.path.join(state_dir, STATE_FILE)
        self._dir = state_dir
        self._rng = rng
        self._mem: ControlIdentity | None = None

    def load(self) -> ControlIdentity:
        """The stored identity, or a new one (saved at once) if there is no file yet.
        Always with a fresh disco key."""
        if self.ephemeral:
            if self._mem is None:
                self._mem = ControlIdentity(MachinePrivate.generate(self._rng))
            ident = self._mem
        else:
            ident = self._read()
            if ident is None:
                ident = ControlIdentity(MachinePrivate.generate(self._rng))
                self.save(ident)
        ident.disco_key = DiscoPrivate.generate(self._rng)
        return ident

    def _read(self) -> ControlIdentity | None:
        path = self.path
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(f"cannot read state file ({e.strerror}); fix or remove it",
                              path=path) from None
        try:
            statedir.check_private_file(fd, path)
        except ConfigError:
            os.close(fd)
            raise
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_STATE_FILE + 1)
        except OSError as e:
            raise ConfigError(f"cannot read state file ({e.strerror})", path=path) from None
        bad = ConfigError("state file is corrupt; restore it from a backup or remove it to "
                          "register as a new node", path=path)
        if len(data) > MAX_STATE_FILE:
            raise bad
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
                raise ValueError
            ident = ControlIdentity(MachinePrivate.from_text(obj["machine_key"]))
            if obj.get("node_key") is not None:
                ident.node_key = NodePrivate.from_text(obj["node_key"])
            if obj.get("old_node_key") is not None:
                ident.old_node_key = NodePrivate.from_text(obj["old_node_key"])
            ident.node_id = str(obj.get("node_id") or "")
            ident.login_name = str(obj.get("login_name") or "")
            ident.user_id = int(obj.get("user_id") or 0)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise bad from None
        return ident

    def save(self, ident: ControlIdentity) -> None:
        if self.ephemeral:
            self._mem = ident
            return
        body = json.dumps({
            "version": FORMAT_VERSION,
            "machine_key": ident.machine_key.text(),
            "node_key": _key_text(ident.node_key),
            "old_node_key": _key_text(ident.old_node_key),
            "node_id": ident.node_id,
            "login_name": ident.login_name,
            "user_id": ident.user_id,
        }, indent=1).encode()
        self._atomic_write(body)

    def clear_node(self, ident: ControlIdentity) -> None:
        """After logout: forget node keys and login, keep the machine key (as Go)."""
        ident.node_key = None
        ident.old_node_key = None
        ident.node_id = ""
        ident.login_name = ""
        ident.user_id = 0
        self.save(ident)

    def _atomic_write(self, body: bytes) -> None:
        path = self.path
        d = self._dir
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            if stat.S_IMODE(os.stat(d).st_mode) & 0o077:
                os.chmod(d, 0o700)
            tmp = f"{path}.tmp.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                         0o600)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(body)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass
            raise ConfigError(f"cannot write state file ({e.strerror})", path=path) from None
