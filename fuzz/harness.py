"""atheris (libFuzzer) harness: `python fuzz/harness.py TARGET [libFuzzer flags] [CORPUS...]`.

TARGET is a name from fuzz/targets.py (`--list` prints them).  tsproxy's modules are
instrumented for coverage; a target that raises anything but its documented errors, hangs
past -timeout, or grows past -rss_limit_mb is a crash and libFuzzer writes the input to
crash-*/timeout-*/oom-* (under -artifact_prefix).  fuzz/run.sh wraps this with the seed corpus.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.setrecursionlimit(1000)        # the default; a target must not rely on a larger one

import atheris  # noqa: E402

with atheris.instrument_imports(include=["tsproxy"]):
    import tsproxy.control.messages  # noqa: F401,E402  (imported for instrumentation)
    import tsproxy.control.netmap  # noqa: F401,E402
    import tsproxy.control.noiseconn  # noqa: F401,E402
    import tsproxy.control.wire  # noqa: F401,E402
    import tsproxy.daemon.ipc  # noqa: F401,E402
    import tsproxy.daemon.options  # noqa: F401,E402
    import tsproxy.daemon.wgconf  # noqa: F401,E402
    import tsproxy.derp.client  # noqa: F401,E402
    import tsproxy.derp.wire  # noqa: F401,E402
    import tsproxy.disco.stun  # noqa: F401,E402
    import tsproxy.disco.wire  # noqa: F401,E402
    import tsproxy.dns.message  # noqa: F401,E402
    import tsproxy.netstack.stack  # noqa: F401,E402
    import tsproxy.netstack.tcp  # noqa: F401,E402
    import tsproxy.noise.ik  # noqa: F401,E402
    import tsproxy.proxy.http  # noqa: F401,E402
    import tsproxy.proxy.socks5  # noqa: F401,E402
    import tsproxy.wg.device  # noqa: F401,E402

from fuzz.targets import TARGETS  # noqa: E402


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        if len(sys.argv) >= 2 and sys.argv[1] == "--list":
            print("\n".join(TARGETS))
            return
        sys.exit(f"usage: {sys.argv[0]} TARGET [libFuzzer flags] [CORPUS...]; targets: "
                 + " ".join(TARGETS))
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
