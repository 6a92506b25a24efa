"""Run the tsproxy CLI with WireGuard's rekey interval shortened, so a short test crosses several
rekeys (tests and soak benches only; nothing in the product reads this):

    python -m tsproxy.testing.fastrekey SECONDS up --foreground --wg-config ...

REKEY_AFTER_TIME (120 s in the protocol) becomes SECONDS: the initiator of the current keypair
starts a new handshake when it sends on a keypair older than that.  The reject and keepalive
timers stay as they are.  Fails loudly if the WireGuard code no longer reads the constant where
this hook sets it, rather than silently running with the real timers.
"""

from __future__ import annotations

import os
import sys


def apply(seconds: float) -> None:
    from tsproxy.wg import constants, peer
    if not hasattr(peer, "REKEY_AFTER_TIME"):
        raise SystemExit("fastrekey: tsproxy.wg.peer no longer reads REKEY_AFTER_TIME; update the hook")
    constants.REKEY_AFTER_TIME = peer.REKEY_AFTER_TIME = float(seconds)


def main(argv: list[str]) -> None:
    """Set the timer, then run `python -m tsproxy ARGS...` in this process (runpy: the program
    as a user starts it, so the testing layer does not import the CLI)."""
    if not argv:
        raise SystemExit(__doc__)
    apply(float(argv[0]))
    if os.environ.get("TSPROXY_SOAK_TRACE"):
        from tsproxy.testing import soaktrace
        soaktrace.install(os.environ["TSPROXY_SOAK_TRACE"])
    import runpy
    sys.argv = ["tsproxy", *argv[1:]]
    runpy.run_module("tsproxy", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
