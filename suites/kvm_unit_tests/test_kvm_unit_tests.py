"""Each TAP point of kvm-unit-tests' ``pmu``, ``pmu_lbr`` and ``pmu_pebs`` (one per report() line)
is one result; the verdict and its words are kvm-unit-tests'. A test skipped by its unittests.cfg
``check`` (enable_pmu=Y, nmi_watchdog=0) skips with run_tests.sh's reason; a test that never printed
its SUMMARY line is an error. See suites/kvm_unit_tests/conftest.py for the checkout."""

from agent import upstream


def test_kvm_unit_test(tap_outcome):
    upstream.judge_call(tap_outcome)
