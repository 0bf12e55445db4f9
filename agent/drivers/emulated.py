"""The ``emulated`` driver: the real native harness (the ``kvm`` driver's ``vpmu``) with the PMU emulated
inside the VMM (``agent/native/lib/epmu.c``), so that the probes' MSR sequences, the guest program and the
VMM all run end to end on hosts without a PMU.

The emulated PMU plays the host: one register layout per run (``intel``: a Sapphire-Rapids-like host as
KVM 7.0 exposes it, version clamped to 2 and 3 fixed counters; ``intel-v5``: the same host with the
version passed through; ``amd``: a Zen 4 host with PerfMonV2). Its counts are exact for instructions and
branches and absent for every other event, so its hosts are labelled like simulated ones
(``facts.simulated = True``) and say how in ``facts.emulated``.

Inventory entry::

    - name: emu-intel
      driver: emulated
      emulated: {layout: intel, errata: [...], faults: [...]}

``errata`` (ids of inventory/errata.yaml, default: those of the microarchitecture the layout stands for)
and ``faults`` (ids of inventory/faults.yaml with an ``emulated`` form) bend the emulated PMU itself.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

from agent.drivers.kvm import KvmDriver

# Layout -> the inventory/microarch.yaml id it stands for.
LAYOUTS: dict[str, str] = {"intel": "sapphirerapids", "intel-v5": "sapphirerapids", "amd": "zen4"}
# What the emulated PMU counts; every other event's counter keeps the value the guest wrote.
MODELLED_EVENTS = ("instructions", "branches")
# Faults (inventory/faults.yaml ids) injected in the emulated PMU (lib/epmu.c fault_names).
FAULTS = ("counters_not_stopped_at_exit", "stale_counters_new_vm", "cross_context_leak", "filter_ignored",
          "fixed_bitmap_ignored", "filter_update_not_applied", "pmi_lost", "global_ctrl_not_restored",
          "wrong_counter_width", "unexposed_counters_accessible")
# Errata symptom classes the emulated PMU shows (lib/epmu.c erratum_names); others have no effect on it.
SYMPTOMS = ("insn_overcount_on_vm_transition", "branch_overcount_on_vm_transition", "vmrun_counted_as_branch")
# Probes that need a host PMU (host perf events, perf/KVM exclusion): unsupported on this driver.
HOST_SIDE_PROBES = ("host_excludes_guest", "exclusivity")
# KVM rules the emulated PMU does not follow (facts emulated.unmodelled_rules; suites skip on them).
HOST_GUEST_BITS = ("host_guest_only_bits", "the layouts follow KVM 7.0, where AMD EVENTSEL bits 41:40 are "
                   "reserved and dropped and the guest has no SVM; kvm-x86 2ed72677a5c1 is not emulated")
PVM_USER_MODE = ("user_mode_counting", "KVM on a PVM host (kvm_pvm) gives no single-step exits at CPL 3, "
                 "so the emulated PMU never sees a user-mode instruction")


def unmodelled_rules() -> dict[str, str]:
    """Rule name -> why the emulated PMU on this machine does not follow it."""
    from agent.facts.kvm import kvm_vendor_modules

    rules = dict([HOST_GUEST_BITS])
    if "kvm_pvm" in kvm_vendor_modules():
        rules.update([PVM_USER_MODE])
    return rules


def spec(host: dict[str, Any]) -> tuple[str, list[str], list[str] | None]:
    """(layout, faults, errata ids or None) of an inventory entry; ValueError naming the host and field."""
    name = host.get("name") or "?"
    em = host.get("emulated")
    if not isinstance(em, dict):
        raise ValueError(f"host {name}: field 'emulated' ({{layout: ...}}) is required for driver emulated")
    layout = em.get("layout")
    if layout not in LAYOUTS:
        raise ValueError(f"host {name}: emulated.layout {layout!r} is not one of: {', '.join(LAYOUTS)}")
    faults = em.get("faults") or []
    if not isinstance(faults, list) or not all(isinstance(f, str) for f in faults):
        raise ValueError(f"host {name}: emulated.faults must be a list of fault ids")
    bad = [f for f in faults if f not in FAULTS]
    if bad:
        raise ValueError(f"host {name}: emulated.faults has {bad[0]!r}, which has no emulated form "
                         f"(known: {', '.join(FAULTS)})")
    errata = em.get("errata")
    if errata is not None and (not isinstance(errata, list) or not all(isinstance(e, str) for e in errata)):
        raise ValueError(f"host {name}: emulated.errata must be a list of erratum ids")
    return layout, list(faults), errata


def _symptoms(facts: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for e in facts.get("errata") or []:
        out += [s for s in e.get("symptoms") or [] if s in SYMPTOMS and s not in out]
    return out


class EmulatedDriver(KvmDriver):
    """The kvm driver's harness, run with ``PMUFARM_EPMU=<layout>`` (and its faults and errata)."""

    name = "emulated"
    simulated = True

    def __init__(self, host: dict[str, Any], facts: dict[str, Any] | None = None,
                 binary: str | os.PathLike[str] | None = None, timeout: float | None = None) -> None:
        super().__init__(facts, binary, **({"timeout": timeout} if timeout else {}))
        self.layout, self.faults, _ = spec(host)
        self.symptoms = _symptoms(self.facts)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PMUFARM_EPMU": self.layout, "PMUFARM_EPMU_FAULTS": ",".join(self.faults),
                "PMUFARM_EPMU_ERRATA": ",".join(self.symptoms)}

    def _exec(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=timeout,
                              check=False, env=self.env())


def emulated_facts(host: dict[str, Any], binary: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Facts (contracts §2) of an emulated host: the uarch's CPU and errata, the PMU the harness reports.

    ``cpu``, ``pmu`` and ``errata`` are those of the microarchitecture the layout stands for (as for a
    simulated host); ``kvm.supported_pmu`` and ``mediated_pmu`` are what ``vpmu caps`` says under the
    emulated PMU, so the suites judge what the harness actually ran against.
    """
    from agent import facts as F
    from agent.drivers.model import simulated_facts

    layout, faults, errata = spec(host)
    name = host.get("name") or "?"
    model_host = {"name": name, "model": {"uarch": LAYOUTS[layout], "errata": errata}}
    facts = simulated_facts(model_host)
    try:
        caps = EmulatedDriver(host, facts, binary).caps()
    except (OSError, RuntimeError, ValueError) as exc:      # no harness binary, vpmu caps failed
        caps = {"mediated_pmu": {"status": "unavailable", "reasons": [f"vpmu caps (emulated): {exc}"]}}
    supported = (caps.get("kvm") or {}).get("supported_pmu") or {}
    kvm = facts["kvm"]
    kvm["supported_pmu"] = {**kvm["supported_pmu"], **{k: v for k, v in supported.items()
                                                        if k in kvm["supported_pmu"]}}
    kvm.update(enable_pmu=True, enable_mediated_pmu=True)
    facts["kernel"] = {**facts["kernel"], "release": f"{platform.release()} (emulated PMU)"}
    med = caps.get("mediated_pmu") or {}
    facts["mediated_pmu"] = F.mediated_verdict(facts) if med.get("status") == "available" else \
        {"status": "unavailable", "reasons": list(med.get("reasons") or ["vpmu caps: no verdict"])}
    facts["simulated"] = True
    facts["faults"] = faults
    facts["emulated"] = {"layout": layout, "uarch": LAYOUTS[layout], "modelled_events": list(MODELLED_EVENTS),
                         "faults": faults, "symptoms": _symptoms(facts), "unmodelled_rules": unmodelled_rules(),
                         "host_side_unsupported": list(HOST_SIDE_PROBES)}
    return facts
