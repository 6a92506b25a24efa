"""Bounded coverage-guided run of every atheris target (fuzz/harness.py) in CI.

Each target runs as a subprocess for a second (TSPROXY_FUZZ_SECONDS) from the seed corpus; a crash,
hang (-timeout) or memory blow-up (-rss_limit_mb) makes libFuzzer exit non-zero and the test
fails with the end of its output and the artifact path.  Without atheris the tests skip
locally but FAIL under CI=true (a missing fuzzer must not pass as a green run).  Two targets
run at a time to keep the whole package near a minute on two cores.
"""

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from fuzz import make_corpus, targets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HARNESS = os.path.join(ROOT, "fuzz", "harness.py")
SECONDS = int(os.environ.get("TSPROXY_FUZZ_SECONDS", "1"))
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None


def _require_atheris():
    if HAVE_ATHERIS:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("atheris is not installed (pip install -e '.[test]'); CI must run the fuzzers")
    pytest.skip("atheris is not installed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    _require_atheris()
    base = tmp_path_factory.mktemp("atheris")
    corpus, artifacts = base / "corpus", base / "artifacts"
    seeds = make_corpus.seeds()
    for name, items in seeds.items():
        (corpus / name).mkdir(parents=True)
        (artifacts / name).mkdir(parents=True)
        for i, data in enumerate(items):
            (corpus / name / f"seed-{i:02d}").write_bytes(data)

    def run(name):
        cmd = [sys.executable, HARNESS, name, f"-max_total_time={SECONDS}", "-timeout=10",
               "-rss_limit_mb=1024", "-max_len=4096", "-print_final_stats=1",
               f"-artifact_prefix={artifacts / name}/", str(corpus / name)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120 + SECONDS)
        return p.returncode, p.stderr + p.stdout, sorted(os.listdir(artifacts / name))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(sorted(targets.TARGETS), pool.map(run, sorted(targets.TARGETS))))


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_atheris_target_survives_a_bounded_run(runs, name):
    rc, out, artifacts = runs[name]
    tail = "\n".join(out.splitlines()[-40:])
    assert rc == 0 and not artifacts, f"atheris {name}: exit {rc}, artifacts {artifacts}\n{tail}"
    executed = [line for line in out.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert executed and int(executed[0].split(":")[-1]) > 50, tail   # it really fuzzed


def test_every_target_has_seeds():
    assert set(make_corpus.seeds()) == set(targets.TARGETS)
