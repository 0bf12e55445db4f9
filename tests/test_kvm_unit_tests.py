"""suites/kvm_unit_tests and its result assembly (agent/upstream.py ``kvm_unit_results``).

kvm-unit-tests cannot be installed from the registries this machine reaches, so these tests use
TAP output as the parser receives it from ``run_tests.sh -t``: written to the format that script
prints (kvm-unit-tests run_tests.sh: process_test_output turns each PASS/FAIL/SKIP report line into
``ok|not ok N - <test>: <line>[ # skip]``, postprocess_suite_output numbers them and appends the
plan; the per-test verdict line goes to /dev/null in TAP mode), not captured from a real run. The
suite's wiring runs for real against a stand-in checkout whose run_tests.sh prints such output:
the stand-in is the boundary that cannot exist here, nothing else is faked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent import upstream
from tests.conftest import ROOT

PMU_TAP = """TAP version 13
ok 1 - pmu: core cycles-0
ok 2 - pmu: core cycles-1
not ok 3 - pmu: overflow: cntr-0
ok 4 - pmu: full-width writes: running on a CPU without FW_WRITES # skip
1..4
"""
PMU_LOG = """PASS: core cycles-0
PASS: core cycles-1
FAIL: overflow: cntr-0
SKIP: full-width writes: running on a CPU without FW_WRITES
SUMMARY: 4 tests, 1 unexpected failures, 1 skipped
"""


def outcomes(results):
    return [(r.name, r.outcome) for r in results]


def test_one_result_per_tap_point():
    res = upstream.kvm_unit_results("pmu", PMU_TAP, PMU_LOG)
    assert outcomes(res) == [("pmu: core cycles-0", "passed"), ("pmu: core cycles-1", "passed"),
                             ("pmu: overflow: cntr-0", "failed"),
                             ("pmu: full-width writes: running on a CPU without FW_WRITES", "skipped")]
    # the failure text is the test's own output up to its FAIL line; a skip's reason is its report line
    assert res[2].message.splitlines() == ["FAIL: overflow: cntr-0", "PASS: core cycles-0", "PASS: core cycles-1"]
    assert res[3].message == "full-width writes: running on a CPU without FW_WRITES"


def test_a_test_that_never_summarised_is_an_error():
    """QEMU died after two report lines: the points it printed stay, and an error says it did not finish."""
    tap = "TAP version 13\nok 1 - pmu: core cycles-0\nok 2 - pmu: core cycles-1\n1..2\n"
    res = upstream.kvm_unit_results("pmu", tap, "PASS: core cycles-0\nPASS: core cycles-1\nqemu: terminating\n")
    assert outcomes(res)[-1] == ("pmu: (incomplete)", "error") and "qemu: terminating" in res[-1].message
    # and a TAP stream cut before its trailing plan is an error by itself
    res = upstream.kvm_unit_results("pmu", "TAP version 13\nok 1 - pmu: core cycles-0\n", "")
    assert [o for _, o in outcomes(res)].count("error") >= 1


def test_no_points_uses_the_plain_verdict_line():
    """A skip by unittests.cfg's ``check`` prints no TAP point; the plain run says why (with colours)."""
    plain = "\x1b[33mSKIP\x1b[0m pmu (/proc/sys/kernel/nmi_watchdog not equal to 0)\n"
    [r] = upstream.kvm_unit_results("pmu", "TAP version 13\n1..0\n", "", plain)
    assert (r.name, r.outcome, r.message) == ("pmu", "skipped", "/proc/sys/kernel/nmi_watchdog not equal to 0")
    [r] = upstream.kvm_unit_results("pmu_pebs", "TAP version 13\n1..0\n", "",
                                    "\x1b[31mFAIL\x1b[0m pmu_pebs (timeout; duration=90s)\n")
    assert r.outcome == "error" and "timeout" in r.message
    [r] = upstream.kvm_unit_results("pmu_lbr", "TAP version 13\n1..0\n", "", "")
    assert r.outcome == "error" and "reported nothing" in r.message


def _run_suite(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "PMUFARM_KVM_UNIT_TESTS"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "suites/kvm_unit_tests",
                        f"--pmufarm-results={out}", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert out.is_file(), r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(out.read_text())


def test_missing_checkout_is_a_skip_naming_the_option(tmp_path: Path):
    [row] = _run_suite(tmp_path)["tests"]
    assert row["outcome"] == "skipped" and "--kvm-unit-tests" in row["message"]
    assert "PMUFARM_KVM_UNIT_TESTS" in row["message"]


def test_not_a_checkout_is_an_error_naming_it(tmp_path: Path):
    [row] = _run_suite(tmp_path, f"--kvm-unit-tests={tmp_path}")["tests"]
    assert row["outcome"] == "error" and str(tmp_path) in row["message"] and "run_tests.sh" in row["message"]


STANDIN = r"""#!/bin/sh
# stand-in for kvm-unit-tests' run_tests.sh: the output format of the real one, canned per test
rm -rf logs; mkdir logs
if [ "$1" = "-t" ]; then
  t=$2
  echo "TAP version 13"
  case $t in
    pmu) printf 'ok 1 - pmu: core cycles-0\nnot ok 2 - pmu: overflow: cntr-0\n1..2\n'
         printf 'PASS: core cycles-0\nFAIL: overflow: cntr-0\nSUMMARY: 2 tests, 1 unexpected\n' > logs/pmu.log ;;
    pmu_lbr) printf 'ok 1 - pmu_lbr: No LBR is detected! # skip\n1..1\n'
             printf 'SKIP: No LBR is detected!\nSUMMARY: 1 tests, 1 skipped\n' > logs/pmu_lbr.log ;;
    *) echo "1..0" ;;
  esac
else
  printf '\033[33mSKIP\033[0m %s (/proc/sys/kernel/nmi_watchdog not equal to 0)\n' "$1"
fi
"""


def test_suite_runs_a_checkout_one_result_per_point(tmp_path: Path):
    co = tmp_path / "kvm-unit-tests"
    (co / "x86").mkdir(parents=True)
    (co / "run_tests.sh").write_text(STANDIN)
    (co / "run_tests.sh").chmod(0o755)
    (co / "config.mak").write_text("ARCH=x86_64\n")
    (co / "x86" / "unittests.cfg").write_text("[pmu]\nfile = pmu.flat\n")
    for t in upstream.KVM_UNIT_TESTS:
        (co / "x86" / f"{t}.flat").write_bytes(b"")
    rows = {t["name"]: (t["outcome"], t["message"]) for t in _run_suite(tmp_path, f"--kvm-unit-tests={co}")["tests"]}
    assert rows == {
        "test_kvm_unit_test[pmu: core cycles-0]": ("passed", ""),
        "test_kvm_unit_test[pmu: overflow: cntr-0]": ("failed", "FAIL: overflow: cntr-0"),
        "test_kvm_unit_test[pmu_lbr: No LBR is detected!]": ("skipped", "No LBR is detected!"),
        "test_kvm_unit_test[pmu_pebs]": ("skipped", "/proc/sys/kernel/nmi_watchdog not equal to 0"),
    }
