"""suites/kselftest_kvm for real: Debian's linux-source-6.12 tree, the PMU selftests built from it,
run on this machine, and the suite submitted through the farm (redis, Celery worker, store, JUnit).

The tree is fetched by the project itself (``agent.upstream.fetch_linux_source``: ``apt-get
download``, nothing installed, only the parts the build reads unpacked, cached under
~/.cache/pmufarm); a test skips only when that is impossible here, and says why. Cold: ~12 s to
unpack, ~14 s to build (bench/kselftest_build.py measures it).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from junitparser import JUnitXml

from agent import ktap, upstream
from agent.facts import collect_facts
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def debian_tree() -> Path:
    try:
        return upstream.fetch_linux_source()
    except upstream.UpstreamError as exc:
        pytest.skip(f"cannot fetch {upstream.LINUX_SOURCE_PACKAGE}: {exc}")


@pytest.fixture(scope="module")
def build(debian_tree: Path) -> upstream.SelftestBuild:
    return upstream.build_pmu_selftests(debian_tree)


def test_tree_holds_only_what_the_build_reads(debian_tree: Path):
    assert (debian_tree / ".pmufarm-complete").is_file()
    assert (debian_tree / "tools/testing/selftests/kvm/Makefile").is_file()
    assert not (debian_tree / "drivers").exists() and not (debian_tree / "Documentation").exists()
    present = upstream.present_selftests(debian_tree)
    # 6.12 has the three older PMU tests; svm_pmu_host_guest_test came later
    assert present["pmu_counters_test"] and present["pmu_event_filter_test"] and present["vmx_pmu_caps_test"]


def test_build_is_out_of_tree_and_cached(debian_tree: Path, build: upstream.SelftestBuild):
    assert set(build.programs) == {t for t, ok in upstream.present_selftests(debian_tree).items() if ok}
    for path in build.programs.values():
        assert path.is_file() and os.access(path, os.X_OK) and build.out in path.parents
    assert not (debian_tree / "usr/include/linux/kvm.h").exists(), "headers went into the source tree"
    stamps = {n: p.stat().st_mtime_ns for n, p in build.programs.items()}
    again = upstream.build_pmu_selftests(debian_tree)
    assert {n: p.stat().st_mtime_ns for n, p in again.programs.items()} == stamps, "cached build relinked"


def test_selftests_run_here_with_the_kernels_reasons(build: upstream.SelftestBuild):
    """What the selftests say on this host, judged by this host's facts: without a KVM PMU
    (kvm.enable_pmu=N) every program's TEST_REQUIRE(kvm_is_pmu_enabled()) skips it, exit 4."""
    facts = collect_facts()
    for name, binary in build.programs.items():
        run = upstream.run_program(binary, timeout=120)
        results = ktap.program_results(name, run.stdout, run.returncode, run.stderr, run.timed_out)
        assert results, name
        assert all(r.outcome != "error" for r in results), (name, results, run.stderr[-500:])
        if (facts.get("kvm") or {}).get("enable_pmu") is False:
            assert run.returncode == 4, (name, run.returncode, run.stdout, run.stderr[-500:])
            assert [(r.name, r.outcome) for r in results] == [(name, "skipped")]
            assert results[0].message.startswith("Requirement not met: kvm_is_pmu_enabled()"), results


def test_submit_kselftest_kvm_reaches_store_and_junit(tmp_path: Path, build: upstream.SelftestBuild):
    """``orchestrator submit suites/kselftest_kvm`` on the local default farm: one stored result
    and one JUnit testcase per test point, the tree recorded in the JUnit properties."""
    inv = tmp_path / "inv.yaml"
    inv.write_text(f"- {{name: kself, address: local, kernel_tree: '{build.tree}'}}\n")
    env = {"FARM_STATE_DIR": str(tmp_path / "st"), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent"),
           "PMUFARM_TREE": str(ROOT)}
    r = run_cli("--reports-dir", str(tmp_path / "reports"), "submit", "suites/kselftest_kvm", "--inventory",
                str(inv), env=env, timeout=600)
    assert "Traceback" not in r.stderr, r.stderr
    with sqlite3.connect(tmp_path / "st" / "pmufarm.sqlite") as db:
        rows = db.execute("SELECT r.name, r.outcome, r.message FROM results r JOIN jobs j ON j.id=r.job_id "
                          "WHERE j.suite='kselftest_kvm' ORDER BY r.name").fetchall()
    names = {n for n, _, _ in rows}
    for program in build.programs:
        assert any(n.startswith(f"test_selftest[{program}") for n in names), (program, rows)
    assert all(o in ("passed", "failed", "skipped", "xfailed") for _, o, _ in rows), rows
    for absent in build.absent:
        assert (f"test_selftest[{absent}]", "skipped", f"{absent} is not in this tree ({build.tree})") in rows
    junits = list((tmp_path / "reports").glob("*/junit/*.xml"))
    assert junits, r.stdout + r.stderr
    suites = [s for f in junits for s in JUnitXml.fromfile(str(f))]
    assert sum(len(list(s)) for s in suites) == len(rows)
    # the agent's own JUnit (pytest's) carries which tree ran, and from where
    [agent_junit] = (tmp_path / "agent").glob("runs/*/kself/kselftest_kvm.*/junit.xml")
    props = {p.name: p.value for s in JUnitXml.fromfile(str(agent_junit)) for p in s.properties()}
    assert props["kernel_tree"] == str(build.tree) and "kernel_tree" in props["kernel_tree_from"]


def _suite(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "suites/kselftest_kvm",
                        f"--pmufarm-results={out}", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, **(env or {})})
    assert out.is_file(), r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(out.read_text())


def test_a_path_that_is_no_kernel_tree_is_one_error_naming_it(tmp_path: Path):
    doc = _suite(tmp_path, f"--kernel-tree={tmp_path}")
    [row] = doc["tests"]
    assert row["outcome"] == "error" and str(tmp_path) in row["message"] and "--kernel-tree" in row["message"]


def test_a_tree_whose_selftests_do_not_build_is_an_error_with_makes_words(tmp_path: Path):
    """A stand-in tree (not a kernel: a Makefile whose selftest target fails) drives the build's
    error path, which a real tree reaches with a broken patch."""
    tree = tmp_path / "tree"
    kvm = tree / "tools/testing/selftests/kvm"
    (kvm / "x86").mkdir(parents=True)
    (tree / "Makefile").write_text("headers:\n\t@mkdir -p $(O)/usr/include\n")
    (kvm / "Makefile").write_text("%:\n\t@echo 'pmu_counters_test.c:1: error: broken by the patch' >&2; false\n")
    (kvm / "x86/pmu_counters_test.c").write_text("int main(void) { return 0; }\n")
    doc = _suite(tmp_path, env={"PMUFARM_KERNEL_TREE": str(tree), "PMUFARM_CACHE_DIR": str(tmp_path / "cache")})
    [row] = doc["tests"]
    assert row["outcome"] == "error" and "broken by the patch" in row["message"], row
    assert "PMUFARM_KERNEL_TREE" in row["message"]


def test_a_simulated_host_does_not_run_upstream_tests(tmp_path: Path):
    """A ``model`` host owns no KVM: the selftests would report this machine under its name."""
    hostfile = tmp_path / "host.json"
    hostfile.write_text(json.dumps({"host": {"name": "sim-zen4", "driver": "model", "model": {"uarch": "zen4"}}}))
    [row] = _suite(tmp_path, f"--pmufarm-host={hostfile}")["tests"]
    assert row["outcome"] == "skipped" and "driver model" in row["message"] and "sim-zen4" in row["message"]
