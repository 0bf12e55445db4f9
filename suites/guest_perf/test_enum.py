"""The guest's perf sees the counters its CPUID enumerates.

vpmu.md §1.2-§1.3: a mediated vCPU gets the counters its CPUID enumerates (KVM's supported PMU,
which QEMU ``-cpu host`` passes through); the guest's perf programs them directly.
"""

import pytest

MEDIATED = pytest.mark.requires(mediated_pmu=True)


@MEDIATED
def test_guest_perf_uses_every_enumerated_counter(probe):
    """A group of GP-only events (branches) as large as the guest's CPUID GP count schedules, and
    one more does not.

    Rule: x86 perf validates a group against the counters the CPU enumerates (validate_group) and
    schedules it only if every member gets a counter; the guest boots with nmi_watchdog=0, so no
    counter is taken by the watchdog. Branches has no fixed counter (Intel) and every AMD event is
    GP, so the largest group is exactly the GP counter count.
    """
    obs = probe("guest_perf_enum").observations
    assert obs["guest_nmi_watchdog"] in (0, None), \
        f"guest nmi_watchdog={obs['guest_nmi_watchdog']}: one counter is the watchdog's"
    want = obs["guest_cpuid"]["gp_counters"]
    assert obs["guest_max_group"] == want, (
        f"guest perf schedules {obs['guest_max_group']} GP events at once (stopped by "
        f"{obs['group_stop']}) but its CPUID ({obs['guest_cpuid']['gp_counters_source']}) enumerates {want}")


@MEDIATED
def test_guest_cpuid_is_kvm_supported_pmu(probe):
    """The guest's CPUID enumerates the GP counters KVM says it supports (KVM_GET_SUPPORTED_CPUID).

    Rule: QEMU ``-cpu host`` passes KVM's supported PMU leaves (0xA / 0x80000022) through; KVM
    clamps them to what it can virtualize (vpmu.md §1.3), so the guest sees exactly that many.
    """
    obs = probe("guest_perf_enum").observations
    if obs["accel"] != "kvm":
        pytest.skip(f"guest ran under {obs['accel']}: its CPUID is not KVM's")
    supported = obs["host_kvm_supported_pmu"] or {}
    if supported.get("gp_counters") is None:
        pytest.skip("host facts lack kvm.supported_pmu.gp_counters")
    assert obs["guest_cpuid"]["gp_counters"] == supported["gp_counters"], (
        f"guest CPUID enumerates {obs['guest_cpuid']['gp_counters']} GP counters, KVM supports "
        f"{supported['gp_counters']}")
