"""Host facts (docs/contracts.md §2): what the host really is, from CPUID, never from the inventory.

Public API::

    collect_facts(cpuid_dump=None) -> dict          # live host, or a CPUID dump file
    decode_cpuid(leaves) -> {"cpu", "pmu"}
    parse_cpuid_dump(text, filename) -> leaves      # `cpuid -r` or plain format; ValueError on junk
    mediated_verdict(facts) -> {"status", "reasons"}
    flat_facts(facts) -> dict                       # keys for `requires` markers and --select
    lookup_uarch(vendor, family, model, stepping=None) -> row | None
    load_microarch() / load_errata()                # cached YAML rows
    match_errata(vendor, family, model, stepping, microcode) -> [{"id", "symptoms", ...}]
    facts_from_row(row, model=None, stepping=None) -> {"cpu", "pmu"}   # for simulated hosts
    probe_main(cpuid_dump, as_json) -> int          # `agent probe [--cpuid-dump FILE]`
    summarize_facts(facts) -> str                   # human-readable lines
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .cpuid import (
    CpuidDumpError,
    CpuidUnavailable,
    Leaves,
    format_cpuid_dump,
    load_cpuid_dump,
    parse_cpuid_dump,
    read_cpuid_live,
)
from .decode import CPU_KEYS, apply_perf_capabilities, decode_cpuid, decode_pmu, empty_pmu
from .kvm import (
    MSR_IA32_PERF_CAPABILITIES,
    cpuinfo_first_cpu,
    kernel_state,
    kvm_state,
    perf_core_pmu_registered,
    read_msr,
    unknown_kernel_state,
    unknown_kvm_state,
)
from .tables import (
    SYMPTOM_CLASSES,
    facts_from_row,
    load_errata,
    load_microarch,
    lookup_uarch,
    match_errata,
    uarch_by_id,
)
from .vendors import VENDORS, vendor_name
from .verdict import mediated_verdict

SCHEMA = 1

__all__ = [
    "SCHEMA", "SYMPTOM_CLASSES", "CpuidDumpError", "CpuidUnavailable", "Leaves", "collect_facts",
    "decode_cpuid", "facts_from_row", "flat_facts", "format_cpuid_dump", "load_errata", "load_microarch",
    "lookup_uarch", "match_errata", "mediated_verdict", "parse_cpuid_dump", "probe_main",
    "read_cpuid_live", "summarize_facts", "uarch_by_id",
]


def _cpu_from_cpuinfo(info: dict[str, str]) -> dict[str, Any]:
    """Fallback ``cpu`` part when CPUID cannot be read: the kernel's own decoding of CPUID."""
    def num(key: str) -> int | None:
        try:
            return int(info[key], 0)
        except (KeyError, ValueError):
            return None

    cpu = dict.fromkeys(CPU_KEYS)
    vendor = vendor_name(info.get("vendor_id"))
    family, model, stepping = num("cpu family"), num("model"), num("stepping")
    row = lookup_uarch(vendor, family, model, stepping)
    cpu.update(vendor=vendor, vendor_id=info.get("vendor_id"), family=family, model=model, stepping=stepping,
               model_name=info.get("model name"), uarch=row["id"] if row else None,
               uarch_name=row["name"] if row else None,
               hypervisor="hypervisor" in info.get("flags", "").split())
    return cpu


def _errata_entries(cpu: dict[str, Any]) -> list[dict[str, Any]]:
    found = match_errata(cpu.get("vendor"), cpu.get("family"), cpu.get("model"), cpu.get("stepping"),
                         cpu.get("microcode"))
    return [{"id": e["id"], "symptoms": e["symptoms"], "events": e["events"]} for e in found]


def collect_facts(cpuid_dump: str | Path | None = None) -> dict[str, Any]:
    """The facts JSON of contracts §2.

    Live (no dump): CPUID from /dev/cpu/0/cpuid (fallback ``cpuid -r -1``), microcode from
    /proc/cpuinfo, IA32_PERF_CAPABILITIES from /dev/cpu/0/msr when readable, KVM and kernel state
    from /dev/kvm, /sys and /proc. With a dump, the dump is decoded instead and the ``kvm`` and
    ``kernel`` parts (and microcode) are all ``null``; ``source`` says which happened.
    Raises :class:`CpuidDumpError` (a ``ValueError``) for a malformed or unreadable dump.
    """
    live = cpuid_dump is None
    if not live:
        leaves: Leaves | None = load_cpuid_dump(cpuid_dump)
        source = f"dump:{cpuid_dump}"
    else:
        try:
            leaves, source = read_cpuid_live(0)
        except CpuidUnavailable as exc:
            leaves, source = None, f"/proc/cpuinfo (CPUID unreadable: {exc})"

    info = cpuinfo_first_cpu() if live else {}
    if leaves is not None:
        decoded = decode_cpuid(leaves)
        cpu, pmu = decoded["cpu"], decoded["pmu"]
        if live and not cpu["model_name"]:
            cpu["model_name"] = info.get("model name")
    else:
        cpu, pmu = _cpu_from_cpuinfo(info), empty_pmu()
    if live:
        cpu["microcode"] = info.get("microcode")
        v = VENDORS.get(cpu["vendor"])
        if v is not None and v.has_perf_capabilities and pmu.get("pdcm"):
            apply_perf_capabilities(pmu, read_msr(MSR_IA32_PERF_CAPABILITIES))
        if v is not None and v.perf_probes_legacy_counters and leaves is not None and pmu["gp_counters"] is None:
            # AMD legacy counters under a hypervisor: CPUID cannot say, the kernel's perf probed them.
            registered = perf_core_pmu_registered()
            if registered is not None:
                pmu.update(decode_pmu(leaves, v.name, amd_legacy_counters=4 if registered else 0))

    facts: dict[str, Any] = {
        "schema": SCHEMA,
        "simulated": False,
        "source": source,
        "cpu": cpu,
        "pmu": pmu,
        "kvm": kvm_state(cpu["vendor"]) if live else unknown_kvm_state(),
        "kernel": kernel_state() if live else unknown_kernel_state(),
    }
    facts["mediated_pmu"] = mediated_verdict(facts)
    facts["errata"] = _errata_entries(cpu)
    return facts


def flat_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """Flatten to the keys used by ``requires`` markers and ``--select`` (contracts §2)."""
    cpu = facts.get("cpu") or {}
    pmu = facts.get("pmu") or {}
    kvm = facts.get("kvm") or {}
    kernel = facts.get("kernel") or {}
    verdict = facts.get("mediated_pmu") or mediated_verdict(facts)
    errata = facts.get("errata") or []
    symptoms: list[str] = []
    for e in errata:
        symptoms += [s for s in e.get("symptoms", []) if s not in symptoms]
    fw = pmu.get("full_width_writes")
    if fw is None and cpu.get("vendor") == "intel" and kvm.get("enable_mediated_pmu") is True:
        fw = True  # finding 8: kvm_intel forces enable_mediated_pmu=N without FW_WRITES
    return {
        "vendor": cpu.get("vendor"),
        "family": cpu.get("family"),
        "model": cpu.get("model"),
        "stepping": cpu.get("stepping"),
        "uarch": cpu.get("uarch"),
        "hybrid": cpu.get("hybrid"),
        "pmu_version": pmu.get("version"),
        "gp_counters": pmu.get("gp_counters"),
        "fixed_counters": pmu.get("fixed_counters"),
        "perfmon_v2": pmu.get("perfmon_v2"),
        "full_width_writes": fw,
        "kvm": kvm.get("present"),
        "enable_pmu": kvm.get("enable_pmu"),
        "ignore_msrs": kvm.get("ignore_msrs"),
        "mediated_pmu": verdict.get("status") == "available",
        "simulated": bool(facts.get("simulated")),
        "kernel": kernel.get("release"),
        "errata": [e["id"] for e in errata],
        "symptoms": symptoms,
    }


def summarize_facts(facts: dict[str, Any]) -> str:
    """A few human-readable lines (not JSON) describing the facts."""
    cpu, pmu, kvm = facts["cpu"], facts["pmu"], facts["kvm"]
    fam = f"{cpu['family']:#x}" if cpu.get("family") is not None else "?"
    mod = f"{cpu['model']:#x}" if cpu.get("model") is not None else "?"
    lines = [
        f"source:   {facts.get('source')}",
        f"cpu:      {cpu.get('vendor_id')} family {fam} model {mod} stepping {cpu.get('stepping')} "
        f"microcode {cpu.get('microcode')} -> {cpu.get('uarch') or 'unknown uarch'}"
        f"{' (hybrid)' if cpu.get('hybrid') else ''}{' [under a hypervisor]' if cpu.get('hypervisor') else ''}",
        f"pmu:      version {pmu.get('version')}, {pmu.get('gp_counters')} GP x {pmu.get('gp_width')} bit, "
        f"{pmu.get('fixed_counters')} fixed x {pmu.get('fixed_width')} bit, PerfMonV2 {pmu.get('perfmon_v2')}, "
        f"full-width writes {pmu.get('full_width_writes')}",
        f"kvm:      present {kvm.get('present')}, module {kvm.get('module')}, enable_pmu {kvm.get('enable_pmu')}, "
        f"enable_mediated_pmu {kvm.get('enable_mediated_pmu')}",
        f"kernel:   {facts['kernel'].get('release')}",
        f"mediated: {facts['mediated_pmu']['status']}",
    ]
    lines += [f"  - {r}" for r in facts["mediated_pmu"]["reasons"]]
    lines += [f"  ! {r}" for r in facts["mediated_pmu"].get("caveats") or []]
    lines.append(f"errata:   {', '.join(e['id'] for e in facts['errata']) or 'none'}")
    return "\n".join(lines)


def probe_main(cpuid_dump: str | None, as_json: bool) -> int:
    """``agent probe [--cpuid-dump FILE]``: print the facts JSON and return 0.

    ``as_json=True`` prints one compact line (for machines: ssh, pipes); ``False`` prints it
    indented for people. A bad dump prints one ``FILE:LINE: ...`` line to stderr and returns 2.
    """
    try:
        facts = collect_facts(cpuid_dump)
    except CpuidDumpError as exc:
        print(f"agent probe: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(facts) if as_json else json.dumps(facts, indent=2))
    return 0
