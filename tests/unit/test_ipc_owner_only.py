"""The control socket is usable only by its owner: the socket file is 0600 inside the 0700 state
dir, and the server checks SO_PEERCRED so a connection from another uid that gets past the file
modes is dropped (counted) without an answer.  The other user is a child that setuid()s to nobody."""

import asyncio
import os
import stat
import socket
import tempfile

import pytest

from tsproxy.daemon import ipc, statedir

NOBODY = 65534


def _client(path: str) -> str:
    """Connect, send one request, read to EOF; returns what happened as one word line."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError as e:
        return f"REFUSED {type(e).__name__}"
    with s:
        s.settimeout(20)
        data = b""
        try:
            s.sendall(b'{"op": "status"}\n')
            while chunk := s.recv(4096):
                data += chunk
        except (BrokenPipeError, ConnectionResetError):     # the server dropped us first
            pass
    return "REPLY " + (data.decode(errors="replace").strip() or "<eof>")


def _forked_client(path: str, uid: int | None) -> str:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                      # child: drop to uid, then connect
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.write(w, _client(path).encode())
        except BaseException as e:
            os.write(w, f"CHILD ERROR {e!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def _need_root():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true runs as root: setuid to nobody needs it")
        pytest.skip("needs root to run a client as another user (setuid nobody)")


async def handler(request, reader, writer):
    return {"ok": True, "state": "Running"}


async def run_client(path, user=None):
    return await asyncio.wait_for(asyncio.to_thread(_forked_client, path, user), 30)


async def test_socket_is_0600_in_a_0700_dir_and_another_user_cannot_connect(tmp_path):
    _need_root()
    d = statedir.ensure_state_dir(str(tmp_path / "st"))
    srv = ipc.IpcServer(statedir.socket_path(d), handler)
    await srv.start()
    try:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
        assert (await run_client(srv.path)).startswith('REPLY {"ok": true')
        assert await run_client(srv.path, user=NOBODY) == "REFUSED PermissionError"
        # even with the directory open, the 0600 file keeps nobody out
        os.chmod(d, 0o711)
        assert await run_client(srv.path, user=NOBODY) == "REFUSED PermissionError"
    finally:
        await srv.aclose()


async def test_peer_uid_checked_when_file_modes_are_loosened():
    _need_root()
    d = tempfile.mkdtemp(prefix="tsproxy-ipc-")       # not under pytest's 0700 tmp tree
    try:
        os.chmod(d, 0o711)
        srv = ipc.IpcServer(os.path.join(d, statedir.SOCKET_NAME), handler)
        await srv.start()
        try:
            os.chmod(srv.path, 0o666)                 # what a careless umask or chmod would leave
            assert await run_client(srv.path, user=NOBODY) == "REPLY <eof>"
            assert srv.counters["peer_uid_rejected"] == 1
            assert (await run_client(srv.path)).startswith('REPLY {"ok": true')
            assert srv.counters["peer_uid_rejected"] == 1
        finally:
            await srv.aclose()
    finally:
        os.rmdir(d)
