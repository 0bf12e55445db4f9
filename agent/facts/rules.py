"""The mediated-vPMU verdict's rule set, shared by Python (agent/facts/verdict.py) and C
(agent/native/lib/caps.c).

One table, two readers: every reason either side can give is a row here, with a printf template
and the upstream source that makes it a rule. ``verdict.py`` formats the template with ``%``;
the C harness includes ``agent/native/include/verdict_rules.h``, which is GENERATED from this
table (``python -m agent.facts.rules > agent/native/include/verdict_rules.h``;
tests/test_facts.py fails when the header is stale), and both evaluate the rules in table order,
so the two verdicts are the same list of strings for the same host (tests/test_facts.py runs
``vpmu caps`` beside ``collect_facts()`` under crafted /sys and /proc trees to prove it).

``blocks``: True = the mediated vPMU cannot be used (a ``reasons`` entry); False = a caveat
(``caveats``): the vPMU works but some checks cannot be trusted (the suites skip those by fact).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    id: str
    template: str      # printf-style; Python formats it with %
    blocks: bool
    source: str


RULES: tuple[Rule, ...] = (
    # --- facts of a dump: no live KVM state -------------------------------------------------------
    Rule("kvm_unknown", "KVM state unknown (facts not probed on a live host)", True,
         "no live host: nothing below can be read"),
    Rule("no_dev_kvm", "/dev/kvm missing: KVM not present", True,
         "Documentation/virt/kvm/api.rst: every KVM ioctl starts from /dev/kvm"),
    Rule("unknown_vendor", "CPU vendor '%s' is neither GenuineIntel nor AuthenticAMD", True,
         "arch/x86/kvm: only vmx/ (kvm_intel) and svm/ (kvm_amd) implement the mediated PMU"),
    # --- kvm.ko and the vendor module -------------------------------------------------------------
    Rule("enable_pmu_unknown", "kvm.enable_pmu unknown (/sys/module/kvm/parameters/enable_pmu unreadable)",
         True, "x86.c module_param(enable_pmu): read-only after load"),
    Rule("enable_pmu_off", "kvm.enable_pmu=N", True,
         "x86.c kvm_arch_vcpu_precreate(): mediated PMU only if kvm->arch.enable_pmu (v6 16/44)"),
    Rule("no_vendor_module", "no %s module: enable_mediated_pmu is not exposed (loaded vendor modules: %s)",
         True, "v6 33/44: module_param(enable_mediated_pmu) lives in vmx.c / svm.c"),
    Rule("mediated_param_absent",
         "%s.enable_mediated_pmu is not exposed (kernel %s; mediated vPMU needs Linux %s+)", True,
         "v6 33/44 'Expose enable_mediated_pmu parameter to user space', first released in Linux 7.0"),
    Rule("mediated_param_off", "%s.enable_mediated_pmu=N", True,
         "v6 33/44: default N; KVM also forces it to N when the CPU does not qualify"),
    # --- the CPU (host CPUID, PERF_CAPABILITIES) --------------------------------------------------
    Rule("intel_version_unknown", "CPUID 0x0A EAX[7:0] PMU version unknown", True,
         "vmx/pmu_intel.c intel_pmu_is_mediated_pmu_supported(): host_pmu->version >= 4"),
    Rule("intel_version_low", "CPUID 0x0A EAX[7:0] PMU version=%d < 4", True,
         "vmx/pmu_intel.c intel_pmu_is_mediated_pmu_supported(): v4+ for GLOBAL_STATUS_SET"),
    # Finding 8: with <vendor>.enable_mediated_pmu=Y KVM itself has checked FW_WRITES
    # (intel_pmu_is_mediated_pmu_supported() forces the parameter to N otherwise), so an
    # unreadable MSR (no msr driver, not root) is only a reason while the parameter is not Y.
    Rule("intel_fw_unknown", "IA32_PERF_CAPABILITIES (MSR 0x345) %s: full-width writes (bit 13) unknown",
         True, "vmx/pmu_intel.c intel_pmu_is_mediated_pmu_supported(): host_perf_cap & PERF_CAP_FW_WRITES"),
    Rule("intel_no_pdcm", "CPUID 0x1 ECX[15] PDCM=0: no IA32_PERF_CAPABILITIES, so no full-width writes",
         True, "vmx/pmu_intel.c intel_pmu_is_mediated_pmu_supported(): PERF_CAPABILITIES read only with PDCM"),
    Rule("intel_fw_clear", "IA32_PERF_CAPABILITIES (MSR 0x345) bit 13 FW_WRITE=0", True,
         "vmx/pmu_intel.c intel_pmu_is_mediated_pmu_supported()"),
    Rule("intel_hybrid_unknown", "CPUID 0x7 EDX[15] hybrid unknown", True,
         "pmu.c kvm_init_pmu_capability(): X86_FEATURE_HYBRID_CPU disables the vPMU"),
    Rule("intel_hybrid", "CPUID 0x7 EDX[15] hybrid=1: KVM disables the vPMU on hybrid CPUs", True,
         "pmu.c kvm_init_pmu_capability(): X86_FEATURE_HYBRID_CPU disables the vPMU"),
    Rule("amd_v2_unknown", "CPUID 0x80000022 EAX[0] PerfMonV2 unknown", True,
         "svm/pmu.c amd_pmu_is_mediated_pmu_supported(): host PMU version >= 2 (v6 18/44)"),
    Rule("amd_no_v2", "CPUID 0x80000022 EAX[0] PerfMonV2=0", True,
         "svm/pmu.c amd_pmu_is_mediated_pmu_supported(); perf sets PERF_PMU_CAP_MEDIATED_VPMU only for v2+"),
    # --- what KVM gives guests ----------------------------------------------------------------------
    Rule("intel_kvm_no_pmu", "KVM's supported CPUID 0x0A enumerates no PMU (version 0)", True,
         "cpuid.c leaf 0xA reports kvm_pmu_cap (zeroed when KVM disables the vPMU)"),
    Rule("amd_kvm_no_v2", "KVM's supported CPUID 0x80000022 has no PerfMonV2", True,
         "cpuid.c leaf 0x80000022 reports kvm_pmu_cap.version >= 2"),
    # --- host perf events that count the guest (finding 1) ------------------------------------------
    Rule("nmi_watchdog",
         "kernel.nmi_watchdog=%d: the perf hard-lockup detector's event has no exclude_guest, so "
         "KVM_CREATE_VCPU fails with EBUSY (set kernel.nmi_watchdog=0)", True,
         "x86.c kvm_arch_vcpu_precreate() -> perf_create_mediated_pmu() -EBUSY 'try disabling system wide "
         "perf events and nmi_watchdog'; kernel/watchdog_perf.c wd_hw_attr; kvm-unit-tests x86/unittests.cfg "
         "[pmu] check /proc/sys/kernel/nmi_watchdog=0"),
    Rule("vcpu_busy",
         "KVM_CREATE_VCPU with an in-kernel irqchip failed with EBUSY: a host perf event without "
         "exclude_guest exists (system-wide perf events or the NMI watchdog)", True,
         "x86.c kvm_arch_vcpu_precreate() -> perf_create_mediated_pmu() (tip eff95e170275)"),
    Rule("vcpu_failed", "KVM_CREATE_VCPU with an in-kernel irqchip failed: errno %d (%s)", True,
         "x86.c kvm_arch_vcpu_precreate(): perf's error fails vCPU creation"),
    # --- caveats: the vPMU works, but these checks cannot fail (finding 14) -------------------------
    Rule("ignore_msrs",
         "kvm.ignore_msrs=Y: KVM drops guest accesses to MSRs it does not handle instead of injecting "
         "#GP, so expected-#GP checks cannot fail", False,
         "x86.c kvm_do_msr_access() with ignore_msrs; kvm-unit-tests x86/unittests.cfg [pmu_lbr] "
         "check /sys/module/kvm/parameters/ignore_msrs=N"),
)

BY_ID: dict[str, Rule] = {r.id: r for r in RULES}


def text(rule_id: str, *args: object) -> str:
    """The rule's message, formatted exactly as the C side's snprintf does."""
    return BY_ID[rule_id].template % args if args else BY_ID[rule_id].template


def order(rule_id: str) -> int:
    return RULES.index(BY_ID[rule_id])


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def c_header() -> str:
    """``agent/native/include/verdict_rules.h``: one ``VR_<ID>`` template per rule, table order."""
    lines = [
        "/* SPDX-License-Identifier: GPL-2.0 */",
        "/* GENERATED by `python -m agent.facts.rules` from agent/facts/rules.py: do not edit.",
        " * The mediated-vPMU verdict's reasons, in the order both verdicts evaluate them. */",
        "#ifndef PMUFARM_VERDICT_RULES_H",
        "#define PMUFARM_VERDICT_RULES_H",
        "",
    ]
    from .tables import first_mediated_release

    lines.append("/* inventory/kvm.yaml: the first kernel release with a mediated vPMU */")
    lines.append(f"#define VR_FIRST_MEDIATED_RELEASE {_c_string(first_mediated_release())}")
    for r in RULES:
        lines.append(f"#define VR_{r.id.upper()} {_c_string(r.template)}")
        lines.append(f"#define VR_{r.id.upper()}_BLOCKS {int(r.blocks)}")
    lines += ["", "#endif", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(c_header())
