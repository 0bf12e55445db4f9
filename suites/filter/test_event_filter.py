"""KVM_SET_PMU_EVENT_FILTER still governs a mediated vPMU.

vpmu.md §3.4: selectors stay intercepted; on a filter change or a selector write KVM recomputes the
hardware ENABLE bit (GP) or the 4-bit FIXED_CTR_CTRL field (fixed) and clears it for a denied event,
while the guest keeps reading back the value it wrote. Filter semantics are KVM's (arch/x86/kvm/pmu.c
is_gp_event_allowed / is_fixed_event_allowed; selftest pmu_event_filter_test.c, vpmu.md §4.1):
allow/deny lists, masked entries (include/exclude by umask mask/match), and fixed_counter_bitmap,
which alone decides fixed counters ("priority over events[]").

Each case is judged from the filter the probe reports having set, evaluated here with KVM's rules;
a counted event must count exactly the workload (errata aside), a denied one must read 0.
"""

import errno

import pytest

MEDIATED = pytest.mark.requires(mediated_pmu=True)
COUNT_ERRATA = pytest.mark.errata("insn_overcount_on_vm_transition", "branch_overcount_on_vm_transition",
                                  "vmrun_counted_as_branch")
FLAG_MASKED = 1  # KVM_PMU_EVENT_FLAG_MASKED_EVENTS

# (event select, unit mask) of the events the probe's guest counts, per vendor (contracts §8).
ENCODINGS = {
    "intel": {"instructions": (0xC0, 0x00), "branches": (0xC4, 0x00)},
    "amd": {"instructions": (0xC0, 0x00), "branches": (0xC2, 0x00)},
}


def _action(flt):
    action = flt["action"]
    if isinstance(action, int):  # KVM_PMU_EVENT_ALLOW = 0, KVM_PMU_EVENT_DENY = 1
        return "allow" if action == 0 else "deny"
    return action


def member(flt, vendor, event):
    """Does the filter's events[] match the event (KVM filter_contains_match on includes/excludes)?"""
    evsel, umask = ENCODINGS[vendor][event]
    if flt["flags"] & FLAG_MASKED:
        include = exclude = False
        for e in flt["events"]:
            e_sel = (e & 0xFF) | ((e >> 24) & 0xF00)
            mask, match, excl = (e >> 56) & 0xFF, (e >> 8) & 0xFF, bool(e >> 55 & 1)
            if e_sel == evsel and (umask & mask) == match:
                exclude |= excl
                include |= not excl
        return include and not exclude
    key = (evsel & 0xFF) | (umask << 8) | ((evsel & 0xF00) << 24)
    return any((e & 0xF0000FFFF) == key for e in flt["events"])


def gp_allowed(flt, vendor, event):
    if flt is None:
        return True
    return member(flt, vendor, event) == (_action(flt) == "allow")


def fixed_allowed(flt, index):
    if flt is None:
        return True
    bit = bool(flt["fixed_counter_bitmap"] >> index & 1)
    return bit if _action(flt) == "allow" else not bit


# case -> what the case must have set up (checked first, so a case cannot pass vacuously):
# action, and whether instructions/branches are members of events[].
SETUP = {
    "none": None,
    "allow_member": ("allow", True),
    "allow_nonmember": ("allow", False),
    "deny_member": ("deny", True),
    "deny_nonmember": ("deny", False),
    "masked_include": ("allow", True),
    "masked_exclude": ("allow", False),
}
GP_CASES = list(SETUP)
FIXED_CASES = ["fixed_allow", "fixed_deny", "fixed_priority"]


def _run(probe, case):
    obs = probe("event_filter", case=case).observations
    assert obs["case"] == case, f"probe answered case {obs['case']!r}"
    assert obs["set_errno"] == 0, f"KVM_SET_PMU_EVENT_FILTER failed: errno {obs['set_errno']}"
    return obs


def _judge(errata, flt, vendor, obs, subjects):
    """subjects: [(label, counts key, event, allowed?)] -> denied must read 0, allowed count exactly."""
    work, counts = obs["workload"], obs["counts"]
    leaks = [f"{label} counted {counts[key]} although the filter denies it"
             for label, key, _, allowed in subjects if not allowed and counts[key] != 0]
    assert not leaks, "; ".join(leaks) + f" (filter {flt})"
    errata.exact_all([(label, counts[key], work[event], work["vm_exits"], event, work.get("kvm_exits"))
                      for label, key, event, allowed in subjects if allowed])


@MEDIATED
@COUNT_ERRATA
@pytest.mark.parametrize("case", GP_CASES)
def test_event_filter_gp(probe, errata, flat_facts, case):
    """GP counters: an allowed event counts exactly, a denied one reads 0 (allow/deny x member/non-member,
    masked include/exclude).

    Rule (vpmu.md §3.4; KVM is_gp_event_allowed): an event matched by the includes and not by the
    excludes is allowed iff the action is ALLOW; any other event iff the action is DENY. A denied event's
    ENABLE bit is cleared in eventsel_hw, so its counter does not move at all.
    """
    vendor = flat_facts["vendor"]
    obs = _run(probe, case)
    flt = obs["filter"]
    setup = SETUP[case]
    if setup is None:
        assert flt is None, f"case none set a filter: {flt}"
    else:
        action, is_member = setup
        assert flt is not None, f"case {case} set no filter"
        assert _action(flt) == action, f"case {case} set action {flt['action']!r}"
        assert bool(flt["flags"] & FLAG_MASKED) == case.startswith("masked"), f"case {case} flags {flt['flags']}"
        wrong = [e for e in ("instructions", "branches") if member(flt, vendor, e) != is_member]
        assert not wrong, f"case {case}: {wrong} {'not ' if is_member else ''}matched by events[] {flt['events']}"
    _judge(errata, flt, vendor, obs, [(f"GP {e} ({case})", e, e, gp_allowed(flt, vendor, e))
                                      for e in ("instructions", "branches")])


@MEDIATED
@pytest.mark.requires(vendor="intel", min_fixed_counters=1)
@COUNT_ERRATA
@pytest.mark.parametrize("case", FIXED_CASES)
def test_event_filter_fixed(probe, errata, flat_facts, case):
    """Fixed counter 0 obeys fixed_counter_bitmap (allow / deny), and the bitmap, not events[], decides it.

    fixed_priority: events[] names FC0's event (instructions) yet the bitmap alone decides FC0
    (KVM is_fixed_event_allowed; selftest test_fixed_counter_bitmap).
    """
    vendor = flat_facts["vendor"]
    obs = _run(probe, case)
    flt = obs["filter"]
    assert flt is not None, f"case {case} set no filter"
    assert obs["counts"]["fixed_instructions"] is not None, "fixed counter 0 was not measured"
    bit = flt["fixed_counter_bitmap"] & 1
    if case == "fixed_priority":
        assert member(flt, vendor, "instructions"), f"fixed_priority: events[] {flt['events']} lacks instructions"
        assert gp_allowed(flt, vendor, "instructions") != fixed_allowed(flt, 0), \
            f"fixed_priority: events[] and the bitmap agree on instructions, nothing is tested ({flt})"
    else:
        assert bit and _action(flt) == case.split("_")[1], f"case {case} set {flt}"
    subjects = [(f"FC0 instructions ({case})", "fixed_instructions", "instructions", fixed_allowed(flt, 0))]
    subjects += [(f"GP {e} ({case})", e, e, gp_allowed(flt, vendor, e)) for e in ("instructions", "branches")]
    _judge(errata, flt, vendor, obs, subjects)


@MEDIATED
@pytest.mark.parametrize("step", ["selector-readback", "counts-before", "stops-when-denied", "resumes-when-allowed"])
def test_filter_update_while_running(probe, step):
    """A filter changed while the guest runs applies at once; the guest still reads its own selector.

    Rule (vpmu.md §3.4, v6 25/44): filter updates reprogram running mediated vCPUs (ENABLE cleared in
    eventsel_hw only), and the guest-visible eventsel is unchanged.
    """
    obs = probe("filter_update").observations
    if step == "selector-readback":
        assert obs["selector_read_after_deny"] == obs["selector_written"], (
            f"guest wrote selector {obs['selector_written']:#x}, read {obs['selector_read_after_deny']:#x} "
            "after the deny: KVM leaked its hardware value into the guest view")
    elif step == "counts-before":
        assert obs["count_before_deny"] > 0, "branches did not count before the deny"
    elif step == "stops-when-denied":
        assert obs["count_after_deny"] == 0, \
            f"denied event still counted {obs['count_after_deny']} branches over a loop"
    else:
        assert obs["count_after_allow"] > 0, "branches did not count again after the filter allowed them"


INVALID = [
    pytest.param("bad_action", errno.EINVAL, id="bad_action-EINVAL"),
    pytest.param("bad_flags", errno.EINVAL, id="bad_flags-EINVAL"),
    pytest.param("too_many_events", errno.E2BIG, id="too_many_events-E2BIG"),
    pytest.param("masked_bad_entry", errno.EINVAL, id="masked_bad_entry-EINVAL"),
]


@MEDIATED
@pytest.mark.parametrize(("case", "expected"), INVALID)
def test_filter_invalid(probe, case, expected):
    """Invalid filters are refused: unknown action or flags and a malformed masked entry -EINVAL, more
    than KVM_PMU_EVENT_FILTER_MAX_EVENTS (300) events -E2BIG.

    Rule: KVM kvm_vm_ioctl_set_pmu_event_filter (arch/x86/kvm/pmu.c); selftest pmu_event_filter_test
    ioctl validation (vpmu.md §3.4, §4.1).
    """
    obs = probe("filter_invalid").observations
    got = [c["errno"] for c in obs["cases"] if c["case"] == case]
    assert got, f"case {case} not measured (measured {[c['case'] for c in obs['cases']]})"
    assert got[0] == expected, \
        f"{case}: errno {got[0]} ({errno.errorcode.get(got[0], 'success')}), expected {errno.errorcode[expected]}"
