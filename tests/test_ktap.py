"""agent/ktap.py against KTAP v1 (Documentation/dev-tools/ktap.rst) and TAP 13 samples.

The samples follow the shapes the kernel and kvm-unit-tests print: kselftest_harness output
(``TAP version 13``, ``#  RUN``/``#  OK`` diagnostics, ``ok N name``), KUnit's nested KTAP (two-space
and the older four-space indentation), a kselftest program whose TEST_REQUIRE fails
(``1..0 # SKIP ...``, exit 4, as pmu_counters_test prints on this machine), and kvm-unit-tests'
``run_tests.sh -t`` (one point per PASS/FAIL/SKIP report line, trailing plan).
"""

from __future__ import annotations

from agent import ktap

HARNESS = """TAP version 13
1..3
# Starting 3 tests from 1 test cases.
#  RUN           vmx_pmu_caps.basic ...
#            OK  vmx_pmu_caps.basic
ok 1 vmx_pmu_caps.basic
#  RUN           vmx_pmu_caps.fungible ...
# vmx_pmu_caps_test.c:140:fungible:Expected 0 (0) == r (1)
# fungible: Test terminated by assertion
#          FAIL  vmx_pmu_caps.fungible
not ok 2 vmx_pmu_caps.fungible
ok 3 vmx_pmu_caps.lbr # SKIP Requirement not met: host_cap.lbr_format
# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0
"""

NESTED = """KTAP version 1
1..2
  KTAP version 1
  # Subtest: example
  1..3
  ok 1 example_simple_test
  ok 2 example_skip_test # SKIP this test should be skipped
  not ok 3 example_todo_test # TODO not written yet
# example: pass:1 fail:0 skip:1 total:3
ok 1 example
  KTAP version 1
  1..2
    KTAP version 1
    1..1
    not ok 1 deep_case
    # deep_case: expected 4, got 5
  not ok 1 inner
  ok 2 inner_two # XFAIL known
not ok 2 outer
"""

KVM_UNIT_TESTS = """TAP version 13
ok 1 - pmu: core cycles-0
ok 2 - pmu: core cycles-1
not ok 3 - pmu: overflow: cntr-0
ok 4 - pmu_lbr: PMU version 0 is not supported # skip
1..4
"""


def by_name(results):
    return {r.name: r for r in results}


def test_kselftest_harness_points_with_diagnostics_as_failure_text():
    stream = ktap.parse(HARNESS)
    assert stream.version == "TAP 13" and stream.plan == 3 and stream.complete
    res = by_name(ktap.flatten(stream))
    assert [r.outcome for r in res.values()] == ["passed", "failed", "skipped"]
    fail = res["vmx_pmu_caps.fungible"]
    assert "Expected 0 (0) == r (1)" in fail.message and "Test terminated by assertion" in fail.message
    assert res["vmx_pmu_caps.lbr"].message == "SKIP: Requirement not met: host_cap.lbr_format"


def test_nesting_two_and_four_space_levels():
    stream = ktap.parse(NESTED)
    assert stream.complete, stream.problems
    ex = stream.points[0]
    assert ex.name == "example" and ex.ok and ex.subtests is not None and ex.subtests.plan == 3
    outer = stream.points[1].subtests
    assert outer.points[0].subtests.points[0].name == "deep_case"
    res = by_name(ktap.flatten(stream))
    assert res["example/example_simple_test"].outcome == "passed"
    assert res["example/example_skip_test"].outcome == "skipped"
    assert res["example/example_todo_test"].outcome == "xfailed"      # not ok # TODO: known failure
    assert res["outer/inner/deep_case"].outcome == "failed"
    assert res["outer/inner_two"].outcome == "xfailed"
    # a parent is represented by its leaves: no separate row for 'example' or 'outer'
    assert "example" not in res and "outer" not in res and "outer/inner" not in res
    # diagnostics printed after a result belong to the next result at that level: here the
    # parent's line, which is not a row of its own since a subtest failed
    assert len(res) == 5


def test_directives_are_case_insensitive_and_todo_pass_is_xpass():
    res = by_name(ktap.flatten(ktap.parse("1..4\nok 1 a # skip lower\nok 2 b # TODO fixed now\n"
                                          "not ok 3 c # TIMEOUT 45s\nnot ok 4 d # ERROR setup\n")))
    assert res["a"].outcome == "skipped" and res["a"].message == "SKIP: lower"
    assert res["b"].outcome == "xpassed"
    assert res["c"].outcome == "error" and "45s" in res["c"].message
    assert res["d"].outcome == "error"


def test_kvm_unit_tests_tap13_trailing_plan():
    stream = ktap.parse(KVM_UNIT_TESTS)
    assert stream.complete and stream.plan == 4
    res = ktap.flatten(stream)
    assert [r.outcome for r in res] == ["passed", "passed", "failed", "skipped"]
    assert res[2].name == "pmu: overflow: cntr-0"


def test_bail_out_is_an_error_and_stops_parsing():
    res = ktap.flatten(ktap.parse("TAP version 13\n1..3\nok 1 a\nBail out! no /dev/kvm\nok 2 b\n"))
    assert [r.name for r in res] == ["a", "(bail out)"]
    assert res[1].outcome == "error" and "no /dev/kvm" in res[1].message


def test_truncated_stream_is_an_error_never_a_pass():
    """The program crashed after two of four points: the missing ones are an error row."""
    res = ktap.flatten(ktap.parse("TAP version 13\n1..4\nok 1 a\nok 2 b\n# about to do something\n"))
    assert [r.outcome for r in res] == ["passed", "passed", "error"]
    assert "2 of 4 planned" in res[-1].message
    # a trailing-plan stream cut before its plan (kvm-unit-tests crashing mid-run)
    res = ktap.flatten(ktap.parse("TAP version 13\nok 1 - pmu: a\n"))
    assert res[-1].outcome == "error" and "no plan line" in res[-1].message
    # nothing at all
    assert [r.outcome for r in ktap.flatten(ktap.parse(""))] == ["error"]


def test_truncated_inside_a_subtest():
    text = "KTAP version 1\n1..1\n  KTAP version 1\n  1..3\n  ok 1 first\n  ok 2 second\n"
    stream = ktap.parse(text)
    assert not stream.complete
    res = ktap.flatten(stream)
    outcomes = {r.name: r.outcome for r in res}
    assert outcomes["(unclosed subtest)/first"] == "passed"
    assert outcomes["(unclosed subtest)/(incomplete)"] == "error"
    assert any(r.outcome == "error" and "2 of 3" in r.message for r in res)


def test_yaml_block_belongs_to_its_result():
    res = ktap.flatten(ktap.parse("TAP version 13\n1..1\nnot ok 1 x\n  ---\n  message: boom\n  ...\n"))
    assert res[0].outcome == "failed" and "message: boom" in res[0].message


def test_program_skip_all_with_kernel_reason():
    """What pmu_counters_test prints on a host without a PMU (6.12 tree, measured here)."""
    out = "Random seed: 0x6b8b4567\n1..0 # SKIP - Requirement not met: kvm_is_pmu_enabled()\n"
    [r] = ktap.program_results("pmu_counters_test", out, 4)
    assert (r.name, r.outcome) == ("pmu_counters_test", "skipped")
    assert r.message == "Requirement not met: kvm_is_pmu_enabled()"


def test_program_without_points_judged_by_exit_status():
    [ok] = ktap.program_results("pmu_counters_test", "Random seed: 0x1\n", 0)
    assert ok.outcome == "passed"
    err = "==== Test Assertion Failure ====\n  x86_64/pmu_counters_test.c:100: count == 1\n"
    [bad] = ktap.program_results("pmu_counters_test", "", 254, stderr=err)
    assert bad.outcome == "failed" and "Test Assertion Failure" in bad.message and "254" in bad.message


def test_program_crash_is_error_even_after_passing_points():
    res = ktap.program_results("t", "TAP version 13\n1..2\nok 1 a\n", -11)
    assert [r.outcome for r in res] == ["passed", "error"] and "signal 11" in res[-1].message
    res = ktap.program_results("t", "TAP version 13\n1..2\nok 1 a\nok 2 b\n", None, timed_out=True)
    assert res[-1].outcome == "error" and "timed out" in res[-1].message
    # all points passed, then an assert: the program's own failure is a row
    res = ktap.program_results("t", "TAP version 13\n1..1\nok 1 a\n", 254, stderr="assert x")
    assert res[-1].outcome == "failed" and "assert x" in res[-1].message


def test_program_points_named_under_the_program():
    res = ktap.program_results("vmx_pmu_caps_test", HARNESS, 1)
    assert [r.name for r in res] == ["vmx_pmu_caps_test/vmx_pmu_caps.basic", "vmx_pmu_caps_test/vmx_pmu_caps.fungible",
                                     "vmx_pmu_caps_test/vmx_pmu_caps.lbr"]
