"""Decode CPUID leaves into the ``cpu`` and ``pmu`` parts of the facts (docs/contracts.md §2).

Field layouts (Intel SDM Vol. 2A "CPUID", Vol. 3B ch. "Performance Monitoring"; AMD APM Vol. 3
"CPUID"):

* 0x0: EBX/EDX/ECX vendor string, EAX max basic leaf.  0x80000000: EAX max extended leaf.
* 0x1 EAX: stepping [3:0], model [7:4], family [11:8], extended model [19:16], extended family
  [27:20]. display family = family + ext family when family == 0xF; display model adds
  ext model << 4 when the display family >= 6 (as arch/x86/lib/cpu.c does).
  ECX[15] PDCM (IA32_PERF_CAPABILITIES exists), ECX[31] hypervisor.
* 0x7.0 EDX[15] hybrid (Intel).
* 0xA (Intel): EAX[7:0] version, [15:8] GP counters, [23:16] GP width, [31:24] EBX length;
  EBX bit i set = architectural event i *unavailable*; ECX fixed-counter bitmask (v5+);
  EDX[4:0] contiguous fixed counters, [12:5] fixed width (both only if version > 1).
* 0x80000001 ECX[23] PerfCtrExtCore (AMD: 6 core counters instead of the 4 legacy ones).
* 0x80000022 (AMD): EAX[0] PerfMonV2, EBX[3:0] NumPerfCtrCore.
* 0x80000002..4: brand string.

Conventions (so that decoded facts and :func:`agent.facts.tables.facts_from_row` agree):

* A leaf above the enumerated maximum reads as zeros ("not enumerated"); a leaf that is within the
  maximum but missing from a partial dump is unknown, and every field derived from it is ``None``.
* ``fixed_counters`` is the contiguous count EDX[4:0] (FC0..FCn-1 all exist);
  ``fixed_counters_mask`` is the full set, ``ECX | ((1 << n) - 1)`` on v5+ (e.g. Clearwater Forest
  FC0-2 + FC4-6 = 0x77 with ``fixed_counters`` 3).
* AMD has no leaf 0xA: ``version`` is KVM's AMD PMU version (2 with PerfMonV2, else 1),
  ``gp_counters`` = ``amd_core_counters`` = EBX[3:0] of 0x80000022 with PerfMonV2, else 6 with
  PerfCtrExtCore, else the 4 legacy counters (arch/x86/kvm/svm/pmu.c amd_pmu_refresh(); perf
  "perf/x86/amd/core: Detect available counters") -- but see :func:`decode_pmu` for the legacy
  case under a hypervisor; 0 counters means version 0; counters are 48 bits wide (APM); no fixed
  counters; ``arch_events_mask`` is ``None`` (an Intel CPUID notion); ``full_width_writes`` and
  ``perf_capabilities`` are ``None`` (IA32_PERF_CAPABILITIES is Intel-only).
* ``perf_capabilities`` is an MSR, not CPUID: decode leaves it ``None`` and
  :func:`apply_perf_capabilities` fills it in. Intel without PDCM has no such MSR, so
  ``full_width_writes`` is ``False`` there.
"""

from __future__ import annotations

from typing import Any

from .cpuid import Leaves, bit
from .vendors import BY_HYPERVISOR_BIT, VENDORS, vendor_name

ZERO = (0, 0, 0, 0)
PERF_CAP_FW_WRITE_BIT = 13

CPU_KEYS = ("vendor", "vendor_id", "family", "model", "stepping", "microcode", "model_name", "uarch",
            "uarch_name", "hybrid", "hypervisor")
PMU_KEYS = ("version", "gp_counters", "gp_width", "fixed_counters", "fixed_width", "arch_events",
            "arch_events_mask", "fixed_counters_mask", "pdcm", "perf_capabilities", "full_width_writes",
            "perfctr_core", "perfmon_v2", "amd_core_counters")


class _Cpuid:
    """Leaf access with the enumerated-maximum rule described in the module docstring."""

    def __init__(self, leaves: Leaves):
        self.leaves = leaves
        l0 = leaves.get((0, 0))
        self.max_basic = l0[0] if l0 else None
        lx = leaves.get((0x80000000, 0))
        if lx is None:
            self.max_ext = None
        else:
            self.max_ext = lx[0] if lx[0] >= 0x80000000 else 0x7FFFFFFF  # no extended leaves

    def get(self, leaf: int, sub: int = 0) -> tuple[int, int, int, int] | None:
        regs = self.leaves.get((leaf, sub))
        if regs is not None:
            return regs
        limit = self.max_ext if leaf >= 0x80000000 else self.max_basic
        if limit is not None and leaf > limit:
            return ZERO
        return None

    def reg(self, leaf: int, index: int, sub: int = 0) -> int | None:
        regs = self.get(leaf, sub)
        return None if regs is None else regs[index]


def _vendor_id(c: _Cpuid) -> str | None:
    regs = c.leaves.get((0, 0))
    if regs is None:
        return None
    raw = b"".join(r.to_bytes(4, "little") for r in (regs[1], regs[3], regs[2]))
    return raw.decode("ascii", errors="replace").strip("\x00 ") or None


def _brand(c: _Cpuid) -> str | None:
    parts = [c.get(leaf) for leaf in (0x80000002, 0x80000003, 0x80000004)]
    if any(p is None for p in parts):
        return None
    raw = b"".join(r.to_bytes(4, "little") for p in parts for r in p)
    text = raw.split(b"\x00", 1)[0].decode("ascii", errors="replace")
    return " ".join(text.split()) or None


def signature(eax: int) -> tuple[int, int, int]:
    """(display family, display model, stepping) from CPUID.1:EAX."""
    base_family = eax >> 8 & 0xF
    family = base_family + (eax >> 20 & 0xFF) if base_family == 0xF else base_family
    model = eax >> 4 & 0xF
    if family >= 6:
        model |= (eax >> 16 & 0xF) << 4
    return family, model, eax & 0xF


def empty_pmu() -> dict[str, Any]:
    return dict.fromkeys(PMU_KEYS)


def decode_cpu(leaves: Leaves) -> dict[str, Any]:
    from .tables import lookup_uarch

    c = _Cpuid(leaves)
    vendor_id = _vendor_id(c)
    vendor = vendor_name(vendor_id)
    eax1 = c.reg(1, 0)
    family, model, stepping = signature(eax1) if eax1 is not None else (None, None, None)
    v = VENDORS.get(vendor)
    if v is None:
        hybrid = None
    elif v.hybrid_cpuid_bit is None:
        hybrid = False
    else:
        leaf, reg, n = v.hybrid_cpuid_bit
        hybrid = bit(c.reg(leaf, reg), n)
    row = lookup_uarch(vendor, family, model, stepping) if family is not None else None
    return {
        "vendor": vendor,
        "vendor_id": vendor_id,
        "family": family,
        "model": model,
        "stepping": stepping,
        "microcode": None,  # not in CPUID; collect_facts() reads it from /proc/cpuinfo
        "model_name": _brand(c),
        "uarch": row["id"] if row else None,
        "uarch_name": row["name"] if row else None,
        "hybrid": hybrid,
        "hypervisor": bit(c.reg(1, 2), 31),
    }


def decode_pmu(leaves: Leaves, vendor: str, amd_legacy_counters: int | None = BY_HYPERVISOR_BIT) -> dict[str, Any]:
    """The ``pmu`` part. ``amd_legacy_counters``: counters to assume for an AMD CPU that enumerates
    neither PerfCtrExtCore nor PerfMonV2. The legacy counters have no CPUID bit: on bare metal
    (no hypervisor bit) they are architectural (4), under a hypervisor CPUID cannot tell whether
    they work, so the default leaves the counts ``None`` there (collect_facts() then asks the
    kernel's perf); KVM's own rule for its guests is 4 (amd_pmu_refresh())."""
    c = _Cpuid(leaves)
    pmu = empty_pmu()
    pmu["pdcm"] = bit(c.reg(1, 2), 15)
    pmu["perfctr_core"] = bit(c.reg(0x80000001, 2), 23)
    ext22 = c.get(0x80000022)
    pmu["perfmon_v2"] = bit(ext22[0], 0) if ext22 is not None else None
    v = VENDORS.get(vendor)
    if v is not None:
        v.decode_pmu(c, pmu, amd_legacy_counters)
    return pmu


def apply_perf_capabilities(pmu: dict[str, Any], value: int | None) -> dict[str, Any]:
    """Record IA32_PERF_CAPABILITIES (MSR 0x345) read from the host, if it was readable."""
    if value is not None:
        pmu["perf_capabilities"] = value
        pmu["full_width_writes"] = bool(value >> PERF_CAP_FW_WRITE_BIT & 1)
    return pmu


def decode_cpuid(leaves: Leaves) -> dict[str, Any]:
    """``{"cpu": {...}, "pmu": {...}}`` decoded from CPUID leaves (see module docstring)."""
    cpu = decode_cpu(leaves)
    return {"cpu": cpu, "pmu": decode_pmu(leaves, cpu["vendor"])}
