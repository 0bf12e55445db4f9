"""Every architectural event counts on every counter that can host it.

vpmu.md §4.1 (selftest pmu_counters_test): per arch event on every GP counter and its fixed counter,
instructions and branches exact (>= only under errata, §5.1), cycles / ref-cycles / top-down
back-/front-end bound / LLC events non-zero, top-down slots and retiring >= instructions.
vpmu.md §4.2 (kvm-unit-tests pmu.c) for AMD: cycles 0x76, instructions 0xc0, branches 0xc2 (VMRUN
counted as a guest branch, §5.3), branch misses 0xc3. Event names follow contracts §8.
The expected instruction and branch counts are the workload's, reported in the same observation.
"""

import pytest

from agent.plugin import counted

MEDIATED = pytest.mark.requires(mediated_pmu=True)
COUNT_ERRATA = pytest.mark.errata("insn_overcount_on_vm_transition", "branch_overcount_on_vm_transition",
                                  "vmrun_counted_as_branch")

INTEL_EVENTS = ["cycles", "instructions", "ref_cycles", "llc_references", "llc_misses", "branches",
                "branch_misses", "topdown_slots", "topdown_be_bound", "topdown_bad_spec",
                "topdown_fe_bound", "topdown_retiring", "lbr_inserts"]
INTEL_FIXED = ["instructions", "cycles", "ref_cycles", "topdown_slots", "topdown_bad_spec",
               "topdown_fe_bound", "topdown_retiring"]
AMD_EVENTS = ["cycles", "instructions", "branches", "branch_misses"]

EXACT = {"instructions", "branches"}
NON_ZERO = {"cycles", "ref_cycles", "llc_references", "llc_misses", "topdown_be_bound", "topdown_fe_bound"}
# Non-zero only over a loop with memory traffic (finding 5): pmu_counters_test.c guest_assert_event_count()
# asserts LLC events only with CLFLUSH(OPT), whose GUEST_MEASURE_EVENT flushes the line each iteration;
# kvm-unit-tests uses min 0 without CLFLUSH. The harness counts them over its clflush loop when it can.
NEEDS_CLFLUSH = {"llc_references", "llc_misses", "topdown_be_bound"}
AT_LEAST_INSTRUCTIONS = {"topdown_slots", "topdown_retiring"}
AT_MOST_BRANCHES = {"branch_misses"}   # a mispredicted retired branch is a retired branch
# topdown_bad_spec, lbr_inserts: may legitimately be 0 over a straight loop (selftest checks none).


def _guest_pmu(facts):
    """The PMU the guest enumerates: KVM's supported CPUID (clamped host PMU), else the host's."""
    return (facts.get("kvm") or {}).get("supported_pmu") or facts.get("pmu") or {}


def _guest_gp_counters(facts):
    return _guest_pmu(facts).get("gp_counters") or 0


def _judge(what, event, count, work, loop="plain"):
    """A non-exact rule for one counter's count; returns a problem string or None."""
    exits = work["vm_exits"]
    if event in NON_ZERO and count == 0 and (event not in NEEDS_CLFLUSH or loop == "clflush"):
        return f"{what} counted 0 over {work['iterations']} iterations"
    if event in AT_LEAST_INSTRUCTIONS and count < work["instructions"]:
        return f"{what} counted {count} < {work['instructions']} instructions retired"
    if event in AT_MOST_BRANCHES and count > work["branches"] + 2 * exits:
        return f"{what} counted {count} > {work['branches']} branches (+{2 * exits} transitions)"
    if count < 0:
        return f"{what} counted {count}"
    return None


def _judge_all(errata, event, named_counts, work, loop="plain"):
    """Plain rule violations fail first (never errata); exact counts are judged together.
    ``named_counts``: (label, count) or (label, count, KVM's exit count over that entry's batch)."""
    if event in EXACT:
        errata.exact_all([(n[0], n[1], work[event], work["vm_exits"], event, n[2] if len(n) > 2 else None)
                          for n in named_counts])
        return
    problems = [p for what, count, *_ in named_counts for p in [_judge(what, event, count, work, loop)] if p]
    assert not problems, "; ".join(problems)


def _check_gp(probe, errata, facts, event, arch_events):
    if event not in arch_events:
        pytest.skip(f"guest CPUID.0AH:EBX (facts pmu.arch_events) lacks {event}")
    obs = probe("arch_events").observations
    entries = [e for e in obs["gp"] if e["event"] == event]
    expected = set(range(_guest_gp_counters(facts)))
    measured = {e["counter"] for e in entries}
    assert expected and measured >= expected, \
        f"{event} not measured on GP counter(s) {sorted(expected - measured)} (measured {sorted(measured)})"
    loops = {e.get("loop", "plain") for e in entries}
    assert len(loops) == 1, f"{event} measured over several loops {loops}"
    loop = loops.pop()
    work = obs["workload_clflush"] if loop == "clflush" else obs["workload"]
    _judge_all(errata, event, [(f"GP{e['counter']} {event}", e["count"], e.get("kvm_exits")) for e in entries],
               work, loop)


@MEDIATED
@pytest.mark.requires(vendor="intel")
@COUNT_ERRATA
@pytest.mark.parametrize("event", counted(*INTEL_EVENTS))
def test_intel_arch_event_on_every_gp_counter(probe, errata, facts, event):
    """An Intel architectural event enumerated in CPUID.0AH:EBX counts correctly on every GP counter."""
    events = _guest_pmu(facts).get("arch_events")
    if events is None:
        events = (facts.get("pmu") or {}).get("arch_events") or []
    _check_gp(probe, errata, facts, event, events)


@MEDIATED
@pytest.mark.requires(vendor="amd")
@COUNT_ERRATA
@pytest.mark.parametrize("event", counted(*AMD_EVENTS))
def test_amd_event_on_every_gp_counter(probe, errata, facts, event):
    """AMD core events (Zen encodings, contracts §8) count correctly on every core counter."""
    _check_gp(probe, errata, facts, event, AMD_EVENTS)


def _fixed_enumerated(facts):
    pmu = _guest_pmu(facts)
    mask = pmu.get("fixed_counters_mask")
    if mask is None:
        mask = (1 << (pmu.get("fixed_counters") or 0)) - 1
    return mask


@MEDIATED
@pytest.mark.requires(vendor="intel", min_fixed_counters=1)
@COUNT_ERRATA
@pytest.mark.parametrize("index", [pytest.param(i, id=f"fc{i}-{e}", marks=pytest.mark.counts(e))
                                   for i, e in enumerate(INTEL_FIXED)])
def test_intel_fixed_counter(probe, errata, facts, index):
    """Fixed counter FCi counts its event (FC0 instructions exact, FC1/FC2 cycles non-zero, ...)."""
    event = INTEL_FIXED[index]
    if not _fixed_enumerated(facts) >> index & 1:
        pytest.skip(f"guest CPUID (KVM supported PMU) does not enumerate fixed counter {index} ({event})")
    obs = probe("arch_events").observations
    entries = [e for e in obs["fixed"] if e["counter"] == index]
    assert entries, f"fixed counter {index} is enumerated but was not measured"
    wrong = [e["event"] for e in entries if e["event"] != event]
    assert not wrong, f"fixed counter {index} reported as {wrong}, FC{index} is {event}"
    _judge_all(errata, event, [(f"FC{index} {event}", e["count"], e.get("kvm_exits")) for e in entries],
               obs["workload"])


@MEDIATED
@pytest.mark.requires(vendor="intel")
@COUNT_ERRATA
def test_unavailable_events_still_count(probe, errata, modelled):
    """Whatever CPUID.0AH says is unavailable (beyond the EAX[31:24] length or with its EBX bit set),
    each event the host has still counts on GP 0: KVM does not police the enumeration.

    Rule: pmu_counters_test.c test_intel_counters() / test_arch_events(): lengths 0..N+1 against
    masks 0, all ones, single and multi-bit, events programmed regardless of what CPUID says. The
    probe measures a subset (agent/drivers/model.py arch_enum_combos): each VM measures every host
    event, so the full sweep (2^N masks) would cost thousands of VMs per run.
    """
    obs = probe("arch_events").observations
    combos = obs["unavailable_enumerated"]
    assert combos, f"no EBX length / mask VM measured: {combos}"
    assert any(u["ebx_length"] == 0 for u in combos), "the EBX-length-0 VM is missing"
    assert any(u["ebx_mask"] and u["ebx_length"] for u in combos), "no VM with unavailable-mask bits"
    w = obs["workload"]
    exact, dead = [], []
    for u in combos:
        tag = f"EBX length {u['ebx_length']} mask {u['ebx_mask']:#x}"
        assert u["gp"], f"no event measured in the {tag} VM"
        exact += [(f"GP0 {e['event']} ({tag})", e["count"], w[e["event"]], w["vm_exits"], e["event"],
                   e.get("kvm_exits")) for e in u["gp"] if e["event"] in EXACT]
        dead += [f"{e['event']} ({tag})" for e in u["gp"]
                 if e["event"] in NON_ZERO - NEEDS_CLFLUSH and e["count"] == 0 and modelled(e["event"])]
    assert not dead, f"events refused where CPUID calls them unavailable (counted 0): {dead}"
    errata.exact_all(exact)
