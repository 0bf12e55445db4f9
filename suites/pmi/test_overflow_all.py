"""Overflow and PMI on every counter (kvm-unit-tests x86/pmu.c check_counter_overflow).

Each GP and fixed counter in turn counts branches (never emulated by KVM, so the wrap is a hardware
one: finding 7) from 64 below overflow, with and without the INT bit. Intel masks LVTPC when it
delivers a PMI (lapic.c kvm_apic_local_deliver for LVTPC on Intel-compatible guests; SDM 13.5.1);
the guest unmasks it after each PMI, so every later PMI must arrive too.
"""

import pytest

MEDIATED = pytest.mark.requires(mediated_pmu=True)
LVT_MASKED = 1 << 16


@MEDIATED
def test_overflow_and_pmi_on_every_counter(probe, facts, modelled):
    """Every counter wraps, sets its GLOBAL_STATUS bit, and raises exactly one PMI iff INT is set."""
    obs = probe("overflow_all").observations
    assert obs["counters"], "no counter measured"
    intel = (facts.get("cpu") or {}).get("vendor") == "intel"
    bad = []
    for c in obs["counters"]:
        if c["kind"] == "fixed" and not modelled.fixed(c["index"]):
            continue            # it counts an event this host's PMU does not model: it never wraps
        name = f"{c['kind']}{c['index']} INT={int(c['int'])}"
        bit = c["index"] if c["kind"] == "gp" else 32 + c["index"]
        if c["global_status"] is not None and not c["global_status"] >> bit & 1:
            bad.append(f"{name}: GLOBAL_STATUS {c['global_status']:#x} lacks bit {bit}")
        if c["interrupts"] != (1 if c["int"] else 0):
            bad.append(f"{name}: {c['interrupts']} PMIs")
        if intel and c["int"] and c["interrupts"] and not (c["lvtpc_after"] or 0) & LVT_MASKED:
            bad.append(f"{name}: LVTPC {c['lvtpc_after']} not masked after the PMI")
    assert not bad, "; ".join(bad)
