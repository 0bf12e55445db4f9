"""Each KTAP test point of the kernel's KVM PMU selftests (pmu_counters_test, pmu_event_filter_test,
vmx_pmu_caps_test, svm_pmu_host_guest_test where the tree has it) is one result here.

The verdict is the kernel's: a point it skipped skips with its reason (TEST_REQUIRE's
"Requirement not met: ..."), a failed point fails with the program's diagnostics, a crash, signal,
timeout or truncated output is an error. See suites/kselftest_kvm/conftest.py for the tree.
"""

from agent import upstream


def test_selftest(ktap_outcome):
    upstream.judge_call(ktap_outcome)
