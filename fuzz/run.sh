#!/bin/sh
# Coverage-guided fuzzing of one target: fuzz/run.sh TARGET SECONDS [extra libFuzzer flags]
#   fuzz/run.sh --list               the targets
# The seed corpus is (re)generated under fuzz/corpus/TARGET from valid messages; inputs the
# fuzzer finds interesting are added there; crashes, timeouts and OOMs land in
# fuzz/artifacts/TARGET/ (exit status non-zero).  PYTHON overrides the interpreter.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
if [ "${1:-}" = "--list" ]; then exec "$py" "$here/harness.py" --list; fi
if [ $# -lt 2 ]; then echo "usage: $0 TARGET SECONDS [libFuzzer flags]" >&2; exit 2; fi
target=$1; seconds=$2; shift 2
"$py" "$here/make_corpus.py" "$here/corpus" >/dev/null
mkdir -p "$here/artifacts/$target"
# -timeout: one input over 10 s is a hang; -rss_limit_mb bounds memory; -max_len keeps
# inputs packet-sized (the netstack/WireGuard targets split an input into several packets).
exec "$py" "$here/harness.py" "$target" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -artifact_prefix="$here/artifacts/$target/" -print_final_stats=1 "$@" \
    "$here/corpus/$target"
