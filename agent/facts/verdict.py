"""Can this host run KVM's mediated vPMU, and which checks can it trust? (vpmu.md §1.2, §1.3, §2)

The rules, their texts, their order and their upstream sources are one table,
``agent/facts/rules.py``, which the C harness's verdict (agent/native/lib/caps.c) reads too,
through a header generated from it. In table order:

* live KVM state: ``/dev/kvm``, ``kvm.enable_pmu=Y``, the vendor module (kvm_intel / kvm_amd)
  exposing ``enable_mediated_pmu=Y`` (default N; the first release comes from inventory/kvm.yaml);
* the CPU (vendor table, agent/facts/vendors.py): Intel PMU v4+, PERF_CAPABILITIES full-width
  writes (only asked while the parameter is not Y: with Y KVM has checked it, finding 8), not
  hybrid; AMD PerfMonV2;
* KVM's supported CPUID enumerates a PMU;
* no host perf event without ``exclude_guest`` (finding 1): ``kernel.nmi_watchdog`` must be 0,
  and a trial KVM_CREATE_VCPU with an in-kernel irqchip (facts ``kvm.mediated_vcpu_errno``, made
  only when the parameter is Y) must not fail with EBUSY, which also catches other system-wide
  events;
* caveats, which do not block: ``kvm.ignore_msrs=Y`` voids every expected-#GP check (finding 14).

Every text names the missing fact so that skips can quote it.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .rules import text
from .tables import first_mediated_release
from .vendors import VENDORS


def mediated_verdict(facts: dict[str, Any]) -> dict[str, Any]:
    """``{"status": "available"|"unavailable", "reasons": [...], "caveats": [...]}``.

    ``reasons`` block the mediated vPMU; ``caveats`` name checks this host cannot make.
    """
    cpu = facts.get("cpu") or {}
    pmu = facts.get("pmu") or {}
    kvm = facts.get("kvm") or {}
    kernel = facts.get("kernel") or {}
    from_dump = str(facts.get("source") or "").startswith("dump:")
    v = VENDORS.get(cpu.get("vendor"))
    present = kvm.get("present")
    reasons: list[str] = []

    if present is None:
        reasons.append(text("kvm_unknown"))
    elif not present:
        reasons.append(text("no_dev_kvm"))
    if v is None:
        reasons.append(text("unknown_vendor", cpu.get("vendor_id")))
        return {"status": "unavailable", "reasons": reasons, "caveats": []}

    live = bool(present)
    if live:
        enable_pmu = kvm.get("enable_pmu")
        if enable_pmu is None:
            reasons.append(text("enable_pmu_unknown"))
        elif not enable_pmu:
            reasons.append(text("enable_pmu_off"))
        loaded = kvm.get("vendor_modules")
        if loaded is None:
            loaded = [kvm["module"]] if kvm.get("module") else []
        if v.kvm_module not in loaded:
            reasons.append(text("no_vendor_module", v.kvm_module, ", ".join(loaded) or "none"))
        elif kvm.get("enable_mediated_pmu") is None:
            reasons.append(text("mediated_param_absent", v.kvm_module, kernel.get("release") or "unknown",
                                first_mediated_release()))
        elif not kvm["enable_mediated_pmu"]:
            reasons.append(text("mediated_param_off", v.kvm_module))

    reasons += v.mediated_cpu_rules(cpu, pmu, from_dump, live and kvm.get("enable_mediated_pmu") is True)

    if live:
        sup = kvm.get("supported_pmu")
        key, reason = v.kvm_supported_rule
        if sup is not None and not sup.get(key):
            reasons.append(reason)
        watchdog = kernel.get("nmi_watchdog")
        if watchdog:
            reasons.append(text("nmi_watchdog", watchdog))
        err = kvm.get("mediated_vcpu_errno")
        if err == errno.EBUSY:
            reasons.append(text("vcpu_busy"))
        elif err:
            reasons.append(text("vcpu_failed", err, os.strerror(err)))

    caveats = [text("ignore_msrs")] if live and kvm.get("ignore_msrs") else []
    return {"status": "unavailable" if reasons else "available", "reasons": reasons, "caveats": caveats}
