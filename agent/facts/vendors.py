"""One table per CPU vendor: identity, KVM module, PMU event vocabulary (docs/contracts.md §8),
and every other Intel/AMD difference of the host facts (CPUID decoding, live probes, KVM state,
mediated-vPMU rules). Generic code looks the vendor up once (``VENDORS.get(vendor)``, ``None`` for
an unknown vendor) and reads the table; the vendor-specific functions are defined here, next to it.

The C side keeps the same names in ``agent/native/include/pmu_events.h``; keep the two in step.
Encodings are (event select, unit mask) as programmed into an event-select MSR.
Sources: Intel SDM Vol. 3B "Pre-defined Architectural Performance Events" (CPUID.0AH:EBX bit order);
Linux tools/testing/selftests/kvm/include/x86/pmu.h (INTEL_ARCH_* / AMD_ZEN_* encodings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cpuid import bit
from .rules import text as rule_text

if TYPE_CHECKING:
    from .decode import _Cpuid

# Callable field types of the table (see the Vendor fields below).
PmuDecoder = Callable[["_Cpuid", dict[str, Any], "int | None"], None]
CpuRules = Callable[[dict[str, Any], dict[str, Any], bool, bool], list[str]]


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
    # Fills the vendor part of a ``pmu`` dict from CPUID (decode.decode_pmu() has done the common
    # bits: pdcm, perfctr_core, perfmon_v2); the int is decode_pmu()'s ``amd_legacy_counters``.
    decode_pmu: PmuDecoder
    # Mediated-vPMU reasons from the ``cpu`` and ``pmu`` facts (bools: facts come from a CPUID dump;
    # the vendor module's enable_mediated_pmu reads Y). Texts: agent/facts/rules.py.
    mediated_cpu_rules: CpuRules
    # (``pmu`` key, reason): KVM's supported CPUID must have that key truthy for mediated vPMU.
    kvm_supported_rule: tuple[str, str]
    fixed_counters: tuple[str, ...] = field(default=())  # index i = fixed counter FCi
    # (leaf, register index, bit) of the hybrid flag; ``None``: the vendor makes no hybrid CPUs.
    hybrid_cpuid_bit: tuple[int, int, int] | None = None
    # Live host with PDCM: read IA32_PERF_CAPABILITIES (MSR 0x345) for full-width writes.
    has_perf_capabilities: bool = False
    # Live host where CPUID leaves the counters unknown (AMD legacy counters under a hypervisor):
    # ask whether the kernel's perf registered a core PMU.
    perf_probes_legacy_counters: bool = False
    # ``pmu`` keys zeroed, beyond the common ones, in KVM's supported PMU when kvm.enable_pmu=N.
    zero_without_kvm_pmu: tuple[str, ...] = field(default=())
    # Cases of the ``guards`` probe KVM takes without #GP, dropping the reserved bits instead.
    guards_dropped: tuple[str, ...] = field(default=())


# --- Intel ------------------------------------------------------------------------------------

MIN_INTEL_VERSION = 4  # mediated vPMU needs PERF_GLOBAL_STATUS_SET (architectural PMU v4)


def _intel_decode_pmu(c: _Cpuid, pmu: dict[str, Any], amd_legacy_counters: int | None) -> None:
    a = c.get(0xA)
    if a is not None:
        eax, ebx, ecx, edx = a
        version = eax & 0xFF
        length = eax >> 24 & 0xFF
        mask = ~ebx & ((1 << length) - 1)
        nfixed = edx & 0x1F if version > 1 else 0
        pmu.update(
            version=version,
            gp_counters=eax >> 8 & 0xFF,
            gp_width=eax >> 16 & 0xFF,
            fixed_counters=nfixed,
            fixed_width=edx >> 5 & 0xFF if version > 1 else 0,
            arch_events=[n for i, n in enumerate(INTEL_ARCH_EVENTS) if mask >> i & 1],
            arch_events_mask=mask,
            fixed_counters_mask=((1 << nfixed) - 1) | (ecx if version >= 5 else 0),
        )
    pmu["full_width_writes"] = False if pmu["pdcm"] is False else None
    pmu["amd_core_counters"] = 0


def _intel_mediated_cpu_rules(cpu: dict[str, Any], pmu: dict[str, Any], from_dump: bool,
                              kvm_checked: bool = False) -> list[str]:
    """``kvm_checked``: <vendor>.enable_mediated_pmu reads Y, so KVM has already verified
    FW_WRITES itself (finding 8): an unreadable PERF_CAPABILITIES is no reason then."""
    reasons = []
    version = pmu.get("version")
    if version is None:
        reasons.append(rule_text("intel_version_unknown"))
    elif version < MIN_INTEL_VERSION:
        reasons.append(rule_text("intel_version_low", version))
    fw = pmu.get("full_width_writes")
    if fw is None and not kvm_checked:
        reasons.append(rule_text("intel_fw_unknown", "not in a CPUID dump" if from_dump else "unreadable"))
    elif fw is False:
        reasons.append(rule_text("intel_no_pdcm" if pmu.get("pdcm") is False else "intel_fw_clear"))
    hybrid = cpu.get("hybrid")
    if hybrid is None:
        reasons.append(rule_text("intel_hybrid_unknown"))
    elif hybrid:
        reasons.append(rule_text("intel_hybrid"))
    return reasons


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
    decode_pmu=_intel_decode_pmu,
    mediated_cpu_rules=_intel_mediated_cpu_rules,
    kvm_supported_rule=("version", rule_text("intel_kvm_no_pmu")),
    hybrid_cpuid_bit=(0x7, 3, 15),  # CPUID.7.0:EDX[15]
    has_perf_capabilities=True,
    zero_without_kvm_pmu=("arch_events_mask",),
)


# --- AMD --------------------------------------------------------------------------------------

AMD_LEGACY_COUNTERS = 4
AMD_EXT_CORE_COUNTERS = 6
AMD_COUNTER_WIDTH = 48
# decode_pmu()'s default ``amd_legacy_counters``: decide the legacy counters by the hypervisor bit.
BY_HYPERVISOR_BIT = -1


def _amd_decode_pmu(c: _Cpuid, pmu: dict[str, Any], amd_legacy_counters: int | None) -> None:
    v2, ext = pmu["perfmon_v2"], pmu["perfctr_core"]
    if v2:
        n = c.reg(0x80000022, 1) & 0xF
    elif v2 is False and ext:
        n = AMD_EXT_CORE_COUNTERS
    elif v2 is False and ext is False:
        n = amd_legacy_counters
        if n == BY_HYPERVISOR_BIT:
            hv = bit(c.reg(1, 2), 31)
            n = None if hv is not False else AMD_LEGACY_COUNTERS
    else:
        n = None
    if n is not None:
        pmu.update(
            version=(2 if v2 else 1) if n else 0,
            gp_counters=n,
            gp_width=AMD_COUNTER_WIDTH if n else 0,
            fixed_counters=0,
            fixed_width=0,
            arch_events=[e.name for e in AMD.arch_events] if n else [],
            fixed_counters_mask=0,
            amd_core_counters=n,
        )


def _amd_mediated_cpu_rules(cpu: dict[str, Any], pmu: dict[str, Any], from_dump: bool,
                            kvm_checked: bool = False) -> list[str]:
    v2 = pmu.get("perfmon_v2")
    if v2 is None:
        return [rule_text("amd_v2_unknown")]
    if not v2:
        return [rule_text("amd_no_v2")]
    return []


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
    decode_pmu=_amd_decode_pmu,
    mediated_cpu_rules=_amd_mediated_cpu_rules,
    kvm_supported_rule=("perfmon_v2", rule_text("amd_kvm_no_v2")),
    perf_probes_legacy_counters=True,
    zero_without_kvm_pmu=("amd_core_counters",),
    # svm/pmu.c amd_pmu_set_msr(): an EVNTSEL write is masked (data &= ~pmu->reserved_bits) and
    # succeeds; reserved_bits include bit 21 (AnyThread on Intel), so it is dropped, never a #GP.
    guards_dropped=("anythread_evtsel",),
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
