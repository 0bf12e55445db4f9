"""What the guest was not given stays out of reach.

vpmu.md §3.1: counters beyond the guest's count stay intercepted; KVM injects #GP for MSRs and RDPMC
indexes the guest's CPUID does not enumerate (kvm-unit-tests check_invalid_rdpmc_gp; selftest
pmu_counters_test: "#GP expected for non-existent counters except MSR_P6_PERFCTR0/1 (writes dropped,
read 0)"; "fast" RDPMC must always #GP). vpmu.md §1.2: KVM_CAP_PMU_CAPABILITY(KVM_PMU_CAP_DISABLE)
before the first vCPU gives the VM no PMU, and is refused once vCPUs exist.
"""

import errno

import pytest

MEDIATED = pytest.mark.requires(mediated_pmu=True)
# An expected #GP cannot fail with kvm.ignore_msrs=Y (finding 14; kvm-unit-tests [pmu_lbr] checks it).
NO_IGNORE_MSRS = pytest.mark.requires(ignore_msrs=False)
GP_VECTOR = 13


def _describe(a):
    return f"{a['op']} {a['name']} ({a['target']:#x})"


@MEDIATED
@NO_IGNORE_MSRS
@pytest.mark.parametrize("op", ["rdmsr", "wrmsr", "rdpmc"])
def test_unexposed_access_gp(probe, op):
    """Every access to an unexposed counter MSR / RDPMC index raises #GP (no quirk applies).

    Rule (vpmu.md §3.1, v6 22/44): counters beyond the guest's count stay intercepted and KVM injects
    #GP for them; RDPMC(64) #GPs (kvm-unit-tests check_invalid_rdpmc_gp, §4.2), never RDPMC(#counters),
    which on Zen is a data-fabric counter (arch/x86/events/amd/uncore.c RDPMC_BASE_NB; finding 6).
    Hidden counters that exist in hardware: test_hidden.py.
    """
    obs = probe("unexposed").observations
    accesses = [a for a in obs["accesses"] if a["op"] == op and a.get("quirk") is None]
    if not accesses:
        pytest.skip(f"no unexposed {op} target on this PMU ({obs['gp_counters']} GP, "
                    f"{obs['fixed_counters']} fixed counters)")
    bad = [f"{_describe(a)} -> vector {a['vector']} value {a.get('value')}" for a in accesses
           if a["vector"] != GP_VECTOR]
    assert not bad, "unexposed accesses did not #GP: " + "; ".join(bad)


@MEDIATED
@NO_IGNORE_MSRS
@pytest.mark.requires(vendor="intel")
def test_p6_perfctr_quirk(probe):
    """MSR_P6_PERFCTR0/1 beyond the guest's counters: no #GP, reads 0, writes dropped.

    Rule: KVM's intel_pmu_{get,set}_msr treat MSR_P6_PERFCTR0/1 as always present for old guests
    (selftest pmu_counters_test, vpmu.md §4.1).
    """
    obs = probe("unexposed").observations
    quirks = [a for a in obs["accesses"] if a.get("quirk") == "p6_perfctr"]
    if not quirks:
        pytest.skip(f"MSR_P6_PERFCTR0/1 are exposed counters here ({obs['gp_counters']} GP counters)")
    bad = [f"{_describe(a)} -> vector {a['vector']}" for a in quirks if a["vector"] is not None]
    bad += [f"{_describe(a)} read {a['value']:#x}" for a in quirks
            if a["op"] == "rdmsr" and a["vector"] is None and a["value"] != 0]
    assert not bad, "MSR_P6_PERFCTR quirk broken: " + "; ".join(bad)


@MEDIATED
@NO_IGNORE_MSRS
def test_fast_rdpmc_gp(probe):
    """RDPMC with ECX bit 31 ("fast" read) raises #GP in the guest.

    Rule: vpmu.md §4.1 / §4.2 ("fast" RDPMC (bit 31) must always #GP).
    """
    obs = probe("unexposed").observations
    vector = obs["fast_rdpmc"]["vector"]
    assert vector == GP_VECTOR, f"fast RDPMC gave vector {vector}, expected #GP ({GP_VECTOR})"


PMU_DISABLED = [
    pytest.param("cap_disable_errno", 0, id="cap-accepted-before-vcpu"),
    pytest.param("guest_pmu_version", 0, id="guest-cpuid-no-pmu"),
    pytest.param("guest_gp_counters", 0, id="guest-cpuid-no-counters"),
    pytest.param("counter_access_vector", GP_VECTOR, id="counter-access-gp"),
    pytest.param("cap_after_vcpu_errno", errno.EINVAL, id="cap-refused-after-vcpu"),
]


@MEDIATED
@pytest.mark.parametrize(("key", "expected"), PMU_DISABLED)
def test_pmu_disabled_per_vm(probe, key, expected):
    """KVM_PMU_CAP_DISABLE gives the VM no PMU; the cap is refused once a vCPU exists.

    Rule (vpmu.md §1.2, v6 16/44 x86.c): the enable-cap succeeds only while
    !kvm->created_vcpus && !kvm->arch.created_mediated_pmu, else -EINVAL; the disabled VM's counter
    MSRs #GP (pmu_event_filter_test.c test_pmu_config_disable). KVM never edits CPUID
    (Documentation/virt/kvm/api.rst, KVM_CAP_PMU_CAPABILITY: "Usermode should adjust CPUID leaf 0xA"),
    so the CPUID rows check that the VMM (the harness) hid the PMU (finding 3), the #GP row checks KVM.
    """
    obs = probe("pmu_disabled").observations
    assert obs[key] == expected, f"{key} = {obs[key]}, expected {expected}"
