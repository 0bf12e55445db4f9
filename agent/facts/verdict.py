"""Can this host run KVM's mediated vPMU? The kernel's rules (shared/reference/vpmu.md §1.3):

* generic (kvm_init_pmu_capability): ``kvm.enable_pmu=Y`` and the vendor module parameter
  ``enable_mediated_pmu=Y`` (kvm_intel / kvm_amd, Linux 7.0+, default N);
* Intel: architectural PMU version >= 4 (PERF_GLOBAL_STATUS_SET) and IA32_PERF_CAPABILITIES
  full-width writes (bit 13), and not a hybrid CPU (KVM disables the vPMU there);
* AMD: PerfMonV2 (CPUID 0x80000022 EAX[0]).

The vendor rules live in the vendor table (agent/facts/vendors.py: ``mediated_cpu_rules``,
``kvm_supported_rule``). Every reason names the missing fact so that skips can quote it.
"""

from __future__ import annotations

from typing import Any

from .vendors import VENDORS


def _cpu_reasons(cpu: dict[str, Any], pmu: dict[str, Any], from_dump: bool) -> list[str]:
    v = VENDORS.get(cpu.get("vendor"))
    if v is None:
        return [f"CPU vendor {cpu.get('vendor_id')!r} is neither GenuineIntel nor AuthenticAMD"]
    return v.mediated_cpu_rules(cpu, pmu, from_dump)


def _kvm_reasons(vendor: str | None, kvm: dict[str, Any], kernel: dict[str, Any]) -> list[str]:
    present = kvm.get("present")
    if present is None:
        return ["KVM state unknown (facts not probed on a live host)"]
    if not present:
        return ["/dev/kvm missing: KVM not present"]
    v = VENDORS.get(vendor)
    reasons = []
    enable_pmu = kvm.get("enable_pmu")
    if enable_pmu is None:
        reasons.append("kvm.enable_pmu unknown (/sys/module/kvm/parameters/enable_pmu unreadable)")
    elif not enable_pmu:
        reasons.append("kvm.enable_pmu=N")

    want = v.kvm_module if v else None
    loaded = kvm.get("vendor_modules")
    if loaded is None:
        loaded = [kvm["module"]] if kvm.get("module") else []
    if want is not None:
        if want not in loaded:
            reasons.append(f"no {want} module: enable_mediated_pmu is not exposed "
                           f"(loaded vendor modules: {', '.join(loaded) or 'none'})")
        elif kvm.get("enable_mediated_pmu") is None:
            release = kernel.get("release") or "unknown"
            reasons.append(f"{want}.enable_mediated_pmu is not exposed (kernel {release}; "
                           "mediated vPMU needs Linux 7.0+)")
        elif not kvm["enable_mediated_pmu"]:
            reasons.append(f"{want}.enable_mediated_pmu=N")

    sup = kvm.get("supported_pmu")
    if sup is not None and v is not None:
        key, reason = v.kvm_supported_rule
        if not sup.get(key):
            reasons.append(reason)
    return reasons


def mediated_verdict(facts: dict[str, Any]) -> dict[str, Any]:
    """``{"status": "available"|"unavailable", "reasons": [...]}`` for these facts."""
    cpu = facts.get("cpu") or {}
    from_dump = str(facts.get("source") or "").startswith("dump:")
    reasons = _cpu_reasons(cpu, facts.get("pmu") or {}, from_dump)
    reasons += _kvm_reasons(cpu.get("vendor"), facts.get("kvm") or {}, facts.get("kernel") or {})
    return {"status": "unavailable" if reasons else "available", "reasons": reasons}
