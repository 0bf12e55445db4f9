"""One table per CPU vendor: identity, KVM module, PMU event vocabulary (docs/contracts.md §8).

The C side keeps the same names in ``agent/native/include/pmu_events.h``; keep the two in step.
Encodings are (event select, unit mask) as programmed into an event-select MSR.
Sources: Intel SDM Vol. 3B "Pre-defined Architectural Performance Events" (CPUID.0AH:EBX bit order);
Linux tools/testing/selftests/kvm/include/x86/pmu.h (INTEL_ARCH_* / AMD_ZEN_* encodings).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    name: str
    event_select: int
    umask: int


@dataclass(frozen=True)
class Vendor:
    name: str                      # "intel" | "amd"
    vendor_id: str                 # CPUID.0 vendor string
    kvm_module: str                # KVM vendor module exposing enable_mediated_pmu
    arch_events: tuple[Event, ...]  # Intel: CPUID.0AH:EBX bit order; AMD: the Zen core events we use
    fixed_counters: tuple[str, ...] = field(default=())  # index i = fixed counter FCi


INTEL = Vendor(
    name="intel",
    vendor_id="GenuineIntel",
    kvm_module="kvm_intel",
    arch_events=(
        Event("cycles", 0x3C, 0x00),
        Event("instructions", 0xC0, 0x00),
        Event("ref_cycles", 0x3C, 0x01),
        Event("llc_references", 0x2E, 0x4F),
        Event("llc_misses", 0x2E, 0x41),
        Event("branches", 0xC4, 0x00),
        Event("branch_misses", 0xC5, 0x00),
        Event("topdown_slots", 0xA4, 0x01),
        Event("topdown_be_bound", 0xA4, 0x02),
        Event("topdown_bad_spec", 0x73, 0x00),
        Event("topdown_fe_bound", 0x9C, 0x01),
        Event("topdown_retiring", 0xC2, 0x02),
        Event("lbr_inserts", 0xE4, 0x01),
    ),
    fixed_counters=(
        "instructions",      # FC0 INST_RETIRED.ANY
        "cycles",            # FC1 CPU_CLK_UNHALTED.CORE
        "ref_cycles",        # FC2 CPU_CLK_UNHALTED.REF_TSC
        "topdown_slots",     # FC3 TOPDOWN.SLOTS
        "topdown_bad_spec",  # FC4
        "topdown_fe_bound",  # FC5
        "topdown_retiring",  # FC6
    ),
)

AMD = Vendor(
    name="amd",
    vendor_id="AuthenticAMD",
    kvm_module="kvm_amd",
    arch_events=(
        Event("cycles", 0x76, 0x00),
        Event("instructions", 0xC0, 0x00),
        Event("branches", 0xC2, 0x00),
        Event("branch_misses", 0xC3, 0x00),
    ),
)

VENDORS: dict[str, Vendor] = {v.name: v for v in (INTEL, AMD)}
VENDORS_BY_ID: dict[str, Vendor] = {v.vendor_id: v for v in (INTEL, AMD)}

# Python views of contracts §8 (plain names, index = CPUID bit / fixed counter number).
INTEL_ARCH_EVENTS: tuple[str, ...] = tuple(e.name for e in INTEL.arch_events)
INTEL_FIXED_COUNTERS: tuple[str, ...] = INTEL.fixed_counters
AMD_EVENTS: dict[str, int] = {e.name: e.event_select for e in AMD.arch_events}

# KVM vendor modules that are not kvm_intel/kvm_amd but still register a KVM backend.
OTHER_KVM_VENDOR_MODULES: tuple[str, ...] = ("kvm_pvm",)


def vendor_name(vendor_id: str | None) -> str:
    """``GenuineIntel`` -> ``intel``, ``AuthenticAMD`` -> ``amd``, anything else -> ``unknown``."""
    v = VENDORS_BY_ID.get(vendor_id or "")
    return v.name if v else "unknown"


def intel_events_mask(names: list[str] | tuple[str, ...]) -> int:
    """Bit mask (CPUID.0AH:EBX order, set = available) of Intel architectural event names."""
    mask = 0
    for name in names:
        mask |= 1 << INTEL_ARCH_EVENTS.index(name)
    return mask


def intel_events_from_mask(mask: int) -> list[str]:
    return [name for i, name in enumerate(INTEL_ARCH_EVENTS) if mask >> i & 1]
