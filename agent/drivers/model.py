"""The ``model`` driver: a simulated host answering the probe catalogue from a model of a CORRECT
mediated vPMU (Linux 7.0+) on one microarchitecture, bent by that CPU's errata and, optionally, by
injected faults that mimic known classes of KVM bugs (``inventory/faults.yaml``).

Nothing here touches hardware. Everything is deterministic: every number comes from the host name,
the probe and its parameters, so reruns agree. Observations are raw facts, never verdicts.

The simulated guest loop is the harness's (agent/native/vmguest/entry.S guest_measure(),
agent/native/include/guest_abi.h MEASURE_*; ``N`` = iterations)::

    instructions = 3 * N + 5       # {OUT|NOP, DEC, JNZ} per iteration; 4 moves + the disabling WRMSR
    branches     = N               # the JNZ
    vm_exits     = forced + global_ctrl_exits   # N with one OUT per iteration, else 0; +1 when
                                   # KVM intercepts GLOBAL_CTRL (the enabling WRMSR's entry and the
                                   # disabling WRMSR's exit fall in the window)

The clflush loop (arch_events' LLC events, pmu_counters_test.c GUEST_MEASURE_EVENT) retires 5 per
iteration (CLFLUSH, MFENCE, MOV, DEC, JNZ) + 5.

Each KVM rule below is in ONE place here, with its source; the numbers come from inventory/kvm.yaml
(``kvm_behaviour()``), the errata from inventory/errata.yaml:
- what the guest gets (``_guest_pmu``): the harness shapes the guest CPUID like the selftests
  (protocol GUEST_PMU_PARAMS); by default KVM's supported PMU: version min(host, clamp) (kvm.yaml
  ``version_clamp``), GP counters min(host, max), fixed counters min(host, max_fixed), except the
  Intel version, raised to what a probe needs (4 for GLOBAL_STATUS_SET, ``status_set_min_version``);
- which path KVM takes (``kvm_path``): kvm.yaml ``global_ctrl_passthrough`` / ``rdpmc_passthrough``
  (pmu.c kvm_need_any_pmc_intercept / kvm_need_rdpmc_intercept): on SPR/EMR/GNR under 7.0 the guest
  has 3 fixed counters against the host's 4, so GLOBAL_CTRL and RDPMC are intercepted;
- AMD VMRUN (``_loop``): every VM-entry inside the window adds one instruction AND one branch
  (lore "[PATCH 5/5] KVM: x86/pmu: Hide guest counter updates from the VMRUN instruction"), and
  host interrupts add VM-entries userspace never sees (kvm-unit-tests x86/pmu.c adjust_events_range);
- emulated instructions (``_pmi``): KVM bumps mediated counters in software for what it emulates
  (kvm.yaml ``emulated_insns_counted``): an overflow landing there raises KVM_REQ_PMI, no host VPMI;
- a PMU-disabled VM's CPUID is what the VMM (the harness) set: no PMU (Documentation/virt/kvm/api.rst
  KVM_CAP_PMU_CAPABILITY: "Usermode should adjust CPUID leaf 0xA");
- LLC events count only over the clflush loop; over the plain loop they may be 0.

Other fixed choices (the suites judge these):
- AMD counter_width: ``legacy_write`` is null (no 32-bit alias); a write beyond the width does not #GP,
  it reads back truncated to the width. Intel: legacy alias sign-extends bit 31; beyond width #GPs.
- pmi: a masked guest LVTPC is mirrored into the hardware LVTPC, so neither the guest nor the host VPMI
  line sees an interrupt (``host_vpmi_after == host_vpmi_before``); the status bit is set either way.
- event_filter: fixed counters obey only ``fixed_counter_bitmap`` (KVM's is_fixed_event_allowed()), so an
  allow list with bitmap 0 stops fixed counter 0; ``fixed_priority`` denies FC0's event in events[] with
  bitmap 0 (GP instructions stop, FC0 counts). ``filter.flags`` 1 = KVM_PMU_EVENT_FLAG_MASKED_EVENTS.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.protocol import E2BIG, EBUSY, EINVAL, EOPNOTSUPP, PROBES, ProbeResult, parse_params

REPO = Path(__file__).resolve().parents[2]
FAULTS_FILE = REPO / "inventory" / "faults.yaml"

# The faults this model implements -> the probes each one bends (inventory/faults.yaml must agree).
FAULTS: dict[str, tuple[str, ...]] = {
    "counters_not_stopped_at_exit": ("guest_count", "arch_events", "event_filter", "filter_update",
                                     "all_counters", "cmask", "counter_freeze", "filter_fixed_bitmap",
                                     "fixed_counters", "privilege", "running_write", "umask_pair"),
    "exclude_guest_not_enforced": ("host_excludes_guest",),
    "exclusivity_missing": ("exclusivity",),
    "stale_counters_new_vm": ("fresh_state",),
    "cross_context_leak": ("cross_context",),
    "filter_ignored": ("event_filter", "filter_update"),
    "fixed_bitmap_ignored": ("event_filter", "filter_fixed_bitmap"),
    "filter_update_not_applied": ("filter_update",),
    "pmi_lost": ("pmi", "overflow_all"),
    "pmi_as_host_nmi": ("pmi",),
    "global_ctrl_not_restored": ("global_ctrl", "arch_events", "event_filter"),
    "wrong_counter_width": ("counter_width", "rdpmc"),
    "unexposed_counters_accessible": ("unexposed", "pmu_disabled", "hidden_counters"),
    "filter_select_truncated": ("event_filter",),
    "anythread_allowed": ("guards",),
    "pebs_lbr_exposed": ("guards", "pmu_enum"),
    "counters_run_when_disabled": ("counter_freeze",),
    "cmask_ignored": ("cmask",),
    "running_write_lost": ("running_write",),
    "privilege_filter_ignored": ("privilege",),
    "filter_umask_ignored": ("umask_pair",),
    "k7_not_aliased": ("legacy_k7",),
    "lvtpc_mask_lost": ("overflow_all",),
    "upper_counters_not_loaded": ("all_counters",),
    "guest_version_ignored": ("hidden_counters",),
    "fixed_rsvd_bits_open": ("fixed_counters",),
    "filter_rejects_valid": ("filter_invalid",),
    "host_events_stay_out": ("host_excludes_guest",),
    "v1_guest_gets_global_ctrl": ("hidden_counters",),
    "pmcx_without_fw_writes": ("counter_width",),
    "unavailable_events_refused": ("arch_events",),
    "perf_caps_without_pdcm": ("pmu_enum",),
    "unavailable_mask_refused": ("arch_events",),
    "host_guest_bits_ignored": ("privilege",),
}

# Symptom classes (contracts §6) the model turns into counts; the others (ht_counter_corruption,
# min_sample_period) have no effect on these probes.
PER_EXIT_SYMPTOMS: dict[str, str] = {
    "insn_overcount_on_vm_transition": "instructions",
    "branch_overcount_on_vm_transition": "branches",
}
VMRUN_SYMPTOM = "vmrun_counted_as_branch"
GLOBAL_CTRL_SYMPTOM = "global_ctrl_cleared_on_vm_exit"

EVENT_FILTER_CASES = ("none", "allow_member", "allow_nonmember", "deny_member", "deny_nonmember",
                      "masked_include", "masked_exclude", "fixed_allow", "fixed_deny", "fixed_priority",
                      "deny_high_select")
# Counted over the clflush loop where the guest has CLFLUSH (pmu_counters_test.c GUEST_MEASURE_EVENT).
CLFLUSH_EVENTS = ("llc_references", "llc_misses", "topdown_be_bound")

# protocol GUEST_PMU_PARAMS (absent in older catalogues): shape the guest, never a handler's argument.
SHAPE_KEYS = ("pmu_version", "gp_counters", "gp_width", "fixed_counters", "fixed_bitmap", "perf_capabilities",
              "pdcm")
# Probes that still run with 0 guest GP counters (they look at what is NOT there).
NO_COUNTER_PROBES = {"hidden_counters", "pmu_enum", "guards", "pmu_disabled", "exclusivity", "fixed_counters"}
# IA32_PERF_CAPABILITIES LBR_FMT[5:0], PEBS_TRAP[6], PEBS_ARCH_REG[7], PEBS_FMT[11:8], PEBS_BASELINE[14],
# PEBS_TIMING_INFO[17]: all 0 for a mediated guest (vmx_get_perf_capabilities; vmx_pmu_caps_test.c).
PEBS_LBR_CAP_BITS = 0x24FFF & ~0x3F | 0x5  # what a leaking KVM would show: LBR format 5 and PEBS bits
# (case, op, MSR) the guards probe touches, per vendor (protocol "guards").
GUARD_CASES: dict[str, list[tuple[str, str, int]]] = {
    "intel": [("anythread_evtsel", "wrmsr", 0x186), ("anythread_fixed_ctrl", "wrmsr", 0x38D),
              ("pebs_enable", "wrmsr", 0x3F1), ("ds_area", "wrmsr", 0x600), ("lbr_select", "rdmsr", 0x1C8),
              ("lbr_tos", "rdmsr", 0x1C9), ("lbr_from0", "rdmsr", 0x680), ("arch_lbr_ctl", "rdmsr", 0x14CE),
              ("perf_capabilities_write", "wrmsr", 0x345)],
    "amd": [("anythread_evtsel", "wrmsr", 0xC0010200), ("amd_lbr_select", "rdmsr", 0xC000010E)],
}
PEBS_LBR_CASES = {"pebs_enable", "ds_area", "lbr_select", "lbr_tos", "lbr_from0", "arch_lbr_ctl", "amd_lbr_select"}
# Probes whose guest needs a newer Intel PMU version than KVM reports (kvm.yaml version_clamp):
# GLOBAL_STATUS_SET exists only for version > 3 (kvm.yaml status_set_min_version).
PROBE_MIN_VERSION = {"overflow_status": 4}

# Event-select bits (same positions on Intel and AMD).
EVTSEL_USR, EVTSEL_OS, EVTSEL_INT, EVTSEL_EN = 1 << 16, 1 << 17, 1 << 20, 1 << 22
EVTSEL_ANY = 1 << 21                    # Intel AnyThread (v3+); reserved in KVM's guest selectors
FIXED_CTRL_OS, FIXED_CTRL_ANY = 0x1, 0x4    # IA32_FIXED_CTR_CTRL field of fixed counter 0
# What the guards probe writes, per case (lib/probes_isolation.c probe_guards, lib/pmu.c *_guards);
# reads write nothing. anythread_evtsel and perf_capabilities_write depend on the guest (_guard_written).
GUARD_WRITES = {"anythread_fixed_ctrl": FIXED_CTRL_OS | FIXED_CTRL_ANY, "pebs_enable": 0x1,
                "ds_area": 0x200000}
KVM_PMU_EVENT_FLAG_MASKED_EVENTS = 1
PMI_VECTOR = 0x20          # the vector the harness programs into the guest LVTPC
OVERFLOW_LOOP = 1000       # branches of the overflow_all loop (kvm-unit-tests check_counter_overflow)
GP_VECTOR = 13


def arch_enum_combos() -> list[tuple[int, int]]:
    """The (CPUID.0AH EBX length, unavailable mask) pairs arch_events measures, as
    lib/probes_counters.c arch_events_unenumerated: a subset of pmu_counters_test.c
    test_intel_counters()'s sweep -- length 0, N with all bits, N with alternate bits, N+1 with one."""
    from agent.facts.vendors import VENDORS

    n = len(VENDORS["intel"].arch_events)
    full = (1 << n) - 1
    return [(0, 0), (n, full), (n, 0x55555555 & full), (n + 1, 1 << 1)]


@dataclass(frozen=True)
class Layout:
    """Per-vendor PMU MSR layout (Intel SDM Vol. 4; AMD APM Vol. 2 §13.2; vpmu.md §3.2)."""
    counter: tuple[int, int, str]        # (base, stride, name prefix) of the counter MSRs
    selector: tuple[int, int, str]
    legacy_counter: tuple[int, int, str] | None   # Intel IA32_PERFCTRx (32-bit alias)
    fixed_counter: tuple[int, int, str] | None
    fixed_rdpmc_flag: int


LAYOUTS: dict[str, Layout] = {
    "intel": Layout(counter=(0x4C1, 1, "IA32_PMC"), selector=(0x186, 1, "IA32_PERFEVTSEL"),
                    legacy_counter=(0xC1, 1, "IA32_PERFCTR"), fixed_counter=(0x309, 1, "IA32_FIXED_CTR"),
                    fixed_rdpmc_flag=1 << 30),
    "amd": Layout(counter=(0xC0010201, 2, "MSR_F15H_PERF_CTR"), selector=(0xC0010200, 2, "MSR_F15H_PERF_CTL"),
                  legacy_counter=None, fixed_counter=None, fixed_rdpmc_flag=0),
}
MSR_P6_PERFCTR = (0xC1, 0xC2)     # Intel: KVM reads 0 / drops writes for these even when not enumerated

# Fallback event vocabulary (contracts §8) if agent.facts.vendors is not importable.
_FALLBACK_EVENTS = {
    "intel": {"cycles": (0x3C, 0), "instructions": (0xC0, 0), "ref_cycles": (0x3C, 1),
              "llc_references": (0x2E, 0x4F), "llc_misses": (0x2E, 0x41), "branches": (0xC4, 0),
              "branch_misses": (0xC5, 0), "topdown_slots": (0xA4, 1), "topdown_be_bound": (0xA4, 2),
              "topdown_bad_spec": (0x73, 0), "topdown_fe_bound": (0x9C, 1), "topdown_retiring": (0xC2, 2),
              "lbr_inserts": (0xE4, 1)},
    "amd": {"cycles": (0x76, 0), "instructions": (0xC0, 0), "branches": (0xC2, 0), "branch_misses": (0xC3, 0)},
}
_FALLBACK_FIXED = ("instructions", "cycles", "ref_cycles", "topdown_slots", "topdown_bad_spec",
                   "topdown_fe_bound", "topdown_retiring")


def _event_tables() -> tuple[dict[str, dict[str, tuple[int, int]]], tuple[str, ...]]:
    try:
        from agent.facts.vendors import INTEL_FIXED_COUNTERS, VENDORS
    except ImportError:
        return _FALLBACK_EVENTS, _FALLBACK_FIXED
    events = {v: {e.name: (e.event_select, e.umask) for e in VENDORS[v].arch_events} for v in ("intel", "amd")}
    return events, tuple(INTEL_FIXED_COUNTERS)


EVENTS, FIXED_EVENTS = _event_tables()


# (instructions per iteration, extra instructions, branches per iteration) of the harness loops
# (agent/native/include/guest_abi.h MEASURE_*; protocol WORKLOAD_CLFLUSH).
LOOPS = {"plain": (3, 5, 1), "exit_each": (3, 5, 1), "clflush": (5, 5, 1)}


def workload(iterations: int, loop: str = "exit_each", global_ctrl_exits: int = 0) -> dict[str, Any]:
    """What the harness's measured guest code retires by construction (module docstring)."""
    per, extra, br = LOOPS[loop]
    forced = iterations if loop == "exit_each" else 0
    return {"iterations": iterations, "instructions": per * iterations + extra, "branches": br * iterations,
            "vm_exits": forced + global_ctrl_exits, "global_ctrl_exits": global_ctrl_exits, "loop": loop,
            "kvm_exits": None}


def load_faults(path: Path = FAULTS_FILE) -> list[dict[str, Any]]:
    import yaml

    with open(path) as fh:
        return yaml.safe_load(fh) or []


def _mask(bits: int) -> int:
    return (1 << bits) - 1 if bits > 0 else 0


def _sext32(value: int, width: int) -> int:
    v = value & 0xFFFFFFFF
    if v & 0x80000000:
        v |= ~0xFFFFFFFF
    return v & _mask(width)


# ------------------------------------------------------------------------------------------------
# facts


def _host_model(host: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name = host.get("name") or "?"
    model = host.get("model")
    if not isinstance(model, dict) or not model.get("uarch"):
        raise ValueError(f"host {name}: model.uarch is required for driver: model")
    return name, model


def check_faults(host_name: str, faults: Any) -> list[str]:
    """Validate a host's ``model.faults`` list against the implemented faults."""
    if faults is None:
        return []
    if not isinstance(faults, list) or not all(isinstance(f, str) for f in faults):
        raise ValueError(f"host {host_name}: model.faults must be a list of fault ids")
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"host {host_name}: model.faults has unknown fault {unknown[0]!r} "
                         f"(known: {', '.join(sorted(FAULTS))})")
    return list(faults)


def _kvm_row(release: str | None = None, row_id: str | None = None,
             sup: dict[str, Any] | None = None) -> dict[str, Any]:
    from agent.facts.tables import kvm_behaviour, load_kvm

    if row_id is not None:
        for row in load_kvm():
            if row["id"] == row_id:
                return row
        raise ValueError(f"model.kvm {row_id!r} is not an id of inventory/kvm.yaml "
                         f"(known: {', '.join(r['id'] for r in load_kvm())})")
    return kvm_behaviour(release, sup)


def supported_pmu(pmu: dict[str, Any], vendor: str, kvm: dict[str, Any] | None = None) -> dict[str, Any]:
    """What KVM_GET_SUPPORTED_CPUID reports: the host PMU with the clamps of inventory/kvm.yaml
    (``kvm``: a row; default the newest released one)."""
    sup = dict(pmu)
    row = kvm or _kvm_row()
    if vendor not in row["max_gp_counters"]:
        return sup
    if sup.get("version") is not None and vendor == "intel":
        sup["version"] = min(sup["version"], row["version_clamp"])
    if sup.get("gp_counters") is not None:
        sup["gp_counters"] = min(sup["gp_counters"], row["max_gp_counters"][vendor])
    fixed_max = row["max_fixed_counters"][vendor]
    if sup.get("fixed_counters_mask") is not None:
        sup["fixed_counters_mask"] &= _mask(fixed_max)
        sup["fixed_counters"] = bin(sup["fixed_counters_mask"]).count("1")
    elif sup.get("fixed_counters") is not None:
        sup["fixed_counters"] = min(sup["fixed_counters"], fixed_max)
    return sup


def build_facts(host: dict[str, Any], cpu: dict[str, Any], pmu: dict[str, Any],
                mediated: dict[str, Any], errata: list[dict[str, Any]]) -> dict[str, Any]:
    """Assemble contracts §2 facts for a simulated host from already-resolved parts."""
    name, model = _host_model(host)
    faults = check_faults(name, model.get("faults"))
    vendor = cpu.get("vendor") or "unknown"
    module = {"intel": "kvm_intel", "amd": "kvm_amd"}.get(vendor)
    cmdline = f"nmi_watchdog=0 {module}.enable_mediated_pmu=1" if module else "nmi_watchdog=0"
    row = _kvm_row(row_id=model.get("kvm"))
    return {
        "schema": 1,
        "simulated": True,
        "cpu": dict(cpu),
        "pmu": dict(pmu),
        "kvm": {"present": True, "module": module, "vendor_modules": [module] if module else [],
                "enable_pmu": True, "enable_mediated_pmu": True, "ignore_msrs": False,
                "mediated_vcpu_errno": 0, "behaviour": row["id"],
                "supported_pmu": supported_pmu(pmu, vendor, row)},
        "kernel": {"release": "simulated", "cmdline": cmdline, "nmi_watchdog": 0, "perf_event_paranoid": 2},
        "mediated_pmu": dict(mediated),
        "errata": [dict(e) for e in errata],
        "faults": faults,
    }


def simulated_facts(host: dict[str, Any]) -> dict[str, Any]:
    """Host facts (contracts §2) for an inventory entry with ``driver: model``.

    cpu+pmu from the microarch row (``agent.facts.facts_from_row``), errata from ``inventory/errata.yaml``
    for that CPU (or the explicit ``model.errata`` ids), ``mediated_pmu`` from ``mediated_verdict``.
    """
    from agent import facts as F

    name, model = _host_model(host)
    uarch = model["uarch"]
    check_faults(name, model.get("faults"))
    row = F.uarch_by_id(uarch)
    if row is None:
        known = ", ".join(r["id"] for r in F.load_microarch())
        raise ValueError(f"host {name}: model.uarch {uarch!r} is not in inventory/microarch.yaml (known: {known})")
    stepping = model.get("stepping")
    if stepping is not None and not isinstance(stepping, int):
        raise ValueError(f"host {name}: model.stepping must be an integer")
    part = F.facts_from_row(row, stepping=stepping)
    cpu, pmu = dict(part["cpu"]), dict(part["pmu"])
    matched = F.match_errata(cpu["vendor"], cpu["family"], cpu["model"], cpu.get("stepping"),
                             cpu.get("microcode"))
    explicit = model.get("errata")
    errata = matched if explicit is None else _explicit_errata(name, explicit, matched, F.load_errata())
    facts = build_facts(host, cpu, pmu, {"status": "unavailable", "reasons": []}, errata)
    if F.mediated_verdict(facts)["status"] != "available":
        # The host is booted with <module>.enable_mediated_pmu=1, but KVM silently forces the parameter
        # to N on hardware that does not qualify (vpmu.md §1.3), and disables the vPMU entirely on
        # hybrid CPUs (enable_pmu=N, no PMU in the supported CPUID).
        kvm = facts["kvm"]
        kvm["enable_mediated_pmu"] = False
        if cpu.get("hybrid"):
            kvm["enable_pmu"] = False
            kvm["supported_pmu"] = _no_pmu(kvm["supported_pmu"], cpu.get("vendor"))
    facts["mediated_pmu"] = F.mediated_verdict(facts)
    return facts


def _no_pmu(pmu: dict[str, Any], vendor: str | None) -> dict[str, Any]:
    out = dict(pmu)
    out.update(version=0, gp_counters=0, gp_width=0, fixed_counters=0, fixed_width=0, arch_events=[],
               fixed_counters_mask=0)
    if vendor == "intel":
        out["arch_events_mask"] = 0
    else:
        out["amd_core_counters"] = 0
    return out


def _explicit_errata(host_name: str, ids: Any, matched: list[dict[str, Any]],
                     rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Explicit ``model.errata`` ids: the row matching this CPU when there is one (an id may have
    several rows, e.g. SRF7), else the id's first row in inventory/errata.yaml."""
    if not isinstance(ids, list):
        raise ValueError(f"host {host_name}: model.errata must be a list of erratum ids")
    by_id: dict[str, dict[str, Any]] = {e["id"]: e for e in matched}
    for r in rows:
        by_id.setdefault(r["id"], r)
    out = []
    for eid in ids:
        if eid not in by_id:
            raise ValueError(f"host {host_name}: model.errata has unknown erratum {eid!r} "
                             "(not in inventory/errata.yaml)")
        r = by_id[eid]
        out.append({"id": r["id"], "symptoms": list(r.get("symptoms") or []), "events": list(r.get("events") or []),
                    "description": r.get("description"), "source": r.get("source")})
    return out


# ------------------------------------------------------------------------------------------------
# the driver


class ModelDriver:
    name = "model"
    simulated = True

    def __init__(self, host: dict[str, Any], facts: dict[str, Any]):
        self.host = host
        self.facts = facts
        self.host_name = host.get("name") or "?"
        model = host.get("model") or {}
        faults = model.get("faults") if model.get("faults") is not None else facts.get("faults")
        self.faults = frozenset(check_faults(self.host_name, faults))
        cpu = facts.get("cpu") or {}
        self.vendor = cpu.get("vendor") or "unknown"
        self.layout = LAYOUTS.get(self.vendor)
        self.events = EVENTS.get(self.vendor, {})
        kvm = facts.get("kvm") or {}
        self.host_pmu = facts.get("pmu") or {}
        self.sup = kvm.get("supported_pmu") or self.host_pmu
        self.row = _kvm_row(row_id=kvm.get("behaviour"), sup=self.sup) if kvm.get("behaviour") \
            else _kvm_row((facts.get("kernel") or {}).get("release"), sup=self.sup)
        arch = self.sup.get("arch_events")
        self.arch_events = [e for e in (arch if arch is not None else self.events) if e in self.events]
        self.symptoms: set[str] = set()
        for e in facts.get("errata") or []:
            self.symptoms.update(e.get("symptoms") or [])
        self._shape("", {})

    # -- the guest's PMU and KVM's path (module docstring) -----------------------------------------
    def _shape(self, probe: str, shape: dict[str, int]) -> None:
        """The PMU the harness gives this probe's guest (protocol GUEST_PMU_PARAMS; -1 = default)."""
        sup, intel = self.sup, self.vendor == "intel"

        def pick(key: str, default: int) -> int:
            v = shape.get(key, -1)
            return default if v is None or v < 0 else int(v)

        if intel:
            version = pick("pmu_version", max(int(sup.get("version") or 0), PROBE_MIN_VERSION.get(probe, 0)))
        else:
            version = pick("pmu_version", 2 if sup.get("perfmon_v2") else (1 if sup.get("gp_counters") else 0))
        self.version = version
        self.gp = pick("gp_counters", int(sup.get("gp_counters") or 0)) if version else 0
        self.gp_width = pick("gp_width", int(sup.get("gp_width") or 48))
        self.shape_bitmap = 0
        if intel and version >= 2:
            nfixed = pick("fixed_counters", int(sup.get("fixed_counters") or 0))
            bitmap = pick("fixed_bitmap", 0) if version >= 5 else 0
            self.shape_bitmap = bitmap
            fmask = _mask(nfixed) | bitmap
            self.fixed = [i for i in range(len(FIXED_EVENTS)) if fmask >> i & 1]
        else:
            self.fixed = []
        self.fixed_bitmap = sum(1 << j for j in self.fixed)
        self.fixed_width = int(sup.get("fixed_width") or self.gp_width) if self.fixed else 0
        fw_default = 0x2000 if sup.get("full_width_writes", intel) else 0
        # vmx/pmu_intel.h vcpu_get_perf_capabilities(): 0 without PDCM in the guest CPUID
        self.pdcm = intel and bool(pick("pdcm", 1 if sup.get("pdcm", True) is not False else 0))
        self.perf_caps = (pick("perf_capabilities", fw_default) if self.pdcm else 0) if intel else None
        self.full_width_writes = bool(self.perf_caps and self.perf_caps & 0x2000) if intel else True
        self.global_ctrl = version >= 2
        self.path = self.kvm_path()

    def kvm_path(self) -> dict[str, Any]:
        """Which MSRs KVM intercepts for this guest: inventory/kvm.yaml global_ctrl_passthrough /
        rdpmc_passthrough (pmu.c kvm_need_any_pmc_intercept / kvm_need_perf_global_ctrl_intercept /
        kvm_need_rdpmc_intercept). KVM compares with the HOST's counts, not its own clamped ones."""
        host = self.host_pmu
        host_fixed = int(host.get("fixed_counters") or 0) if self.vendor == "intel" else 0
        host_fwidth = int(host.get("fixed_width") or 0) if host_fixed else 0
        inputs = {"guest_gp": self.gp, "host_gp": int(host.get("gp_counters") or 0),
                  "guest_fixed": len(self.fixed), "host_fixed": host_fixed,
                  "guest_gp_width": self.gp_width, "host_gp_width": int(host.get("gp_width") or 0),
                  "guest_fixed_width": self.fixed_width, "host_fixed_width": host_fwidth,
                  "guest_global_ctrl": self.global_ctrl, "vmware_backdoor": False}
        any_pmc = inputs["guest_gp"] != inputs["host_gp"] or inputs["guest_fixed"] != inputs["host_fixed"]
        widths = inputs["guest_gp_width"] != inputs["host_gp_width"] or \
            inputs["guest_fixed_width"] != inputs["host_fixed_width"]
        return {"global_ctrl": "intercepted" if any_pmc or not self.global_ctrl else "passthrough",
                "rdpmc": "intercepted" if any_pmc or widths else "passthrough",
                "how": "derived", "inputs": inputs}

    def guest_pmu(self) -> dict[str, Any]:
        return {"version": self.version, "gp_counters": self.gp, "gp_width": self.gp_width,
                "fixed_counters": max(self.fixed) + 1 if self.fixed else 0, "fixed_bitmap": self.fixed_bitmap,
                "fixed_width": self.fixed_width, "perf_capabilities": self.perf_caps,
                "perfctr_core": self.vendor == "amd" and self.version >= 1,
                "perfmon_v2": self.vendor == "amd" and self.version >= 2}

    # -- protocol --------------------------------------------------------------------------------
    def list(self) -> list[str]:
        return list(PROBES)

    def run(self, probe: str, **params: Any) -> ProbeResult:
        spec = PROBES.get(probe)
        if spec is None:
            return ProbeResult(probe, "error", f"unknown probe {probe!r} (known: {', '.join(PROBES)})")
        try:
            p = parse_params(spec, params)
        except ValueError as exc:
            return ProbeResult(probe, "error", str(exc))
        if spec.needs_pmu:
            why = self._unsupported_reason()
            if why:
                return ProbeResult(probe, "unsupported", why)
        rng = self._rng(probe, p)
        shape = {k: p.pop(k) for k in SHAPE_KEYS if k in p}
        self._shape(probe, shape)
        handler: Callable[..., Any] = getattr(self, f"_p_{probe}")
        try:
            if spec.needs_pmu and self.gp < 1 and probe not in NO_COUNTER_PROBES:
                raise _Unsupported(f"the guest PMU enumerates {self.gp} GP counters (needs 1)")
            obs = handler(rng, **p)
        except _Unsupported as exc:
            return ProbeResult(probe, "unsupported", str(exc))
        except _BadParam as exc:
            return ProbeResult(probe, "error", str(exc))
        finally:
            p.update(shape)
        if spec.needs_pmu and "pmu_version" in spec.params:
            obs = {**obs, "guest_pmu": self.guest_pmu(), "kvm_path": self.path}
        elapsed = self._elapsed(rng, p)
        return ProbeResult(probe, "ok", "", obs, elapsed)

    # -- helpers ---------------------------------------------------------------------------------
    def _unsupported_reason(self) -> str:
        med = self.facts.get("mediated_pmu") or {}
        if med.get("status") != "available":
            reasons = [str(r) for r in med.get("reasons") or []]
            return "; ".join(reasons) or "mediated_pmu unavailable"
        if self.layout is None:
            return f"cpu.vendor={self.vendor}: the model knows intel and amd only"
        if int(self.sup.get("gp_counters") or 0) < 1:
            return "kvm.supported_pmu.gp_counters=0"
        return ""

    def _rng(self, probe: str, params: dict[str, Any]) -> random.Random:
        key = json.dumps([self.host_name, probe, params], sort_keys=True, default=str)
        return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))

    @staticmethod
    def _elapsed(rng: random.Random, p: dict[str, Any]) -> int:
        work = int(p.get("iterations") or 0) + int(p.get("rounds") or 0)
        return 2_000_000 + work * 1_500 + rng.randrange(100_000)

    def _iterations(self, n: int) -> int:
        if n < 1:
            raise _BadParam(f"iterations={n}: must be >= 1")
        return n

    def _sel(self, event: str, *, enable: bool = True, pmi: bool = False) -> int:
        evsel, umask = self.events[event]
        v = (evsel & 0xFF) | (umask << 8) | ((evsel >> 8) << 32) | EVTSEL_USR | EVTSEL_OS
        return v | (EVTSEL_EN if enable else 0) | (EVTSEL_INT if pmi else 0)

    def _filter_key(self, event: str) -> int:
        evsel, umask = self.events[event]
        return evsel | (umask << 8)

    def _loop(self, rng: random.Random, iterations: int, loop: str = "exit_each",
              usr: bool = False) -> tuple[dict[str, Any], dict[str, int]]:
        """(workload, guest-mode counts of every event over the window), errata and
        counters_not_stopped_at_exit applied. ``usr``: a USR-only selector (the loop runs at CPL0)."""
        gc_exits = 1 if self.path["global_ctrl"] == "intercepted" else 0
        w = workload(iterations, loop, gc_exits)
        n, exits = iterations, w["vm_exits"]
        insns, branches = w["instructions"], w["branches"]
        for symptom, event in PER_EXIT_SYMPTOMS.items():
            if symptom in self.symptoms:
                if event == "instructions":
                    insns += exits
                else:
                    branches += exits
        # exits KVM handles in the kernel (host interrupts) that userspace never sees
        unseen = rng.randint(0, 2 + n // 500)
        # KVM's own count over the batch (KVM_GET_STATS_FD "exits"): the window's, the unseen ones and
        # the batch's closing PORT_DONE exit (protocol WORKLOAD kvm_exits)
        self.last_kvm_exits = exits + unseen + 1
        if VMRUN_SYMPTOM in self.symptoms:
            # every VM-entry in the window retires VMRUN: +1 instruction and +1 branch each
            insns += exits + unseen
            branches += exits + unseen
        cycles = int(insns * rng.uniform(2.2, 3.0)) + exits * rng.randint(40, 60)
        if "counters_not_stopped_at_exit" in self.faults:
            # host-side exit handling (KVM + the port-I/O round trip) keeps counting in guest PMCs
            insns += exits * rng.randint(2_500, 4_000)
            branches += exits * rng.randint(250, 600)
            cycles += exits * rng.randint(4_000, 6_000)
        width = 6 if self.vendor == "intel" else 4
        slots = cycles * width
        retiring = insns + rng.randint(n // 20 + 1, n // 10 + 2)
        rest = max(slots - retiring, 3)
        be = int(rest * rng.uniform(0.5, 0.6))
        fe = int(rest * rng.uniform(0.25, 0.3))
        counts = {
            "cycles": cycles,
            "instructions": insns,
            "ref_cycles": int(cycles * rng.uniform(0.8, 1.1)),
            "llc_references": n // 50 + rng.randint(3, 40),
            "llc_misses": n // 500 + rng.randint(1, 3),
            "branches": branches,
            "branch_misses": n // 1000 + rng.randint(1, 6),
            "topdown_slots": slots,
            "topdown_be_bound": be,
            "topdown_bad_spec": max(rest - be - fe, 1),
            "topdown_fe_bound": fe,
            "topdown_retiring": retiring,
            "lbr_inserts": branches,
        }
        if loop != "clflush":
            # no memory traffic in the plain loops: LLC events may legitimately stay 0
            counts["llc_references"] = rng.randint(0, 3)
            counts["llc_misses"] = rng.randint(0, min(1, counts["llc_references"]))
        else:
            counts["llc_references"] = n + rng.randint(0, n // 2)
            counts["llc_misses"] = max(1, int(n * rng.uniform(0.5, 1.0)))
        if usr:
            counts = dict.fromkeys(counts, 0)
        return w, counts

    @staticmethod
    def _jitter(rng: random.Random, event: str, value: int) -> int:
        """Per-counter run-to-run noise for events that are not exact by construction."""
        if event in ("instructions", "branches", "lbr_inserts"):
            return value
        return max(1, int(value * rng.uniform(0.99, 1.01)))

    def _fixed_after_exit_loss(self, value: int, exits: int) -> int:
        """global_ctrl_not_restored: fixed-counter enables in GLOBAL_CTRL are lost at the first
        VM-exit, so fixed counters only count the first iteration's share."""
        if "global_ctrl_not_restored" in self.faults and exits > 0:
            return value // (exits + 1)
        return value

    # -- isolation -------------------------------------------------------------------------------
    def _p_selftest(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        n = self._iterations(iterations)
        s = n * (n - 1) // 2
        return {"iterations": n, "vm_exits": n, "guest_sum": s, "expected_sum": s, "user_round_trip": True,
                "exceptions": []}

    def _p_guest_count(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        w, c = self._loop(rng, self._iterations(iterations))
        w["kvm_exits"] = self.last_kvm_exits
        return {"workload": w, "counts": {"instructions": c["instructions"], "branches": c["branches"]},
                "exceptions": []}

    def _p_host_excludes_guest(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        n = self._iterations(iterations)
        exits = min(1000, max(1, n // 10))
        per_exit = rng.randint(3_800, 4_200)      # KVM exit handling + VMM port-I/O round trip
        if "host_events_stay_out" in self.faults:
            per_exit = 0                          # exclude_guest events never scheduled back in at exit
        setup = rng.randint(110_000, 130_000)
        runs = []
        for size, nexits in ((max(1, n // 10), exits), (n, exits), (max(1, n // 10), 10 * exits)):
            guest = workload(size, "plain")["instructions"]
            host = setup + nexits * per_exit + rng.randint(-200, 200)
            if "exclude_guest_not_enforced" in self.faults:
                host += guest
            runs.append({"guest_instructions": guest, "host_count": host, "vm_exits": nexits})
        return {"perf_open_errno": 0, "exclude_kernel": False, "runs": runs}

    def _p_exclusivity(self, rng: random.Random) -> dict[str, Any]:
        if "exclusivity_missing" in self.faults:
            return {"event_without_exclude_guest_errno": 0, "event_with_exclude_guest_errno": 0,
                    "vcpu_create_errno_while_event": 0}
        return {"event_without_exclude_guest_errno": EOPNOTSUPP, "event_with_exclude_guest_errno": 0,
                "vcpu_create_errno_while_event": EBUSY}

    def _p_fresh_state(self, rng: random.Random) -> dict[str, Any]:
        intel = self.vendor == "intel"
        if "stale_counters_new_vm" in self.faults:
            # the previous VM's PMU state survives into the new VM
            gp = [rng.randint(1_000, 5_000_000) for _ in range(self.gp)]
            sels = [self._sel("instructions") for _ in range(self.gp)]
            fixed = [rng.randint(1_000, 5_000_000) for _ in self.fixed]
            fixed_ctrl = sum(0xB << (4 * j) for j in self.fixed) if intel else None
            status = 1
        else:
            gp, sels, fixed = [0] * self.gp, [0] * self.gp, [0] * len(self.fixed)
            fixed_ctrl = 0 if intel else None
            status = 0
        return {"gp_counters": gp, "gp_selectors": sels, "fixed_counters": fixed, "fixed_ctrl": fixed_ctrl,
                "global_status": status, "exceptions": []}

    def _p_cross_context(self, rng: random.Random, rounds: int, kind: str) -> dict[str, Any]:
        if kind not in ("vm", "vcpu"):
            raise _BadParam(f"kind={kind!r}: must be vm or vcpu")
        if rounds < 1:
            raise _BadParam(f"rounds={rounds}: must be >= 1")
        mask = _mask(self.gp_width)
        # the harness's seeds (lib/probes_isolation.c probe_cross_context): distinct per context
        seeds = [((0x1111 * (i + 1)) << 32 | 0x5EED0000 | i) & mask for i in range(2)]
        leak = "cross_context_leak" in self.faults
        contexts = [{"id": i, "seed": s, "values_read": sorted(set(seeds)) if leak else [s]}
                    for i, s in enumerate(seeds)]
        return {"kind": kind, "rounds": rounds, "cpu": 1, "contexts": contexts}

    def _unexposed_access(self, op: str, target: int, name: str, rng: random.Random,
                          quirk: bool = False) -> dict[str, Any]:
        if quirk:
            return {"op": op, "target": target, "name": name, "vector": None,
                    "value": 0 if op == "rdmsr" else None, "quirk": "p6_perfctr"}
        if "unexposed_counters_accessible" in self.faults:
            # the access reaches the hardware: reads return whatever the host left in the counter
            value = rng.randint(1, _mask(32)) if op in ("rdmsr", "rdpmc") else None
            return {"op": op, "target": target, "name": name, "vector": None, "value": value, "quirk": None}
        return {"op": op, "target": target, "name": name, "vector": GP_VECTOR, "value": None, "quirk": None}

    def _p_unexposed(self, rng: random.Random) -> dict[str, Any]:
        lay = self.layout
        assert lay is not None
        acc: list[dict[str, Any]] = []
        n = self.gp
        base, stride, pfx = lay.counter
        if self.vendor == "intel" and lay.legacy_counter:
            lbase, _, lpfx = lay.legacy_counter
            for i in range(n, 2):         # MSR_P6_PERFCTR0/1 quirk applies to indexes 0 and 1 only
                for op in ("rdmsr", "wrmsr"):
                    acc.append(self._unexposed_access(op, MSR_P6_PERFCTR[i], f"MSR_P6_PERFCTR{i}", rng,
                                                      quirk=True))
            if n >= 2:
                for op in ("rdmsr", "wrmsr"):
                    acc.append(self._unexposed_access(op, lbase + n, f"{lpfx}{n}", rng))
        if self.vendor != "intel" or self.full_width_writes:
            for op in ("rdmsr", "wrmsr"):
                acc.append(self._unexposed_access(op, base + stride * n, f"{pfx}{n}", rng))
        sbase, sstride, spfx = lay.selector
        for op in ("rdmsr", "wrmsr"):
            acc.append(self._unexposed_access(op, sbase + sstride * n, f"{spfx}{n}", rng))
        # RDPMC(64) as kvm-unit-tests check_invalid_rdpmc_gp: on Zen, index = #counters would be a
        # data-fabric counter (arch/x86/events/amd/uncore.c RDPMC_BASE_NB; finding 6)
        acc.append(self._unexposed_access("rdpmc", 64, "RDPMC 64", rng))
        if lay.fixed_counter:
            fbase, fstride, fpfx = lay.fixed_counter
            m = max(self.fixed) + 1 if self.fixed else 0
            for op in ("rdmsr", "wrmsr"):
                acc.append(self._unexposed_access(op, fbase + fstride * m, f"{fpfx}{m}", rng))
            acc.append(self._unexposed_access("rdpmc", lay.fixed_rdpmc_flag | m, f"RDPMC fixed {m}", rng))
        return {"gp_counters": n, "fixed_counters": len(self.fixed), "accesses": acc,
                "fast_rdpmc": {"vector": GP_VECTOR}}

    def _p_pmu_disabled(self, rng: random.Random) -> dict[str, Any]:
        vector = None if "unexposed_counters_accessible" in self.faults else GP_VECTOR
        return {"cap_disable_errno": 0, "guest_pmu_version": 0, "guest_gp_counters": 0,
                "counter_access_vector": vector, "cap_after_vcpu_errno": EINVAL}

    # -- counters --------------------------------------------------------------------------------
    def _p_arch_events(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        n = self._iterations(iterations)
        w, c = self._loop(rng, n, "plain")
        kx = self.last_kvm_exits
        wc, cc = self._loop(rng, n, "clflush")
        kxc = self.last_kvm_exits
        gp = []
        for ev in self.arch_events:
            loop, counts, k = ("clflush", cc, kxc) if ev in CLFLUSH_EVENTS else ("plain", c, kx)
            gp += [{"counter": i, "event": ev, "loop": loop, "count": self._jitter(rng, ev, counts[ev]),
                    "kvm_exits": k} for i in range(self.gp)]
        fixed = [{"counter": j, "event": FIXED_EVENTS[j], "loop": "plain",
                  "count": self._fixed_after_exit_loss(self._jitter(rng, FIXED_EVENTS[j], c[FIXED_EVENTS[j]]),
                                                       w["vm_exits"]), "kvm_exits": kx}
                 for j in self.fixed]
        unavailable = None
        if self.vendor == "intel":
            # one VM per CPUID.0AH (EBX length, unavailable mask): every host event still counts on GP 0
            # (pmu_counters_test.c test_arch_events: KVM does not refuse "unavailable" events)
            host_events = [e for e in (self.host_pmu.get("arch_events") or []) if e in self.events]
            unavailable = [{"ebx_length": length, "ebx_mask": mask,
                            "host_events_mask": int(self.host_pmu.get("arch_events_mask") or 0),
                            "gp": [{"counter": 0, "event": ev, "loop": "plain", "kvm_exits": kx,
                                    "count": 0 if self._enum_refused(ev, length, mask) else
                                    self._jitter(rng, ev, c[ev])} for ev in host_events]}
                           for length, mask in arch_enum_combos()]
        return {"workload": w, "workload_clflush": wc, "gp": gp, "fixed": fixed,
                "unavailable_enumerated": unavailable}

    def _enum_refused(self, event: str, length: int, mask: int) -> bool:
        """Under a fault only: KVM refusing an event its CPUID.0AH enumeration calls unavailable
        (index at or beyond the EBX length, or its EBX bit set; faults.yaml)."""
        from agent.facts.vendors import VENDORS

        idx = [e.name for e in VENDORS["intel"].arch_events].index(event)
        beyond, masked = idx >= length, bool(mask >> idx & 1)
        return ("unavailable_events_refused" in self.faults and (beyond or masked)) or \
            ("unavailable_mask_refused" in self.faults and masked and not beyond)

    def _p_disabled_counter(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        self._iterations(iterations)
        return {"gp": [{"counter": i, "before": 0, "after": 0} for i in range(self.gp)],
                "fixed": [{"counter": j, "before": 0, "after": 0} for j in self.fixed]}

    def _width_read(self, written: int, width: int) -> int:
        if "wrong_counter_width" in self.faults:
            return written & 0xFFFFFFFF        # KVM masks mediated counters to 32 bits
        return written & _mask(width)

    def _p_counter_width(self, rng: random.Random) -> dict[str, Any]:
        w = self.gp_width
        wrong = "wrong_counter_width" in self.faults
        legacy = None
        if self.vendor == "intel":
            written = 0x89ABCDEF                # bit 31 set: sign-extends to the counter width
            legacy = {"written": written, "read": self._width_read(_sext32(written, w), w), "vector": None}
        full = []
        # IA32_PMCx exist only with PERF_CAPABILITIES.FW_WRITES (pmu_intel.c get_fw_gp_pmc(); selftest
        # PERF_CAPABILITIES {0, FW_WRITES} matrix)
        no_pmcx = self.vendor == "intel" and not self.full_width_writes and "pmcx_without_fw_writes" not in self.faults
        for written in (0x80000000, 0x123456789ABC & _mask(w), _mask(w)):
            if no_pmcx:
                full.append({"written": written, "read": None, "vector": GP_VECTOR})
            else:
                full.append({"written": written, "read": self._width_read(written, w), "vector": None})
        beyond_val = (1 << w) | 0x1234
        if (self.vendor == "intel" and not wrong) or no_pmcx:
            beyond = {"written": beyond_val, "vector": GP_VECTOR, "read": None}
        else:   # AMD: bits above the width are dropped, no #GP; or the 32-bit-mask bug
            beyond = {"written": beyond_val, "vector": None, "read": self._width_read(beyond_val, w)}
        return {"gp_width": w, "legacy_write": legacy, "full_width": full, "beyond_width": beyond}

    def _global_ctrl_reset(self) -> int:
        return _mask(self.gp)

    def _p_global_ctrl(self, rng: random.Random) -> dict[str, Any]:
        reset = self._global_ctrl_reset()
        fixed_bits = sum(1 << (32 + j) for j in self.fixed)
        written = (0x5555 & reset) | (fixed_bits & (0x5 << 32))
        after = written
        if GLOBAL_CTRL_SYMPTOM in self.symptoms:
            after &= ~(0x7 << 32)
        if "global_ctrl_not_restored" in self.faults:
            after = reset                        # KVM reloads its RESET value instead of the guest's
        return {"gp_counters": self.gp, "fixed_counters": len(self.fixed), "reset_value": reset,
                "written": written, "after_exit": after}

    def _p_overflow_status(self, rng: random.Random) -> dict[str, Any]:
        set_mask = 0x3 if self.gp >= 2 else 0x1
        # intel_is_valid_msr(): GLOBAL_STATUS_SET exists from the guest CPUID's version 4 (not
        # clamped: intel_pmu_refresh()); below it the write #GPs and sets nothing. AMD: PerfMonV2.
        has_set = self.vendor != "intel" or self.version >= int(self.row["status_set_min_version"])
        return {"counter": 0, "after_overflow": 0x1, "after_clear": 0, "after_set": set_mask if has_set else 0,
                "set_mask": set_mask}

    def _p_rdpmc(self, rng: random.Random) -> dict[str, Any]:
        out = []
        for i in range(self.gp):
            written = ((0xA5 + i) << 32 | 0xDEAD0000 | i) & _mask(self.gp_width)
            v = self._width_read(written, self.gp_width)
            out.append({"kind": "gp", "index": i, "written": written, "rdmsr": v, "rdpmc": v})
        for j in self.fixed:
            written = ((0x5A + j) << 32 | 0xBEEF0000 | j) & _mask(self.fixed_width)
            v = self._width_read(written, self.fixed_width)
            out.append({"kind": "fixed", "index": j, "written": written, "rdmsr": v, "rdpmc": v})
        return {"counters": out}

    # -- filter ----------------------------------------------------------------------------------
    def _filter_for(self, case: str) -> dict[str, Any] | None:
        """The KVM_SET_PMU_EVENT_FILTER argument each case sets (None = no filter)."""
        insn, br = self._filter_key("instructions"), self._filter_key("branches")
        others = [self._filter_key(e) for e in ("cycles", "branch_misses")]
        if case == "none":
            return None
        if case in ("allow_member", "deny_member"):
            return {"action": case.split("_")[0], "flags": 0, "events": [insn, br], "fixed_counter_bitmap": 0}
        if case in ("allow_nonmember", "deny_nonmember"):
            return {"action": case.split("_")[0], "flags": 0, "events": others, "fixed_counter_bitmap": 0}
        if case in ("masked_include", "masked_exclude"):
            # KVM_PMU_ENCODE_MASKED_ENTRY(event, mask, match, exclude)
            def masked(event: int, mask: int, match: int, exclude: bool) -> int:
                return ((event & 0xF00) << 24) | (event & 0xFF) | (mask << 56) | (match << 8) | (exclude << 55)
            ev_i, um_i = self.events["instructions"]
            ev_b, um_b = self.events["branches"]
            if case == "masked_include":    # include exactly these event/umask pairs
                entries = [masked(ev_i, 0xFF, um_i, False), masked(ev_b, 0xFF, um_b, False)]
            else:                           # include any umask of the event, then exclude ours
                entries = [masked(ev_i, 0x00, 0x00, False), masked(ev_b, 0x00, 0x00, False),
                           masked(ev_i, 0xFF, um_i, True), masked(ev_b, 0xFF, um_b, True)]
            return {"action": "allow", "flags": KVM_PMU_EVENT_FLAG_MASKED_EVENTS, "events": entries,
                    "fixed_counter_bitmap": 0}
        if case == "fixed_allow":
            return {"action": "allow", "flags": 0, "events": [], "fixed_counter_bitmap": 0x1}
        if case == "fixed_deny":
            return {"action": "deny", "flags": 0, "events": [], "fixed_counter_bitmap": 0x1}
        if case == "fixed_priority":
            # events[] denies FC0's event; the (empty) bitmap wins for the fixed counter
            return {"action": "deny", "flags": 0, "events": [insn], "fixed_counter_bitmap": 0}
        if case == "deny_high_select":
            # AMD event select bits 35:32 live in entry bits 35:32: 0x1C2 is not 0xC2 (test_amd_deny_list)
            ev_b, um_b = self.events["branches"]
            return {"action": "deny", "flags": 0, "events": [(ev_b & 0xFF) | (um_b << 8) | (0x1 << 32)],
                    "fixed_counter_bitmap": 0}
        raise _BadParam(f"case={case!r}: must be one of {', '.join(EVENT_FILTER_CASES)}")

    def _gp_allowed(self, flt: dict[str, Any] | None, event: str) -> bool:
        if flt is None or "filter_ignored" in self.faults:
            return True
        key = self._filter_key(event)
        if flt["flags"] & KVM_PMU_EVENT_FLAG_MASKED_EVENTS:
            ev, um = self.events[event]
            inc = exc = False
            for e in flt["events"]:
                e_ev = (e & 0xFF) | ((e >> 24) & 0xF00)
                mask, match, exclude = (e >> 56) & 0xFF, (e >> 8) & 0xFF, bool(e >> 55 & 1)
                if e_ev == ev and (um & mask) == match:
                    exc |= exclude
                    inc |= not exclude
            member = inc and not exc
        elif "filter_select_truncated" in self.faults:
            member = key & 0xFFFF in [e & 0xFFFF for e in flt["events"]]   # select bits 35:32 dropped
        else:
            member = key in flt["events"]
        return member if flt["action"] == "allow" else not member

    def _fixed_allowed(self, flt: dict[str, Any] | None, idx: int) -> bool:
        if flt is None or "fixed_bitmap_ignored" in self.faults:
            return True
        bit = bool(flt["fixed_counter_bitmap"] >> idx & 1)
        return bit if flt["action"] == "allow" else not bit

    def _p_event_filter(self, rng: random.Random, case: str, iterations: int) -> dict[str, Any]:
        if case not in EVENT_FILTER_CASES:
            raise _BadParam(f"case={case!r}: must be one of {', '.join(EVENT_FILTER_CASES)}")
        if case.startswith("fixed_") and not self.fixed:
            raise _Unsupported(f"no fixed counters on {self.vendor}")
        if case == "deny_high_select" and self.vendor != "amd":
            raise _Unsupported("event select bits 35:32 are AMD's")
        w, c = self._loop(rng, self._iterations(iterations))
        w["kvm_exits"] = self.last_kvm_exits
        flt = self._filter_for(case)
        counts = {ev: c[ev] if self._gp_allowed(flt, ev) else 0 for ev in ("instructions", "branches")}
        fixed_insn = None
        if self.fixed:
            fixed_insn = self._fixed_after_exit_loss(c["instructions"], w["vm_exits"]) \
                if self._fixed_allowed(flt, 0) else 0
        counts["fixed_instructions"] = fixed_insn
        return {"case": case, "set_errno": 0, "filter": flt, "workload": w, "counts": counts}

    def _p_filter_update(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        n = self._iterations(iterations)
        sel = self._sel("branches")
        before = self._loop(rng, n)[1]["branches"]
        during = self._loop(rng, n)[1]["branches"]
        after = self._loop(rng, n)[1]["branches"]
        applied = not ({"filter_ignored", "filter_update_not_applied"} & self.faults)
        return {"selector_written": sel, "selector_read_after_deny": sel, "count_before_deny": before,
                "count_after_deny": 0 if applied else during, "count_after_allow": after}

    def _p_filter_invalid(self, rng: random.Random) -> dict[str, Any]:
        strict = EINVAL if "filter_rejects_valid" in self.faults else 0
        return {"cases": [{"case": "bad_action", "errno": EINVAL}, {"case": "bad_flags", "errno": EINVAL},
                          {"case": "too_many_events", "errno": E2BIG},
                          {"case": "masked_bad_entry", "errno": EINVAL},
                          # accepted (pmu_event_filter_test.c test_filter_ioctl)
                          {"case": "junk_bits_unmasked", "errno": strict},
                          {"case": "masked_valid", "errno": strict},
                          {"case": "fixed_bitmap_nonexistent", "errno": strict}]}

    # -- pmi -------------------------------------------------------------------------------------
    def _overflow_is_hardware(self, event: str) -> bool:
        """Does the wrapping increment come from hardware (a host VPMI) or from KVM's software
        increment for an emulated instruction (KVM_REQ_PMI only; kvm.yaml emulated_insns_counted)?
        The loop's OUT is emulated and counts as an instruction, never as a branch; with GLOBAL_CTRL
        passed through nothing else before it is counted in software (finding 7)."""
        if event == "branches" or not self.row["emulated_insns_counted"]:
            return True
        # instructions preset 64 from overflow over {OUT, DEC, JNZ}: the 64th is the OUT (emulated)
        # unless KVM counted the enabling WRMSR in software (GLOBAL_CTRL intercepted), then the JNZ
        return self.path["global_ctrl"] == "intercepted"

    def _p_pmi(self, rng: random.Random, lvtpc: str) -> dict[str, Any]:
        if lvtpc not in ("unmasked", "masked"):
            raise _BadParam(f"lvtpc={lvtpc!r}: must be unmasked or masked")
        cpu = rng.randrange(2)
        masked = lvtpc == "masked"
        vpmi_before = rng.randint(0, 5_000)
        if "pmi_as_host_nmi" in self.faults:
            # the guest LVTPC is never loaded: the overflow raises a host NMI (host LVTPC is unmasked)
            interrupts, vpmi_delta, nmi_delta = 0, 0, 1
        else:
            # the guest's LVTPC mask bit is mirrored into the hardware LVTPC (perf_load_guest_lvtpc),
            # so a masked LVTPC raises no VPMI on the host either
            interrupts = 0 if masked else 1
            vpmi_delta = 0 if masked else 1
            nmi_delta = 0
            if "pmi_lost" in self.faults:
                interrupts = 0            # VPMI taken by the host, KVM_REQ_PMI never injected
        if not self._overflow_is_hardware("branches"):
            vpmi_delta = 0
        return {"lvtpc": lvtpc, "event": "branches", "vector": PMI_VECTOR, "interrupts": interrupts,
                "global_status": 0x1,
                "host_vpmi_before": vpmi_before, "host_vpmi_after": vpmi_before + vpmi_delta,
                "host_nmi_delta": nmi_delta, "cpu": cpu, "host_nmi_delta_cpu": nmi_delta}

    # -- probes of the upstream coverage rows (harness-audit.md §2) -----------------------------
    def _acc(self, op: str, target: int, name: str, ok: bool, value: int | None = None,
             written: int | None = None) -> dict[str, Any]:
        """One guest access: ``ok`` = no fault (value read back), else #GP."""
        return {"op": op, "target": target, "name": name, "written": written,
                "vector": None if ok else GP_VECTOR, "value": value if ok and op != "wrmsr" else None}

    def _p_hidden_counters(self, rng: random.Random) -> dict[str, Any]:
        lay = self.layout
        assert lay is not None
        possible = self.row["max_gp_counters"][self.vendor]
        intel = self.vendor == "intel"
        base_kind = "full_width" if (not intel or self.full_width_writes) else "legacy"
        base, stride, pfx = lay.counter if base_kind == "full_width" else lay.legacy_counter  # type: ignore[misc]
        sbase, sstride, spfx = lay.selector
        leak = "unexposed_counters_accessible" in self.faults or \
            (self.version == 0 and "guest_version_ignored" in self.faults)
        out = []
        for i in range(possible):
            exposed = i < self.gp
            quirk = "p6_perfctr" if intel and not exposed and base_kind == "legacy" and i < 2 else None
            ok = exposed or leak or quirk is not None
            host_val = rng.randint(1, _mask(32)) if leak and not exposed else None
            val = 0xFFFF if exposed else (0 if quirk else host_val)
            rd_ok = exposed or leak
            out.append({"index": i, "exposed": exposed, "quirk": quirk,
                        "wrmsr": self._acc("wrmsr", base + stride * i, f"{pfx}{i}", ok, written=0xFFFF),
                        "rdmsr": self._acc("rdmsr", base + stride * i, f"{pfx}{i}", ok, val),
                        "rdpmc": self._acc("rdpmc", i, "RDPMC", rd_ok, 0xFFFF if exposed else host_val),
                        "selector_wrmsr": self._acc("wrmsr", sbase + sstride * i, f"{spfx}{i}",
                                                    exposed or leak or (intel and i < 2), written=0),
                        "clear": self._acc("wrmsr", base + stride * i, f"{pfx}{i}", ok, written=0)})
        has_global = self.global_ctrl or (self.version == 1 and "v1_guest_gets_global_ctrl" in self.faults)
        reset = _mask(self.gp) if has_global else None
        return {"gp_counters": self.gp, "possible": possible, "base": base_kind, "global_ctrl_reset": reset,
                "counters": out, "exceptions": []}

    def _p_pmu_enum(self, rng: random.Random) -> dict[str, Any]:
        caps = self.perf_caps
        if caps is not None and "pebs_lbr_exposed" in self.faults:
            caps |= PEBS_LBR_CAP_BITS
        without_pdcm = None
        if caps is not None and not self.pdcm:
            # x86.c kvm_{get,set}_msr_common(): without PDCM the guest's RDMSR #GPs, the host reads 0
            # and may write only 0 (vmx_pmu_caps_test.c perf_capabilities_unsupported)
            leak = "perf_caps_without_pdcm" in self.faults
            caps = 0x2000 if leak else 0
            without_pdcm = {"host_read": caps, "host_set_zero_errno": 0, "host_set_bits_accepted": caps}
        readable = self.pdcm or "perf_caps_without_pdcm" in self.faults
        rd = self._acc("rdmsr", 0x345, "IA32_PERF_CAPABILITIES", readable, caps) if caps is not None else None
        return {"cpuid": {}, "decoded": self.guest_pmu(),
                "perf_capabilities": {"guest_rdmsr": rd, "host_before_run": caps,
                                      "host_set_after_run_errno": None if caps is None else EINVAL,
                                      "host_after_run": caps, "without_pdcm": without_pdcm},
                "exceptions": []}

    def _guard_written(self, case: str, op: str) -> int | None:
        if op != "wrmsr":
            return None
        if case == "anythread_evtsel":
            return self._sel("instructions", enable=False) | EVTSEL_ANY
        if case == "perf_capabilities_write":
            return self.perf_caps or 0      # the guest's own value: a write #GPs even of that
        return GUARD_WRITES.get(case, 0)

    def _p_guards(self, rng: random.Random) -> dict[str, Any]:
        from agent.facts.vendors import VENDORS

        cases = GUARD_CASES[self.vendor]
        dropped = VENDORS[self.vendor].guards_dropped
        acc = []
        for case, op, target in cases:
            ok = (case.startswith("anythread") and "anythread_allowed" in self.faults) or \
                (case in PEBS_LBR_CASES and "pebs_lbr_exposed" in self.faults) or \
                case in dropped  # KVM masks the reserved bits instead of a #GP (vendors.py)
            acc.append({**self._acc(op, target, case, ok, 0, written=self._guard_written(case, op)),
                        "case": case})
        return {"accesses": acc, "exceptions": []}

    def _p_fixed_counters(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        if self.vendor != "intel":
            raise _Unsupported("fixed counters are Intel-only")
        w, c = self._loop(rng, self._iterations(iterations), "plain")
        kvm_max = self.row["max_fixed_counters"]["intel"]
        nfixed = int(self.guest_pmu()["fixed_counters"])
        # fixed_ctr_ctrl_rsvd / global_ctrl_rsvd not derived from the guest's fixed counters
        rsvd_open = "fixed_rsvd_bits_open" in self.faults
        out = []
        for i in range(4):
            ok = i in self.fixed and i < kvm_max
            ev = FIXED_EVENTS[i]
            # the harness tries FIXED_CTR_CTRL / GLOBAL_CTRL alone only for unsupported counters
            out.append({"index": i, "supported": i in self.fixed,
                        "wrmsr": self._acc("wrmsr", 0x309 + i, f"IA32_FIXED_CTR{i}", ok, written=0xFFFF),
                        "rdmsr": self._acc("rdmsr", 0x309 + i, f"IA32_FIXED_CTR{i}", ok, 0xFFFF),
                        "rdpmc": self._acc("rdpmc", (1 << 30) | i, "RDPMC fixed", ok, 0xFFFF),
                        "ctrl_wrmsr": None if ok else self._acc("wrmsr", 0x38D, "IA32_FIXED_CTR_CTRL", rsvd_open,
                                                                written=0x1 << (4 * i)),
                        "global_ctrl_wrmsr": None if ok else self._acc("wrmsr", 0x38F, "IA32_PERF_GLOBAL_CTRL",
                                                                       rsvd_open, written=1 << (32 + i)),
                        "count": self._jitter(rng, ev, c[ev]) if ok else None})
        # fixed_bitmap: the CPUID.0AH:ECX the harness set (0 below version 5)
        ecx = self.shape_bitmap if self.version >= 5 else 0
        return {"fixed_counters": nfixed, "fixed_bitmap": ecx, "version": self.version,
                "counters": out, "workload": w, "exceptions": []}

    def _p_counter_freeze(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        w, c = self._loop(rng, self._iterations(iterations), "plain")
        leak = "counters_run_when_disabled" in self.faults
        out = []
        for kind, idx in [("gp", i) for i in range(self.gp)] + [("fixed", j) for j in self.fixed]:
            counted = c["instructions"] if kind == "gp" else self._jitter(rng, FIXED_EVENTS[idx], c[FIXED_EVENTS[idx]])
            out.append({"kind": kind, "index": idx, "counted": counted,
                        "after_global_off": counted, "after_local_off": counted + (w["instructions"] if leak else 0)})
        return {"workload": w, "counters": out, "exceptions": []}

    def _p_all_counters(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        w, c = self._loop(rng, self._iterations(iterations), "plain")
        gp = []
        for i in range(self.gp):
            ev = "instructions" if i % 2 == 0 else "branches"
            dead = i >= 4 and "upper_counters_not_loaded" in self.faults
            gp.append({"counter": i, "event": ev, "count": 0 if dead else c[ev]})
        fixed = [{"counter": j, "event": FIXED_EVENTS[j],
                  "count": self._jitter(rng, FIXED_EVENTS[j], c[FIXED_EVENTS[j]])} for j in self.fixed]
        return {"workload": w, "gp": gp, "fixed": fixed, "exceptions": []}

    def _p_cmask(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        w, c = self._loop(rng, self._iterations(iterations), "plain")
        plain = c["instructions"]
        cm = plain if "cmask_ignored" in self.faults else int(c["cycles"] * rng.uniform(0.05, 0.3))
        return {"workload": w, "cmask": 2, "count_plain": plain, "count_cmask": min(cm, plain),
                "exceptions": []}

    def _p_running_write(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        w, c = self._loop(rng, self._iterations(iterations), "plain")
        after_zero = c["instructions"] if "running_write_lost" in self.faults else rng.randint(2, 6)
        minus_one = _mask(self.gp_width)
        wrapped = c["instructions"] - 1
        status = 1 if self.global_ctrl else None
        return {"workload": w, "after_write_zero": after_zero,
                "from_minus_one": {"written": minus_one, "count": wrapped, "global_status": status},
                "exceptions": []}

    def _p_privilege(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        n = self._iterations(iterations)
        w, c = self._loop(rng, n, "plain")
        ignored = "privilege_filter_ignored" in self.faults
        usr = c["instructions"] if ignored else 0
        # the CPL3 loop: N and 2N x {DEC, JNZ}, plus a fixed entry/exit cost (IRETQ in, #UD out)
        fixed_user, fixed_kernel = 3, rng.randint(40, 60)
        user = {"usr": [fixed_user + 2 * k for k in (n, 2 * n)],
                "os": [fixed_kernel + (2 * k if ignored else 0) for k in (n, 2 * n)]}
        user["both"] = [u + o for u, o in zip(user["usr"], user["os"], strict=True)]
        return {"workload": w, "cpl": 0, "counts": {"usr": usr, "os": c["instructions"], "both": c["instructions"]},
                "user_loop": {"iterations": [n, 2 * n], "insns_per_iter": 2, "counts": user},
                "host_guest_only": self._host_guest_only(rng, n), "exceptions": []}

    def _host_guest_only(self, rng: random.Random, n: int) -> dict[str, Any] | None:
        """AMD EVTSEL Host-Only (bit 41) / Guest-Only (bit 40) on GP 0-3 seen from an L1 guest: with
        EFER.SVME=0 only a counter with neither bit counts; with SVME=1 the guest is "host" to any L2,
        so all but Guest-Only count (svm/pmu.c pmc_is_disabled_in_current_mode(), kvm-x86 2ed72677a5c1;
        svm_pmu_host_guest_test.c without its L2 steps)."""
        if self.vendor != "amd" or self.gp < 4:
            return None
        ignored = "host_guest_bits_ignored" in self.faults
        pmcs = ["none", "guest_only", "host_only", "both"]
        svme0 = (True, False, False, False)
        svme1 = (True, False, True, True)
        steps = [("svme0", 0, None, svme0), ("svme1", 1, None, svme1), ("deny", 1, "deny", (False,) * 4),
                 ("allow", 1, "allow", svme1), ("both_minus_host_only", 1, None, (True, False, True, False)),
                 ("both_restored", 1, None, svme1), ("svme0_again", 0, None, svme0)]
        out = []
        for step, svme, flt, counts in steps:
            if ignored and flt != "deny":
                counts = (True,) * 4
            out.append({"step": step, "efer_svme": svme, "efer_vector": None, "filter": flt,
                        "counts": [1000 + rng.randint(0, 3) if on else 0 for on in counts]})
        return {"guest_svm": True, "pmcs": pmcs, "steps": out}

    def _p_umask_pair(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        # The harness's rule (lib/probes_filter.c probe_umask_pair): up to 4 pairs straight from the vendor's
        # event table, in table order, sharing an event select and differing in unit mask.
        names = list(self.events)
        found = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                 if self.events[a][0] == self.events[b][0] and self.events[a][1] != self.events[b][1]][:4]
        if not found:
            raise _Unsupported(f"the {self.vendor} event table has no two events sharing an event select")
        w, c = self._loop(rng, self._iterations(iterations), "plain")
        pairs = []
        for first, second in found:
            sel, um1 = self.events[first]
            _, um2 = self.events[second]
            deny_both = "filter_umask_ignored" in self.faults
            a, b = self._jitter(rng, first, c[first]), self._jitter(rng, second, c[second])
            pairs.append({"select": sel, "set_errno": 0,
                          "first": {"event": first, "umask": um1, "count": a,
                                    "count_second_denied": 0 if deny_both else a},
                          "second": {"event": second, "umask": um2, "count": b, "count_second_denied": 0}})
        return {"workload": w, "pairs": pairs, "exceptions": []}

    def _p_legacy_k7(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        if self.vendor != "amd":
            raise _Unsupported("the K7 legacy MSRs are AMD-only")
        w, c = self._loop(rng, self._iterations(iterations), "plain")
        out = []
        for i in range(min(4, self.gp)):
            v = 0x12345000 + i      # the harness's pattern (probes_counters.c probe_legacy_k7)
            alias = v if "k7_not_aliased" not in self.faults else 0
            out.append({"index": i, "written": v,
                        "k7_rdmsr": self._acc("rdmsr", 0xC0010004 + i, f"MSR_K7_PERFCTR{i}", True, v),
                        "k7_wrmsr": self._acc("wrmsr", 0xC0010004 + i, f"MSR_K7_PERFCTR{i}", True, written=v),
                        "f15h_rdmsr": self._acc("rdmsr", 0xC0010201 + 2 * i, f"MSR_F15H_PERF_CTR{i}", True, alias),
                        "rdpmc": self._acc("rdpmc", i, "RDPMC", True, v),
                        "k7_sel_wrmsr": self._acc("wrmsr", 0xC0010000 + i, f"MSR_K7_EVNTSEL{i}", True,
                                                  written=self._sel("instructions", enable=False)),
                        "f15h_sel_read": self._sel("instructions", enable=False)
                        if "k7_not_aliased" not in self.faults else 0,
                        "count": c["instructions"]})
        return {"workload": w, "counters": out, "exceptions": []}

    def _p_masked_events(self, rng: random.Random, density: str, iterations: int) -> dict[str, Any]:
        # The upstream cases count MEM_INST_RETIRED / LS_DISPATCH over a load/store loop; the model
        # has no memory workload to derive those counts from, and inventing them would prove nothing.
        raise _Unsupported("the model does not simulate the masked-event load/store workload")

    def _p_filter_fixed_bitmap(self, rng: random.Random, iterations: int) -> dict[str, Any]:
        if self.vendor != "intel" or not self.fixed:
            raise _Unsupported("no fixed counters")
        w, c = self._loop(rng, self._iterations(iterations), "exit_each")
        m = max(self.fixed) + 1
        counts = [self._jitter(rng, FIXED_EVENTS[j], c[FIXED_EVENTS[j]]) for j in range(m)]
        results = []
        for i in range(m):
            for b in range(1 << m):
                for action in ("allow", "deny"):
                    for with_events in (False, True):
                        bit = bool(b >> i & 1)
                        ok = (bit if action == "allow" else not bit) or "fixed_bitmap_ignored" in self.faults
                        results.append({"counter": i, "bitmap": b, "action": action, "with_events": with_events,
                                        "set_errno": 0, "count": counts[i] if ok else 0})
        return {"fixed_counters": m, "no_filter": counts, "results": results, "exceptions": []}

    def _p_overflow_all(self, rng: random.Random) -> dict[str, Any]:
        out = []
        intel = self.vendor == "intel"
        # the harness's loop: OVERFLOW_LOOP iterations of the exit-free plain loop, counted by every
        # counter: instructions and branches by construction; the cycle-like fixed events only need
        # to wrap (drawn). No exit in the window, so no exit-borne fault or erratum bends it.
        w = workload(OVERFLOW_LOOP, "plain")
        loop = {"instructions": w["instructions"], "branches": w["branches"]}
        for kind, idx in [("gp", i) for i in range(self.gp)] + [("fixed", j) for j in self.fixed]:
            for want_int in (True, False):
                got = 1 if want_int and "pmi_lost" not in self.faults else 0
                # Intel sets LVTPC.MASK on PMI delivery; the guest unmasks it again (SDM 13.5.1)
                lvt = (0x10000 | PMI_VECTOR) if intel and got else PMI_VECTOR
                if "lvtpc_mask_lost" in self.faults and got:
                    lvt = PMI_VECTOR
                bit = idx if kind == "gp" else 32 + idx
                ev = "branches" if kind == "gp" else FIXED_EVENTS[idx]
                # the counter counts on after the wrap (the SDM's counters are free-running): the loop's
                # events minus the 64 before it, plus the PMI handler's own when one ran (its size is
                # the compiled guest's: drawn here, declared in orchestrator/crosscheck.py)
                handler = (rng.randint(4, 12) if ev == "branches" else rng.randint(30, 90)) if got else 0
                events = loop.get(ev) or int(w["instructions"] * rng.uniform(2.2, 3.0))
                count = events - 64 + handler
                out.append({"kind": kind, "index": idx, "event": ev, "int": want_int, "count": count,
                            "global_status": (1 << bit) if self.global_ctrl else None, "interrupts": got,
                            "lvtpc_after": lvt if got else PMI_VECTOR})
        return {"event": "branches", "vector": PMI_VECTOR, "counters": out, "exceptions": []}


class _Unsupported(Exception):
    pass


class _BadParam(Exception):
    pass
