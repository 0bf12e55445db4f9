"""suites/kselftest_kvm: the kernel's own KVM PMU selftests, one result per KTAP test point.

The tree is ``--kernel-tree``, env ``PMUFARM_KERNEL_TREE``, the host entry's ``kernel_tree`` (the
gate puts its candidate tree there), else Debian's ``linux-source-6.12`` fetched into the cache
(agent/upstream.py). The selftests are built and run while pytest collects, because the test
points exist only in their output; each point is then one test whose outcome is the kernel's
(``SKIP`` with the kernel's reason, failure text = the program's diagnostics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import ktap, upstream

_RESULTS = pytest.StashKey[list]()
_TREE = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("pmufarm").addoption(
        "--kernel-tree", dest="kernel_tree", default=None, metavar="DIR",
        help="kernel tree whose tools/testing/selftests/kvm PMU tests run (env PMUFARM_KERNEL_TREE, "
             "host entry kernel_tree; default: Debian's linux-source-6.12 in the cache)")


def _collect(config: pytest.Config) -> list[ktap.TapResult]:
    if _RESULTS in config.stash:
        return config.stash[_RESULTS]
    info: dict[str, Any] = {}
    config.stash[_TREE] = info
    results: list[ktap.TapResult] = []
    host = upstream.host_entry(config)
    refused = upstream.not_real_kvm(host, "kselftest_kvm")
    if refused:
        config.stash[_RESULTS] = [ktap.TapResult("(host)", "skipped", refused)]
        return config.stash[_RESULTS]
    path, where = upstream.first_source(config.getoption("kernel_tree"), "PMUFARM_KERNEL_TREE", host, "kernel_tree")
    try:
        if path is None:
            where = f"Debian {upstream.LINUX_SOURCE_PACKAGE} (none given: {where})"
            tree = upstream.fetch_linux_source()
        else:
            tree = Path(path)
        info.update(kernel_tree=str(tree), kernel_tree_from=where)
        build = upstream.build_pmu_selftests(tree)
        info.update(selftests_build_s=f"{build.seconds:.1f}", selftests_arch=build.arch)
    except upstream.UpstreamError as exc:
        name = "(build)" if path is not None or "linux-source" not in str(exc) else "(kernel tree)"
        outcome = "error" if path is not None else "skipped"
        # the first line is what reports show: where the tree came from, then what went wrong
        results.append(ktap.TapResult(name, outcome, f"kernel tree from {where} (set --kernel-tree or "
                                      f"PMUFARM_KERNEL_TREE): {exc}"))
        config.stash[_RESULTS] = results
        return results
    for name in build.absent:
        results.append(ktap.TapResult(name, "skipped", f"{name} is not in this tree ({tree})"))
    for name, binary in build.programs.items():
        run = upstream.run_program(binary)
        results.extend(ktap.program_results(name, run.stdout, run.returncode, run.stderr, run.timed_out))
    config.stash[_RESULTS] = results
    return results


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "ktap_result" in metafunc.fixturenames:
        results = _collect(metafunc.config)
        metafunc.parametrize("ktap_result", upstream.point_params(results))


@pytest.fixture(scope="session", autouse=True)
def _tree_properties(request: pytest.FixtureRequest, record_testsuite_property: Any) -> None:
    for key, value in (request.config.stash.get(_TREE, None) or {}).items():
        record_testsuite_property(key, str(value))


@pytest.fixture
def ktap_outcome(request: pytest.FixtureRequest, ktap_result: ktap.TapResult) -> ktap.TapResult:
    return upstream.judge_setup(request, ktap_result)
