"""The native harness on this host's real KVM (no mocks): the ASan/UBSan build of agent/native.

What must hold everywhere /dev/kvm works: the VMM boots a long-mode guest and the port-I/O channel
counts exactly (``selftest``); the catalogue matches agent/protocol.py; arguments are validated. On a
host without a usable mediated vPMU every PMU probe answers ``unsupported`` with the missing facts.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.drivers.kvm import NATIVE_DIR, KvmDriver
from agent.protocol import GUEST_PMU_PARAMS, PROBES

ASAN_BINARY = NATIVE_DIR / "build-asan" / "vpmu"
PMU_PROBES = [name for name, spec in PROBES.items() if spec.needs_pmu]
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("/dev/kvm is not accessible on this host", allow_module_level=True)


@pytest.fixture(scope="session")
def vpmu() -> Path:
    """Build the sanitizer binary once per session."""
    proc = subprocess.run(["make", "-C", str(NATIVE_DIR), "asan"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, f"make asan failed:\n{proc.stdout}\n{proc.stderr}"
    assert ASAN_BINARY.exists()
    return ASAN_BINARY


def run(binary: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env={**os.environ, **(env or {})})
    assert not any(m in proc.stderr for m in SANITIZER_MARKERS), proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"expected one line of JSON, got: {proc.stdout!r} {proc.stderr!r}"
    return proc.returncode, json.loads(lines[0]), proc.stderr


@pytest.fixture(scope="session")
def caps(vpmu: Path) -> dict[str, Any]:
    rc, data, _ = run(vpmu, "caps")
    assert rc == 0
    return data


def require_no_pmu(caps: dict[str, Any]) -> None:
    """The unsupported-path assertions only hold where KVM exposes no PMU."""
    if caps["kvm"]["enable_pmu"] is not False:
        pytest.skip(f"kvm.enable_pmu={caps['kvm']['enable_pmu']} on this host: PMU probes may run")
    if caps["mediated_pmu"]["status"] == "available":
        pytest.skip("mediated_pmu=available on this host: PMU probes run for real")


# -- selftest: the VMM itself ------------------------------------------------------------------


def assert_selftest(result: dict[str, Any], n: int) -> None:
    assert result["probe"] == "selftest"
    assert result["status"] == "ok", result["reason"]
    obs = result["observations"]
    assert obs["iterations"] == n
    assert obs["vm_exits"] == n
    assert obs["expected_sum"] == n * (n - 1) // 2
    assert obs["guest_sum"] == obs["expected_sum"]
    assert obs["user_round_trip"] is True       # CPL3 and back: the privilege probe's user loop
    assert obs["exceptions"] == []
    assert result["elapsed_ns"] > 0


def test_selftest_default_exact(vpmu: Path) -> None:
    rc, result, _ = run(vpmu, "run", "selftest")
    assert rc == 0
    assert_selftest(result, PROBES["selftest"].params["iterations"])


@pytest.mark.parametrize("n", [1, 2, 7, 100, 2500])
def test_selftest_iterations(vpmu: Path, n: int) -> None:
    rc, result, _ = run(vpmu, "run", "selftest", f"iterations={n}")
    assert rc == 0
    assert_selftest(result, n)


def test_selftest_pinned(vpmu: Path) -> None:
    rc, result, _ = run(vpmu, "run", "selftest", "iterations=10", "cpu=0")
    assert rc == 0
    assert_selftest(result, 10)


@pytest.mark.parametrize("irqchip", ["split", "full"])
def test_selftest_irqchip_modes(vpmu: Path, irqchip: str) -> None:
    rc, result, _ = run(vpmu, "run", "selftest", "iterations=20", env={"PMUFARM_IRQCHIP": irqchip})
    assert rc == 0
    assert_selftest(result, 20)


# -- catalogue, caps, argument handling ----------------------------------------------------------


def test_list_matches_protocol(vpmu: Path) -> None:
    rc, data, _ = run(vpmu, "list")
    assert rc == 0
    assert data == {"probes": list(PROBES)}


def test_caps(vpmu: Path, caps: dict[str, Any]) -> None:
    assert caps["vendor"] in ("intel", "amd", "unknown")
    for key in ("host_pmu", "kvm", "mediated_pmu", "vm"):
        assert key in caps
    assert caps["kvm"]["dev_kvm"] is True
    assert set(caps["kvm"]["supported_pmu"]) == set(caps["host_pmu"])
    assert caps["mediated_pmu"]["status"] in ("available", "unavailable")
    assert caps["vm"]["runs"] is True, caps["vm"]["error"]
    assert caps["vm"]["guest_idt"] is True


def test_caps_guest_rdpmc_faults_without_pmu(caps: dict[str, Any]) -> None:
    require_no_pmu(caps)
    # No PMU in the guest: RDPMC raises #GP, and the guest IDT turns it into an observation.
    assert caps["vm"]["rdpmc_vector"] == 13
    assert caps["vm"]["fast_rdpmc_vector"] == 13


@pytest.mark.parametrize(("args", "needle"), [
    (["run", "no_such_probe"], "no_such_probe"),
    (["run", "selftest", "iterations=abc"], "iterations"),
    (["run", "selftest", "bogus=1"], "bogus"),
    (["run", "selftest", "iterations"], "iterations"),
    (["run", "selftest", "iterations=0"], "iterations"),
    (["run", "cross_context", "kind=planet"], "kind"),
    (["run", "event_filter", "case=whatever"], "case"),
    (["run", "selftest", "cpu=-3"], "cpu"),
])
def test_bad_arguments(vpmu: Path, args: list[str], needle: str) -> None:
    rc, result, _ = run(vpmu, *args)
    assert rc == 1
    assert result["status"] == "error"
    assert needle in result["reason"]
    assert "\n" not in result["reason"]
    assert result["observations"] == {}


def test_usage_error(vpmu: Path) -> None:
    proc = subprocess.run([str(vpmu), "frobnicate"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert "usage" in proc.stderr


# -- PMU probes on a host without a usable mediated vPMU ----------------------------------------


@pytest.mark.parametrize("probe", PMU_PROBES)
def test_pmu_probe_unsupported(vpmu: Path, caps: dict[str, Any], probe: str) -> None:
    require_no_pmu(caps)
    rc, result, _ = run(vpmu, "run", probe)
    assert rc == 4
    assert result["probe"] == probe
    assert result["status"] == "unsupported"
    assert "enable_pmu" in result["reason"]
    assert "\n" not in result["reason"]
    assert result["observations"] == {}
    # The reason is the harness's own verdict: every reason caps gives, joined.
    assert result["reason"] == "; ".join(caps["mediated_pmu"]["reasons"])


@pytest.mark.parametrize("probe", PMU_PROBES)
def test_pmu_probe_forced_paths_are_clean(vpmu: Path, caps: dict[str, Any], probe: str) -> None:
    """PMUFARM_VPMU_FORCE runs every probe body against this KVM under ASan/UBSan: the guest's
    #GPs on absent PMU MSRs must come back as observations, never as a crash."""
    require_no_pmu(caps)
    args = ["run", probe]
    if probe == "host_excludes_guest":
        args.append("iterations=20000")     # keep the guest loops short
    if probe == "cross_context":
        args.append("rounds=50")
    rc, result, _ = run(vpmu, *args, env={"PMUFARM_VPMU_FORCE": "1"}, timeout=300)
    assert result["reason"].startswith("FORCED despite: ")
    assert rc in (0, 1, 4)
    assert result["status"] in ("ok", "unsupported", "error")
    if result["status"] == "ok":
        for spec_key in _observation_keys(probe):
            assert spec_key in result["observations"], spec_key


def _observation_keys(probe: str) -> list[str]:
    """The top-level observation keys agent/protocol.py documents for a probe."""
    text = PROBES[probe].observations
    keys = []
    depth = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == '"' and depth == 0:
            end = text.index('"', i + 1)
            if text[end + 1:end + 2] == ":":
                keys.append(text[i + 1:end])
            i = end
        i += 1
    return keys


def test_observation_key_parser() -> None:
    assert _observation_keys("selftest") == ["iterations", "vm_exits", "guest_sum", "expected_sum", "user_round_trip",
                                             "exceptions"]


# -- the Python driver end to end ----------------------------------------------------------------


def test_kvm_driver_end_to_end(vpmu: Path, caps: dict[str, Any]) -> None:
    driver = KvmDriver({}, binary=vpmu)
    assert driver.name == "kvm" and driver.simulated is False
    assert driver.list() == list(PROBES)
    result = driver.run("selftest", iterations=321)
    assert result.status == "ok", result.reason
    assert result.observations["vm_exits"] == 321
    assert result.observations["guest_sum"] == 321 * 320 // 2
    bad = driver.run("selftest", iterations="many")
    assert bad.status == "error" and "iterations" in bad.reason
    if caps["kvm"]["enable_pmu"] is False:
        res = driver.run("guest_count", iterations=10)
        assert res.status == "unsupported" and "enable_pmu" in res.reason
    assert driver.caps()["vm"]["runs"] is True


def test_kvm_driver_env_binary(vpmu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMUFARM_VPMU", str(vpmu))
    driver = KvmDriver({})
    assert driver.binary == vpmu
    assert driver.run("selftest", iterations=3).status == "ok"


def test_kvm_driver_default_binary_builds() -> None:
    driver = KvmDriver({})
    if os.environ.get("PMUFARM_VPMU"):
        pytest.skip("PMUFARM_VPMU overrides the default binary")
    assert driver.binary == NATIVE_DIR / "build" / "vpmu"
    assert driver.binary.exists()
    assert driver.run("selftest", iterations=5).status == "ok"


@pytest.mark.parametrize(("script", "needle"), [
    ("#!/bin/sh\necho this is not json\n", "no valid result"),
    ("#!/bin/sh\nkill -SEGV $$\n", "signal 11"),
    ("#!/bin/sh\nexit 1\n", "no valid result"),
    ('#!/bin/sh\necho \'{"probe": "selftest", "status": "ok"}\'\nexit 4\n', "does not match"),
    ("#!/bin/sh\nsleep 5\n", "timed out"),
])
def test_kvm_driver_maps_bad_binaries_to_error(tmp_path: Path, script: str, needle: str) -> None:
    fake = tmp_path / "vpmu"
    fake.write_text(script)
    fake.chmod(0o755)
    result = KvmDriver({}, binary=fake, timeout=1).run("selftest")
    assert result.status == "error"
    assert needle in result.reason
    assert "\n" not in result.reason


def test_kvm_driver_missing_binary(tmp_path: Path) -> None:
    result = KvmDriver({}, binary=tmp_path / "absent").run("selftest")
    assert result.status == "error" and "cannot run" in result.reason


# -- guest PMU shaping (issue 14): CPUID set the way the selftests set it, read back in the guest --
# pmu_counters_test.c pmu_vm_create_with_one_vcpu() sets the PMU version and counter counts in the
# guest CPUID and PERF_CAPABILITIES from the host before KVM_RUN; the harness does the same, and the
# pmu_enum probe reads the guest's own CPUID.  Intel layouts are exercised through the emulated PMU
# (helper E's lib/epmu.c: real KVM, real guest CPUID, PMU emulated in the VMM), AMD on this KVM too.

EMULATED_INTEL = ("--pmu", "emulated:intel")
EMULATED_AMD = ("--pmu", "emulated:amd")


def run_probe(binary: Path, probe: str, *args: str, pmu: tuple[str, ...] = ()) -> dict[str, Any]:
    """One probe under ASan; the PMU-less real KVM needs PMUFARM_VPMU_FORCE to run the body."""
    env = {} if pmu else {"PMUFARM_VPMU_FORCE": "1"}
    rc, result, _ = run(binary, *pmu, "run", probe, *args, env=env)
    assert result["status"] == "ok", result["reason"]
    assert rc == 0
    return result["observations"]


def test_every_catalogue_parameter_is_known_to_the_harness(vpmu: Path) -> None:
    for name, spec in PROBES.items():
        rc, result, _ = run(vpmu, "run", name, "no_such_parameter=1")
        assert rc == 1 and result["status"] == "error"
        known = result["reason"].split("(known: ", 1)[1]
        for key in spec.params:
            assert key in known, (name, key)
        assert set(GUEST_PMU_PARAMS) <= set(spec.params) or not spec.needs_pmu


@pytest.mark.parametrize(("args", "leaf"), [
    # version | gp << 8 | width << 16 | EBX length << 24, EBX, ECX = v5 fixed bitmap, EDX = fixed | width << 5
    (("pmu_version=5", "gp_counters=3", "gp_width=40", "fixed_counters=1", "fixed_bitmap=4"),
     {"version": 5, "gp": 3, "width": 40, "fixed": 1, "bitmap": 4}),
    (("pmu_version=2", "gp_counters=0", "fixed_counters=2"), {"version": 2, "gp": 0, "fixed": 2, "bitmap": 0}),
    (("pmu_version=0",), {"version": 0, "gp": 0, "width": 0, "fixed": 0, "bitmap": 0}),
])
def test_intel_guest_cpuid_is_what_the_harness_set(vpmu: Path, args: tuple[str, ...],
                                                    leaf: dict[str, int]) -> None:
    obs = run_probe(vpmu, "pmu_enum", *args, pmu=EMULATED_INTEL)
    eax, _ebx, ecx, edx = obs["cpuid"]["0xa"]
    assert eax & 0xff == leaf["version"]
    assert eax >> 8 & 0xff == leaf["gp"]
    if "width" in leaf:
        assert eax >> 16 & 0xff == leaf["width"]
    assert edx & 0x1f == leaf["fixed"]
    assert ecx == leaf["bitmap"]
    # The guest decodes its CPUID into exactly the PMU the harness reports it gave the guest.
    guest = {k: v for k, v in obs["guest_pmu"].items() if k != "perf_capabilities"}
    assert {k: v for k, v in obs["decoded"].items() if k != "perf_capabilities"} == guest


def test_intel_perf_capabilities_set_by_the_host_before_run(vpmu: Path) -> None:
    obs = run_probe(vpmu, "pmu_enum", "perf_capabilities=0", pmu=EMULATED_INTEL)
    caps = obs["perf_capabilities"]
    assert obs["guest_pmu"]["perf_capabilities"] == 0
    assert caps["host_before_run"] == 0
    assert caps["guest_rdmsr"]["vector"] is None and caps["guest_rdmsr"]["value"] == 0


@pytest.mark.parametrize("pmu", [(), EMULATED_AMD], ids=["this-kvm", "emulated-amd"])
def test_amd_guest_cpuid_is_what_the_harness_set(vpmu: Path, caps: dict[str, Any], pmu: tuple[str, ...]) -> None:
    if not pmu and caps["vendor"] != "amd":
        pytest.skip(f"this host's vendor is {caps['vendor']}: AMD CPUID leaves need the emulated AMD PMU")
    if not pmu:
        require_no_pmu(caps)
    v2 = run_probe(vpmu, "pmu_enum", "pmu_version=2", "gp_counters=3", pmu=pmu)["cpuid"]
    assert v2["0x80000001"][2] >> 23 & 1 == 1                     # PerfCtrExtCore
    assert v2["0x80000022"][0] & 1 == 1 and v2["0x80000022"][1] & 0xf == 3
    v1 = run_probe(vpmu, "pmu_enum", "pmu_version=1", pmu=pmu)["cpuid"]
    assert v1["0x80000001"][2] >> 23 & 1 == 1
    assert v1["0x80000022"] is None or v1["0x80000022"][0] & 1 == 0
    v0 = run_probe(vpmu, "pmu_enum", "pmu_version=0", pmu=pmu)
    assert v0["cpuid"]["0x80000001"][2] >> 23 & 1 == 0
    assert v0["decoded"]["version"] == 0 and v0["decoded"]["gp_counters"] == 0


@pytest.mark.parametrize("pmu", [(), EMULATED_INTEL], ids=["this-kvm", "emulated-intel"])
def test_pmu_disabled_vm_gets_cpuid_without_a_pmu(vpmu: Path, caps: dict[str, Any], pmu: tuple[str, ...]) -> None:
    """KVM never edits CPUID for KVM_PMU_CAP_DISABLE (api.rst): the VMM must (finding 3)."""
    if not pmu:
        require_no_pmu(caps)
    obs = run_probe(vpmu, "pmu_disabled", pmu=pmu)
    assert obs["guest_pmu_version"] == 0
    assert obs["guest_gp_counters"] == 0
    assert obs["counter_access_vector"] == 13


def test_intel_version_defaults_to_what_the_probe_needs(vpmu: Path) -> None:
    # KVM reports v2; GLOBAL_STATUS_SET needs v4 (kvm_pmu_is_valid_msr: version > 3).
    assert run_probe(vpmu, "global_ctrl", pmu=EMULATED_INTEL)["guest_pmu"]["version"] == 2
    assert run_probe(vpmu, "overflow_status", pmu=EMULATED_INTEL)["guest_pmu"]["version"] == 4
    assert run_probe(vpmu, "overflow_status", "pmu_version=3", pmu=EMULATED_INTEL)["guest_pmu"]["version"] == 3


@pytest.mark.parametrize(("pmu", "args", "expect"), [
    # kvm_need_any_pmc_intercept(): guest counts == host counts -> passthrough (AMD Zen default)
    (EMULATED_AMD, (), ("passthrough", "passthrough")),
    (EMULATED_AMD, ("gp_counters=3",), ("intercepted", "intercepted")),
    # The emulated Intel host has 4 fixed counters, KVM exposes 3 (finding 11): intercepted.
    (EMULATED_INTEL, (), ("intercepted", "intercepted")),
], ids=["amd-default", "amd-hidden-counters", "intel-fc3"])
def test_kvm_path_derived_from_kvm_rule(vpmu: Path, pmu: tuple[str, ...], args: tuple[str, ...],
                                        expect: tuple[str, str]) -> None:
    path = run_probe(vpmu, "guest_count", "iterations=5", *args, pmu=pmu)["kvm_path"]
    assert path["how"] == "derived"
    assert (path["global_ctrl"], path["rdpmc"]) == expect
    inputs = path["inputs"]
    same = inputs["guest_gp"] == inputs["host_gp"] and inputs["guest_fixed"] == inputs["host_fixed"]
    assert (path["global_ctrl"] == "passthrough") == (same and inputs["mediated"] and inputs["guest_global_ctrl"])


def test_kvm_path_without_mediated_pmu_is_intercepted(vpmu: Path, caps: dict[str, Any]) -> None:
    require_no_pmu(caps)
    obs = run_probe(vpmu, "guest_count", "iterations=5")
    assert obs["kvm_path"]["inputs"]["mediated"] is False
    assert obs["kvm_path"]["global_ctrl"] == obs["kvm_path"]["rdpmc"] == "intercepted"
    assert obs["workload"]["global_ctrl_exits"] == 1


@pytest.mark.parametrize(("pmu", "args", "needle"), [
    ((), ("gp_counters=99",), "gp_counters"),
    ((), ("pmu_version=-5",), "pmu_version"),
    (EMULATED_AMD, ("fixed_counters=1",), "fixed"),
    (EMULATED_AMD, ("pmu_version=3",), "pmu_version"),
    (EMULATED_AMD, ("perf_capabilities=0",), "perf_capabilities"),
])
def test_bad_shaping_names_the_field(vpmu: Path, pmu: tuple[str, ...], args: tuple[str, ...], needle: str) -> None:
    rc, result, _ = run(vpmu, *pmu, "run", "pmu_enum", *args, env={"PMUFARM_VPMU_FORCE": "1"})
    assert rc == 1 and result["status"] == "error"
    assert needle in result["reason"] and "\n" not in result["reason"]


def test_unexposed_rdpmc_uses_index_64(vpmu: Path, caps: dict[str, Any]) -> None:
    """kvm-unit-tests rdpmc_safe(64), never #counters (Zen: RDPMC 6 is a data-fabric counter)."""
    require_no_pmu(caps)
    obs = run_probe(vpmu, "unexposed")
    assert [a["target"] for a in obs["accesses"] if a["op"] == "rdpmc" and a["target"] < (1 << 30)] == [64]


def test_hidden_counters_cover_every_defined_counter(vpmu: Path) -> None:
    obs = run_probe(vpmu, "hidden_counters", "gp_counters=2", pmu=EMULATED_INTEL)
    assert obs["gp_counters"] == 2 and obs["possible"] == 8
    assert [c["exposed"] for c in obs["counters"]] == [True, True] + [False] * 6
    assert obs["global_ctrl_reset"] == 0b11     # GENMASK(n-1, 0): pmu_counters_test guest_test_gp_counters


def test_arch_events_llc_over_the_clflush_loop(vpmu: Path) -> None:
    n = 50
    obs = run_probe(vpmu, "arch_events", f"iterations={n}", pmu=EMULATED_INTEL)
    assert obs["workload"]["instructions"] == 3 * n + 5
    assert obs["workload_clflush"]["instructions"] == 5 * n + 5
    loops = {(e["event"], e["loop"]) for e in obs["gp"]}
    assert ("llc_references", "clflush") in loops and ("instructions", "plain") in loops


def test_kvm_exit_count_covers_every_exit_userspace_saw(vpmu: Path) -> None:
    """KVM_GET_STATS_FD "exits" counts in-kernel exits too (finding 4: userspace sees only its own)."""
    obs = run_probe(vpmu, "guest_count", "iterations=40", pmu=EMULATED_AMD)
    work = obs["workload"]
    ticks = work["vm_exits"] - work["global_ctrl_exits"]
    assert ticks == 40
    assert work["kvm_exits"] is not None and work["kvm_exits"] >= ticks + 1   # + the batch's PORT_DONE


# The slow ones (many batches) have tests of their own above or in the suites.
_EMULATED_SKIP = {"arch_events", "filter_fixed_bitmap", "overflow_all"}
_SMALL = {"iterations": "20", "rounds": "5"}


def test_every_pmu_probe_runs_on_a_working_pmu(vpmu: Path) -> None:
    """On the emulated Intel PMU (a PMU that counts), every probe answers ok -- or unsupported with
    the fact that rules it out -- with the observation keys the catalogue documents."""
    for name, spec in PROBES.items():
        if not spec.needs_pmu or name in _EMULATED_SKIP:
            continue
        args = [f"{k}={_SMALL[k]}" for k in spec.params if k in _SMALL]
        rc, result, _ = run(vpmu, *EMULATED_INTEL, "run", name, *args)
        assert result["status"] in ("ok", "unsupported"), (name, result["reason"])
        if result["status"] == "unsupported":
            assert rc == 4 and result["reason"], name
            continue
        for key in _observation_keys(name):
            assert key in result["observations"], (name, key)
