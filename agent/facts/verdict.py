"""Can this host run KVM's mediated vPMU? The kernel's rules (shared/reference/vpmu.md §1.3):

* generic (kvm_init_pmu_capability): ``kvm.enable_pmu=Y`` and the vendor module parameter
  ``enable_mediated_pmu=Y`` (kvm_intel / kvm_amd, Linux 7.0+, default N);
* Intel: architectural PMU version >= 4 (PERF_GLOBAL_STATUS_SET) and IA32_PERF_CAPABILITIES
  full-width writes (bit 13), and not a hybrid CPU (KVM disables the vPMU there);
* AMD: PerfMonV2 (CPUID 0x80000022 EAX[0]).

Every reason names the missing fact so that skips can quote it.
"""

from __future__ import annotations

from typing import Any

from .vendors import VENDORS

MIN_INTEL_VERSION = 4


def _cpu_reasons(cpu: dict[str, Any], pmu: dict[str, Any], from_dump: bool) -> list[str]:
    vendor = cpu.get("vendor")
    reasons = []
    if vendor == "intel":
        version = pmu.get("version")
        if version is None:
            reasons.append("CPUID 0x0A EAX[7:0] PMU version unknown")
        elif version < MIN_INTEL_VERSION:
            reasons.append(f"CPUID 0x0A EAX[7:0] PMU version={version} < {MIN_INTEL_VERSION}")
        fw = pmu.get("full_width_writes")
        if fw is None:
            how = "not in a CPUID dump" if from_dump else "unreadable"
            reasons.append(f"IA32_PERF_CAPABILITIES (MSR 0x345) {how}: full-width writes (bit 13) unknown")
        elif not fw:
            if pmu.get("pdcm") is False:
                reasons.append("CPUID 0x1 ECX[15] PDCM=0: no IA32_PERF_CAPABILITIES, so no full-width writes")
            else:
                reasons.append("IA32_PERF_CAPABILITIES (MSR 0x345) bit 13 FW_WRITE=0")
        hybrid = cpu.get("hybrid")
        if hybrid is None:
            reasons.append("CPUID 0x7 EDX[15] hybrid unknown")
        elif hybrid:
            reasons.append("CPUID 0x7 EDX[15] hybrid=1: KVM disables the vPMU on hybrid CPUs")
    elif vendor == "amd":
        v2 = pmu.get("perfmon_v2")
        if v2 is None:
            reasons.append("CPUID 0x80000022 EAX[0] PerfMonV2 unknown")
        elif not v2:
            reasons.append("CPUID 0x80000022 EAX[0] PerfMonV2=0")
    else:
        reasons.append(f"CPU vendor {cpu.get('vendor_id')!r} is neither GenuineIntel nor AuthenticAMD")
    return reasons


def _kvm_reasons(vendor: str | None, kvm: dict[str, Any], kernel: dict[str, Any]) -> list[str]:
    present = kvm.get("present")
    if present is None:
        return ["KVM state unknown (facts not probed on a live host)"]
    if not present:
        return ["/dev/kvm missing: KVM not present"]
    reasons = []
    enable_pmu = kvm.get("enable_pmu")
    if enable_pmu is None:
        reasons.append("kvm.enable_pmu unknown (/sys/module/kvm/parameters/enable_pmu unreadable)")
    elif not enable_pmu:
        reasons.append("kvm.enable_pmu=N")

    want = VENDORS[vendor].kvm_module if vendor in VENDORS else None
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
    if sup is not None:
        if vendor == "amd" and not sup.get("perfmon_v2"):
            reasons.append("KVM's supported CPUID 0x80000022 has no PerfMonV2")
        elif vendor == "intel" and not sup.get("version"):
            reasons.append("KVM's supported CPUID 0x0A enumerates no PMU (version 0)")
    return reasons


def mediated_verdict(facts: dict[str, Any]) -> dict[str, Any]:
    """``{"status": "available"|"unavailable", "reasons": [...]}`` for these facts."""
    cpu = facts.get("cpu") or {}
    from_dump = str(facts.get("source") or "").startswith("dump:")
    reasons = _cpu_reasons(cpu, facts.get("pmu") or {}, from_dump)
    reasons += _kvm_reasons(cpu.get("vendor"), facts.get("kvm") or {}, facts.get("kernel") or {})
    return {"status": "unavailable" if reasons else "available", "reasons": reasons}
