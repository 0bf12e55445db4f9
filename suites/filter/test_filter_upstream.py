"""Event-filter checks the upstream tests make (pmu_event_filter_test.c; harness-audit.md §2 rows N/P).

Not applicable to the mediated vPMU, so not checked here: svm_pmu_host_guest_test.c's Host-Only /
Guest-Only x EFER.SVME matrix needs a nested (L2) guest, which the minimal harness VM does not run;
its filter half is the same KVM_SET_PMU_EVENT_FILTER path as below.
"""

import errno

import pytest

MEDIATED = pytest.mark.requires(mediated_pmu=True)
COUNT_ERRATA = pytest.mark.errata("insn_overcount_on_vm_transition", "branch_overcount_on_vm_transition",
                                  "vmrun_counted_as_branch")


@MEDIATED
@pytest.mark.requires(vendor="amd")
@COUNT_ERRATA
def test_amd_deny_high_select_keeps_branches(probe, errata):
    """Denying event 0x1C2 (select bits 35:32 = 1) does not deny 0xC2 (branches), which counts exactly.

    Rule: pmu_event_filter_test.c test_amd_deny_list(); KVM filter keys include AMD64_EVENTSEL_EVENT
    bits 35:32.
    """
    obs = probe("event_filter", case="deny_high_select").observations
    assert obs["set_errno"] == 0, f"KVM_SET_PMU_EVENT_FILTER failed: errno {obs['set_errno']}"
    flt = obs["filter"]
    assert flt and any(e >> 32 & 0xF for e in flt["events"]), f"no entry with select bits 35:32 set: {flt}"
    w = obs["workload"]
    errata.exact("branches with 0x1C2 denied", obs["counts"]["branches"], w["branches"], w["vm_exits"], "branches")


ACCEPTED = ["junk_bits_unmasked", "masked_valid", "fixed_bitmap_nonexistent"]


@MEDIATED
@pytest.mark.parametrize("case", ACCEPTED)
def test_filter_accepted(probe, case):
    """KVM accepts what upstream says it must: an unmasked entry with junk bits (~0, flags=0), a masked
    entry with every field at its maximum, and a fixed_counter_bitmap naming counters that do not exist.

    Rule: pmu_event_filter_test.c test_filter_ioctl().
    """
    got = [c["errno"] for c in probe("filter_invalid").observations["cases"] if c["case"] == case]
    assert got, f"case {case} not measured"
    assert got[0] == 0, f"{case}: KVM refused it with errno {got[0]} ({errno.errorcode.get(got[0], '?')})"


@MEDIATED
@pytest.mark.requires(vendor="intel", min_fixed_counters=1)
def test_fixed_counter_bitmap_every_counter(probe, modelled):
    """For every fixed counter and every bitmap, allow and deny (alone and with a GP events[] list): the
    counter counts iff the filter allows its bit.

    Rule: pmu_event_filter_test.c __test_fixed_counter_bitmap(); arch/x86/kvm/pmu.c
    is_fixed_event_allowed() (the bitmap decides fixed counters, events[] does not).
    """
    obs = probe("filter_fixed_bitmap").observations
    assert obs["results"], "no bitmap case measured"
    dead = [i for i, c in enumerate(obs["no_filter"]) if c <= 0 and modelled.fixed(i)]
    assert not dead, f"fixed counters {dead} do not count without a filter: nothing to test"
    bad = []
    for r in obs["results"]:
        assert r["set_errno"] == 0, f"filter {r}: errno {r['set_errno']}"
        if not modelled.fixed(r["counter"]):
            continue
        bit = bool(r["bitmap"] >> r["counter"] & 1)
        allowed = bit if r["action"] == "allow" else not bit
        if allowed != (r["count"] > 0):
            bad.append(f"FC{r['counter']} {r['action']} bitmap={r['bitmap']:#x} events={r['with_events']}: "
                       f"counted {r['count']}")
    assert not bad, "; ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else "")


@MEDIATED
@pytest.mark.parametrize("density", ["sparse", "dense"])
def test_masked_events_upstream_cases(probe, density):
    """The seven upstream masked-event cases give the counts upstream expects, with the entries alone
    (sparse) and after 297 dummy entries (dense, add_dummy_events()).

    Rule: pmu_event_filter_test.c test_masked_events(): per case, which of the load / store /
    load-store events count is stated by the case; the dense variant must agree with the sparse one.
    """
    obs = probe("masked_events", density=density).observations
    assert len(obs["cases"]) == 7, f"{len(obs['cases'])} cases measured, upstream has 7"
    assert all(c["set_errno"] == 0 for c in obs["cases"]), [c["set_errno"] for c in obs["cases"]]
    if density == "dense":
        sparse = probe("masked_events", density="sparse").observations
        for d, s in zip(obs["cases"], sparse["cases"], strict=True):
            got = {k: v > 0 for k, v in d["counts"].items()}
            want = {k: v > 0 for k, v in s["counts"].items()}
            assert got == want, f"case {d['case']}: dense counts {d['counts']} vs sparse {s['counts']}"
