"""What the VMM hides from the guest stays hidden, and what the mediated vPMU must refuse is refused.

The harness shapes the guest's PMU the way the selftests do (agent/protocol.py GUEST_PMU_PARAMS:
CPUID version, GP/fixed counts, PERF_CAPABILITIES), so counters that EXIST in hardware can be
hidden from the guest (finding 9). Upstream: pmu_counters_test.c test_gp_counters() /
guest_rd_wr_counters() (nr_gp 0..N; #GP for hidden counters except MSR_P6_PERFCTR0/1),
vmx_pmu_caps_test.c (PERF_CAPABILITIES), kvm-unit-tests pmu_lbr.c / pmu_pebs.c (which a mediated
guest cannot use: their absence is checked here instead), KVM vmx/svm_recalc_pmu_msr_intercepts
(counters beyond the guest's count stay intercepted). Every #GP check needs kvm.ignore_msrs=N
(finding 14), hence ``requires(ignore_msrs=False)``.
"""

import pytest

GP_VECTOR = 13
MEDIATED_GP = [pytest.mark.requires(mediated_pmu=True, ignore_msrs=False)]
# IA32_PERF_CAPABILITIES LBR_FMT[5:0], PEBS_TRAP[6], PEBS_ARCH_REG[7], PEBS_FMT[11:8], PEBS_BASELINE[14],
# PEBS_TIMING_INFO[17] (vmx_pmu_caps_test.c's LBR/PEBS fields)
PEBS_LBR_BITS = 0x3F | 1 << 6 | 1 << 7 | 0xF << 8 | 1 << 14 | 1 << 17


def _guest_gp_max(facts):
    sup = (facts.get("kvm") or {}).get("supported_pmu") or facts.get("pmu") or {}
    return sup.get("gp_counters") or 0


def _fmt(a):
    return f"{a['op']} {a['name']} -> vector {a['vector']} value {a.get('value')}"


@pytest.mark.parametrize("perf_caps", [pytest.param(-1, id="default"),
                                       pytest.param(0, id="no-fw-writes", marks=pytest.mark.requires(vendor="intel"))])
@pytest.mark.parametrize("nr_gp", range(9), ids=lambda n: f"guest-gp-{n}")
@pytest.mark.requires(mediated_pmu=True, ignore_msrs=False)
def test_hidden_gp_counters(probe, facts, nr_gp, perf_caps):
    """With nr_gp of the host's GP counters given to the guest, counters >= nr_gp #GP and never show a
    host value; counters < nr_gp read back what the guest wrote; GLOBAL_CTRL resets to GENMASK(nr_gp-1, 0).

    Rule: pmu_counters_test.c guest_rd_wr_counters(): expect #GP for i >= nr_gp, except MSR_P6_PERFCTR0/1
    (x86.c kvm_{get,set}_msr_common: writes dropped, reads 0); kvm_pmu_refresh(): global_ctrl =
    GENMASK(nr_gp - 1, 0) (0 when nr_gp = 0; a mediated vCPU loads it even without GLOBAL_CTRL in CPUID).
    """
    if nr_gp > _guest_gp_max(facts):
        pytest.skip(f"KVM's supported PMU has {_guest_gp_max(facts)} GP counters, fewer than {nr_gp}")
    obs = probe("hidden_counters", gp_counters=nr_gp, perf_capabilities=perf_caps).observations
    if perf_caps == 0:
        # without FW_WRITES the guest reaches its counters through IA32_PERFCTRx = MSR_P6_PERFCTR0/1..
        assert obs["base"] == "legacy", f"PERF_CAPABILITIES=0 but the probe used the {obs['base']} base"
    assert obs["exceptions"] == [] or all(e["vector"] == GP_VECTOR for e in obs["exceptions"]), obs["exceptions"]
    assert obs["gp_counters"] == nr_gp, f"the guest was given {obs['gp_counters']} GP counters, asked {nr_gp}"
    bad = []
    for c in obs["counters"]:
        if c["exposed"]:
            for step in ("wrmsr", "rdmsr", "rdpmc", "selector_wrmsr", "clear"):
                if c[step]["vector"] is not None:
                    bad.append(f"exposed {_fmt(c[step])}")
            for step in ("rdmsr", "rdpmc"):
                if c[step]["vector"] is None and c[step]["value"] != c["wrmsr"]["written"]:
                    bad.append(f"exposed {c[step]['name']} read {c[step]['value']:#x}, "
                               f"wrote {c['wrmsr']['written']:#x}")
        elif c["quirk"] == "p6_perfctr":
            if c["wrmsr"]["vector"] is not None or c["rdmsr"]["vector"] is not None or c["rdmsr"]["value"] != 0:
                bad.append(f"MSR_P6_PERFCTR{c['index']} quirk: {_fmt(c['wrmsr'])}; {_fmt(c['rdmsr'])}")
            if c["rdpmc"]["vector"] != GP_VECTOR:
                bad.append(f"hidden {_fmt(c['rdpmc'])}")
        else:
            for step in ("wrmsr", "rdmsr", "rdpmc", "clear"):
                if c[step]["vector"] != GP_VECTOR:
                    bad.append(f"hidden {_fmt(c[step])}")
    assert not bad, f"{nr_gp} of {obs['possible']} GP counters exposed: " + "; ".join(bad)
    reset = obs["global_ctrl_reset"]
    if reset is not None:
        assert reset == (1 << nr_gp) - 1, f"GLOBAL_CTRL after reset {reset:#x}, expected GENMASK({nr_gp}-1, 0)"


@pytest.mark.requires(mediated_pmu=True, ignore_msrs=False)
def test_guards_fault(probe, facts):
    """AnyThread (EVTSEL bit 21, FIXED_CTR_CTRL bit 2), PEBS, DS and LBR MSRs, and a guest WRMSR of
    IA32_PERF_CAPABILITIES all #GP under the mediated vPMU, except where the vendor table says KVM drops
    the reserved bits instead (AMD: AnyThread is a reserved EVNTSEL bit, masked without a fault).

    Rule: intel_pmu_refresh() eventsel_rsvd |= ARCH_PERFMON_EVENTSEL_ANY and fixed_ctr_ctrl_rsvd keep
    only OS/USR/PMI (blocking AnyThread is why selectors stay intercepted, v6 22/44); vmx_pebs_supported()
    is false with enable_mediated_pmu and vmx_get_perf_capabilities() offers no LBR/PEBS; vmx_pmu_caps_test.c
    guest_code(): a guest WRMSR of PERF_CAPABILITIES always #GPs. AMD: the LBRv2 MSRs are not offered.
    """
    from agent.facts.vendors import VENDORS

    obs = probe("guards").observations
    assert obs["accesses"], "no guarded access was made"
    vendor = VENDORS.get((facts.get("cpu") or {}).get("vendor") or "")
    dropped = vendor.guards_dropped if vendor else ()
    bad = [f"{a['case']}: {_fmt(a)}" for a in obs["accesses"]
           if a["vector"] != (None if a["case"] in dropped else GP_VECTOR)]
    assert not bad, "guarded accesses did not #GP (or, where dropped, faulted): " + "; ".join(bad)


@pytest.mark.requires(mediated_pmu=True, vendor="intel")
def test_perf_capabilities_no_pebs_lbr_and_immutable(probe):
    """The guest's PERF_CAPABILITIES carries no LBR/PEBS format, reads what the host set, and the host
    cannot change it once the vCPU has run.

    Rule: vmx_get_perf_capabilities() under the mediated PMU (no LBR, no PEBS); vmx_pmu_caps_test.c
    test_immutable_perf_capabilities() (KVM refuses a different value after KVM_RUN).
    """
    caps = probe("pmu_enum").observations["perf_capabilities"]
    rd = caps["guest_rdmsr"]
    assert rd is not None and rd["vector"] is None, f"guest RDMSR of PERF_CAPABILITIES: {rd}"
    assert rd["value"] == caps["host_before_run"], \
        f"guest reads {rd['value']:#x}, the host set {caps['host_before_run']:#x}"
    assert not rd["value"] & PEBS_LBR_BITS, \
        f"PERF_CAPABILITIES {rd['value']:#x} offers LBR/PEBS formats ({rd['value'] & PEBS_LBR_BITS:#x})"
    assert caps["host_after_run"] == caps["host_before_run"], \
        f"PERF_CAPABILITIES changed after KVM_RUN: {caps['host_before_run']:#x} -> {caps['host_after_run']:#x}"


@pytest.mark.requires(mediated_pmu=True, vendor="intel", ignore_msrs=False)
def test_perf_capabilities_without_pdcm(probe):
    """With CPUID.1:ECX.PDCM cleared by the VMM, IA32_PERF_CAPABILITIES does not exist for the guest
    (RDMSR #GPs) and the host reads 0 and may write only 0: every single-bit value fails.

    Rule: x86.c kvm_get_msr_common() / kvm_set_msr_common() MSR_IA32_PERF_CAPABILITIES return
    KVM_MSR_RET_UNSUPPORTED without guest PDCM (the host's read and its write of 0 are exempt);
    vmx_pmu_caps_test.c perf_capabilities_unsupported. The LBR half of vmx_pmu_caps_test.c
    (lbr_perf_capabilities: LBR_TOS unusable once the PMU CPUID is cleared) cannot apply: the mediated
    vPMU offers no LBR format, so that selftest returns early (test_guards_fault covers the LBR MSRs #GP).
    """
    obs = probe("pmu_enum", pdcm=0).observations
    caps = obs["perf_capabilities"]
    np = caps.get("without_pdcm")
    assert np is not None, f"the pdcm=0 VM measured nothing without PDCM: {caps}"
    rd = caps["guest_rdmsr"]
    assert rd is not None and rd["vector"] == GP_VECTOR, f"guest RDMSR of PERF_CAPABILITIES without PDCM: {rd}"
    assert np["host_read"] == 0, f"host reads PERF_CAPABILITIES {np['host_read']:#x} without PDCM (want 0)"
    assert np["host_set_zero_errno"] == 0, f"host write of 0 refused without PDCM: errno {np['host_set_zero_errno']}"
    assert np["host_set_bits_accepted"] == 0, \
        f"KVM_SET_MSRS took PERF_CAPABILITIES bits {np['host_set_bits_accepted']:#x} without PDCM"


@pytest.mark.requires(mediated_pmu=True, ignore_msrs=False)
@pytest.mark.parametrize("version", range(6), ids=lambda v: f"v{v}")
def test_pmu_version_matrix(probe, facts, version):
    """The guest enumerates exactly the PMU version the VMM set in CPUID (0 to 5), and KVM follows it:
    version 0 = no vPMU, every counter #GPs; from 1 on the GP counters work; GLOBAL_CTRL from 2.

    Rule: KVM never edits CPUID (Documentation/virt/kvm/api.rst); intel_pmu_refresh() takes the version
    from guest CPUID and returns before enabling any counter when it is 0; kvm_vcpu_has_mediated_pmu()
    needs pmu->version != 0; pmu_counters_test.c test_intel_counters() sweeps versions 0..max(host, 5).
    AMD: 0 = no PMU, 1 = PerfCtrExtCore, 2 = PerfMonV2 (the harness's encoding, agent/protocol.py).
    """
    vendor = (facts.get("cpu") or {}).get("vendor")
    if vendor == "amd" and version > 2:
        pytest.skip("AMD has PMU levels 0-2 only (none, PerfCtrExtCore, PerfMonV2)")
    obs = probe("pmu_enum", pmu_version=version).observations
    assert obs["guest_pmu"]["version"] == version, \
        f"the harness gave version {obs['guest_pmu']['version']}, asked {version}"
    assert obs["decoded"]["version"] == version, \
        f"guest CPUID reports version {obs['decoded']['version']}, the VMM set {version}"
    hc = probe("hidden_counters", pmu_version=version).observations
    exposed = [c["index"] for c in hc["counters"] if c["exposed"]]
    if version == 0:
        assert not exposed, f"version 0 (no PMU) still exposes GP counters {exposed}"
        leaks = [_fmt(c[s]) for c in hc["counters"] if c["quirk"] is None for s in ("wrmsr", "rdmsr", "rdpmc")
                 if c[s]["vector"] != GP_VECTOR]
        assert not leaks, "a guest without a PMU reached counters: " + "; ".join(leaks)
    else:
        assert exposed, f"version {version} exposes no GP counter"
        assert (hc["global_ctrl_reset"] is not None) == (version >= 2), \
            f"version {version}: GLOBAL_CTRL reset {hc['global_ctrl_reset']} (global control exists from v2)"
