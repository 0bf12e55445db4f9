"""suites/kvm_unit_tests: kvm-unit-tests' PMU tests (x86/unittests.cfg ``pmu``, ``pmu_lbr``,
``pmu_pebs``) with QEMU and KVM, one result per TAP point of ``run_tests.sh -t``.

The checkout is ``--kvm-unit-tests``, env ``PMUFARM_KVM_UNIT_TESTS`` or the host entry's
``kvm_unit_tests`` (configured and built here when it is not yet). Without one, the suite is one
skip that names those three. Like suites/kselftest_kvm, the tests run while pytest collects: the
points exist only in their output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import ktap, upstream

_RESULTS = pytest.StashKey[list]()
_SOURCE = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("pmufarm").addoption(
        "--kvm-unit-tests", dest="kvm_unit_tests", default=None, metavar="DIR",
        help="kvm-unit-tests checkout (env PMUFARM_KVM_UNIT_TESTS, host entry kvm_unit_tests)")


def _collect(config: pytest.Config) -> list[ktap.TapResult]:
    if _RESULTS not in config.stash:
        info: dict[str, Any] = {}
        config.stash[_SOURCE] = info
        host = upstream.host_entry(config)
        refused = upstream.not_real_kvm(host, "kvm_unit_tests")
        path, where = upstream.first_source(config.getoption("kvm_unit_tests"), "PMUFARM_KVM_UNIT_TESTS",
                                            host, "kvm_unit_tests")
        if refused:
            results = [ktap.TapResult("(host)", "skipped", refused)]
        elif path is None:
            results = [ktap.TapResult("(checkout)", "skipped", f"no kvm-unit-tests checkout: {where}")]
        else:
            info.update(kvm_unit_tests=path, kvm_unit_tests_from=where)
            try:
                checkout = upstream.kvm_unit_tests_ready(Path(path))
                results = [r for test in upstream.KVM_UNIT_TESTS for r in upstream.run_kvm_unit_test(checkout, test)]
            except upstream.UpstreamError as exc:
                results = [ktap.TapResult("(checkout)", "error", f"kvm-unit-tests from {where}: {exc}")]
        config.stash[_RESULTS] = results
    return config.stash[_RESULTS]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tap_result" in metafunc.fixturenames:
        metafunc.parametrize("tap_result", upstream.point_params(_collect(metafunc.config)))


@pytest.fixture(scope="session", autouse=True)
def _source_properties(request: pytest.FixtureRequest, record_testsuite_property: Any) -> None:
    for key, value in (request.config.stash.get(_SOURCE, None) or {}).items():
        record_testsuite_property(key, str(value))


@pytest.fixture
def tap_outcome(request: pytest.FixtureRequest, tap_result: ktap.TapResult) -> ktap.TapResult:
    return upstream.judge_setup(request, tap_result)
