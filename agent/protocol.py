"""The harness protocol: one probe contract for every driver (kvm, model, guest).

A probe answers one JSON object: ``probe``, ``status`` (ok | unsupported | error), ``reason``,
``observations`` (raw facts, never verdicts) and ``elapsed_ns``. Exit status 0 / 4 / 1.
The catalogue below is the single list of probes, their parameters and observation keys;
``agent/native`` (C) and ``agent/drivers/model.py`` both answer exactly these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["ok", "unsupported", "error"]
EXIT_CODES: dict[str, int] = {"ok": 0, "unsupported": 4, "error": 1}
STATUS_BY_EXIT: dict[int, str] = {v: k for k, v in EXIT_CODES.items()}


@dataclass
class ProbeResult:
    probe: str
    status: Status
    reason: str = ""
    observations: dict[str, Any] = field(default_factory=dict)
    elapsed_ns: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProbeResult:
        data = json.loads(text)
        missing = {"probe", "status"} - data.keys()
        if missing:
            raise ValueError(f"probe output lacks {', '.join(sorted(missing))}")
        if data["status"] not in EXIT_CODES:
            raise ValueError(f"probe output has unknown status {data['status']!r}")
        return cls(
            probe=data["probe"],
            status=data["status"],
            reason=data.get("reason", ""),
            observations=data.get("observations") or {},
            elapsed_ns=int(data.get("elapsed_ns", 0)),
        )

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    needs_pmu: bool
    params: dict[str, Any]
    summary: str
    observations: str


# Errno values the suites compare against (Linux x86-64).
EINVAL, E2BIG, EBUSY, EOPNOTSUPP = 22, 7, 16, 95

# Observation shapes shared by several probes.
WORKLOAD = ('"workload": {"iterations": N, "instructions": I, "branches": B, "vm_exits": E, '
            '"global_ctrl_exits": 0|1, "loop": "plain"|"exit_each"|"clflush", "kvm_exits": n or null} -- '
            "instructions/branches retired by the measured guest code by construction; vm_exits = "
            "VM round trips inside the counting window: the forced exits plus global_ctrl_exits, which is 1 "
            "when kvm_path.global_ctrl is intercepted (the enabling WRMSR's VM-entry and the disabling "
            "WRMSR's VM-exit fall inside the window; finding 12); kvm_exits = KVM's own count of the vCPU's "
            "VM-exits (KVM_GET_STATS_FD \"exits\") over a batch holding only the measured loop -- in-kernel exits "
            "(host interrupts, NMIs, intercepted MSRs) included, plus that batch's closing PORT_DONE exit; null "
            "where not measured (guest_count and event_filter measure it) or KVM has no binary stats")
WORKLOAD_CLFLUSH = ("the clflush loop (pmu_counters_test.c GUEST_MEASURE_EVENT: flush the line each "
                    "iteration to force LLC references and misses) per iteration: CLFLUSH, MFENCE, MOV load, "
                    "DEC, JNZ = 5 instructions, 1 branch; same 5 extra instructions")

# Every PMU probe shapes its guest's PMU the way the KVM selftests do (pmu_counters_test.c
# pmu_vm_create_with_one_vcpu(): vcpu_set_cpuid_property() for the version and counter counts, a
# host-initiated vcpu_set_msr(PERF_CAPABILITIES) before the first KVM_RUN), instead of passing
# KVM_GET_SUPPORTED_CPUID through.  -1 = the default: KVM's supported value, except the Intel PMU
# version, which defaults to max(KVM's, what the probe needs) -- e.g. 4 for GLOBAL_STATUS_SET
# (KVM 7.0 reports v2, and kvm_pmu_is_valid_msr() takes STATUS_SET only for version > 3).
#   pmu_version      Intel CPUID.0AH:EAX[7:0]; AMD: 0 = no PMU (PerfCtrExtCore and PerfMonV2 clear),
#                    1 = PerfCtrExtCore (6 counters, no global control), 2 = PerfMonV2
#   gp_counters      CPUID.0AH:EAX[15:8] / AMD 0x80000022:EBX[3:0] (PerfMonV2 only); 0..N, so
#                    counters that exist in hardware can be hidden from the guest
#   gp_width         CPUID.0AH:EAX[23:16] (Intel; AMD is always 48)
#   fixed_counters   CPUID.0AH:EDX[4:0] (Intel)
#   fixed_bitmap     CPUID.0AH:ECX, the v5 supported-fixed-counter bitmap (Intel)
#   perf_capabilities  IA32_PERF_CAPABILITIES set by the host (KVM_SET_MSRS) before the first
#                    KVM_RUN (Intel; e.g. 0 or 0x2000 = FW_WRITES)
#   pdcm             CPUID.1:ECX[15] (Intel): 0 clears it, so the guest has no PERF_CAPABILITIES
#                    (vmx_pmu_caps_test.c perf_capabilities_unsupported); needs perf_capabilities <= 0
# A PMU-disabled VM (KVM_PMU_CAP_DISABLE) always gets CPUID with no PMU: KVM never edits CPUID
# (Documentation/virt/kvm/api.rst, KVM_CAP_PMU_CAPABILITY: "Usermode should adjust CPUID leaf 0xA").
# The Intel PMU version a probe's guest gets by default when KVM reports less (pmu_version=-1).
INTEL_VERSION_NEEDED: dict[str, int] = {"overflow_status": 4}

GUEST_PMU_PARAMS: dict[str, int] = {
    "pmu_version": -1, "gp_counters": -1, "gp_width": -1, "fixed_counters": -1, "fixed_bitmap": -1,
    "perf_capabilities": -1, "pdcm": -1,
}

# Observations every PMU probe adds (status ok or error) on top of its own:
GUEST_PMU_OBS = (
    '"guest_pmu": {"version": v, "gp_counters": n, "gp_width": w, "fixed_counters": m (highest '
    'supported index + 1), "fixed_bitmap": b (supported fixed counters), "fixed_width": w, '
    '"perf_capabilities": v or null (the value the host set, else KVM\'s default from its feature MSR; '
    'null on AMD), "perfctr_core": '
    'bool, "perfmon_v2": bool} -- the PMU the harness put in the guest CPUID, decoded like the host\'s; '
    '"kvm_path": {"global_ctrl": "intercepted"|"passthrough", "rdpmc": "intercepted"|"passthrough", '
    '"how": "derived", "inputs": {"guest_gp": n, "host_gp": n, "guest_fixed": m, "host_fixed": m, '
    '"guest_gp_width": w, "host_gp_width": w, "guest_fixed_width": w, "host_fixed_width": w, '
    '"guest_global_ctrl": bool, "vmware_backdoor": bool or null, "mediated": bool (the verdict)}} -- '
    'derived from KVM\'s rule '
    '(arch/x86/kvm/pmu.c kvm_need_any_pmc_intercept / kvm_need_perf_global_ctrl_intercept / '
    'kvm_need_rdpmc_intercept: the guest\'s GP and fixed counts differ from the host\'s, no '
    'global control, counter widths differ, or the VMware backdoor), not observed'
)

_ACCESS = ('{"op": "rdmsr"|"wrmsr"|"rdpmc", "target": MSR or RDPMC index, "name": str, "written": v or null, '
           '"vector": 13 or null, "value": v or null}')

PROBES: dict[str, ProbeSpec] = {p.name: p for p in [
    # --- isolation -------------------------------------------------------------------------------
    ProbeSpec("selftest", False, {"iterations": 1000},
              "guest loop of known length with one port-I/O VM-exit per iteration; no PMU needed",
              '"iterations": N, "vm_exits": exits seen by the host on the channel port, '
              '"guest_sum": checksum the guest reported, "expected_sum": sum(range(N)), "user_round_trip": true if '
              'the guest went to CPL3 and back (the privilege probe\'s user loop), '
              '"exceptions": [{"vector": v, "rip": x}]'),
    ProbeSpec("guest_count", True, {"iterations": 1000},
              "guest counts instructions (GP0) and branches (GP1) over a loop with a VM-exit per iteration",
              WORKLOAD + ', "counts": {"instructions": c, "branches": c}, "exceptions": [...]'),
    ProbeSpec("host_excludes_guest", True, {"iterations": 1000000},
              "host perf_event_open(exclude_guest=1) on the vCPU thread while the guest runs a small "
              "then a large compute loop with the same number of exits",
              '"perf_open_errno": 0, "exclude_kernel": bool, "runs": [{"guest_instructions": I, '
              '"host_count": c, "vm_exits": e}, {...large...}, {...small loop, 10x the exits...}] -- the third '
              "run gives the host event's own count per VM-exit: (run3 - run1) / (exits3 - exits1)"),
    ProbeSpec("exclusivity", True, {},
              "perf/KVM mutual exclusion: include-guest host events vs mediated VMs",
              '"event_without_exclude_guest_errno": errno opening a !exclude_guest event while a mediated '
              'VM lives (0 = opened), "event_with_exclude_guest_errno": same with exclude_guest=1, '
              '"vcpu_create_errno_while_event": errno of KVM_CREATE_VCPU while a !exclude_guest event exists'),
    ProbeSpec("fresh_state", True, {},
              "a VM dirties its PMU and is destroyed; a new VM reads every enumerated counter, selector "
              "and the global status",
              '"gp_counters": [v...], "gp_selectors": [v...], "fixed_counters": [v...] (Intel) or [], '
              '"fixed_ctrl": v or null, "global_status": v or null, "exceptions": [...]'),
    ProbeSpec("cross_context", True, {"rounds": 1000, "kind": "vm"},
              "two VMs (kind=vm) or two vCPUs of one VM (kind=vcpu) pinned to one CPU seed distinct "
              "counter values and are interleaved; each reads back its counters every round",
              '"kind": k, "rounds": N, "cpu": c, "contexts": [{"id": i, "seed": s, '
              '"values_read": [distinct values, sorted]}]'),
    ProbeSpec("unexposed", True, {},
              "MSRs and RDPMC indexes beyond the enumerated counters, and fast RDPMC",
              '"gp_counters": n, "fixed_counters": m, "accesses": [{"op": "rdmsr"|"wrmsr"|"rdpmc", '
              '"target": MSR or RDPMC index, "name": str, "vector": 13 or null, "value": v or null, '
              '"quirk": null or "p6_perfctr"}], "fast_rdpmc": {"vector": 13 or null} -- the RDPMC target is '
              "64, as in kvm-unit-tests x86/pmu.c, never index = #counters: on Zen RDPMC 6-9/10-15 are the "
              "data-fabric/L3 counters (arch/x86/events/amd/uncore.c RDPMC_BASE_NB/LLC; finding 6). Hidden "
              "counters that do exist in hardware: probe gp_counters with gp_counters=k"),
    ProbeSpec("pmu_disabled", True, {},
              "KVM_CAP_PMU_CAPABILITY(KVM_PMU_CAP_DISABLE) before vCPU creation, and again after",
              '"cap_disable_errno": e, "guest_pmu_version": v (guest CPUID), "guest_gp_counters": n, '
              '"counter_access_vector": 13 or null, "cap_after_vcpu_errno": e -- the harness gives this VM '
              "CPUID with no PMU itself (finding 3), so the CPUID rows check the VMM, the #GP row checks KVM"),
    ProbeSpec("hidden_counters", True, {},
              "every GP counter the vendor defines (Intel 8, AMD 6) is written (0xffff), read by RDMSR and RDPMC, "
              "and cleared, through the full-width alias when the guest has FW_WRITES (AMD: F15H); run with "
              "gp_counters=0..N so counters that exist in hardware are hidden: those must #GP and never show a "
              "host value (pmu_counters_test.c guest_rd_wr_counters, MSR_P6_PERFCTR0/1 excepted; finding 9)",
              '"gp_counters": n (guest), "possible": N, "base": "full_width"|"legacy", '
              '"global_ctrl_reset": v or null (first RDMSR of a fresh vCPU; null without global control), '
              '"counters": [{"index": i, "exposed": bool, "quirk": null or "p6_perfctr", '
              '"wrmsr": ' + _ACCESS + ', "rdmsr": {...}, "rdpmc": {...}, "selector_wrmsr": {...}, '
              '"clear": {...}}], "exceptions": [...]'),
    ProbeSpec("pmu_enum", True, {},
              "the guest reads its own CPUID PMU leaves and IA32_PERF_CAPABILITIES; the host reads the vCPU's "
              "PERF_CAPABILITIES (KVM_GET_MSRS) and tries to change it after KVM_RUN (vmx_pmu_caps_test.c: "
              "immutable once the vCPU ran); the PMU version matrix is this probe run with pmu_version=0..5",
              '"cpuid": {"0xa": [eax, ebx, ecx, edx] or null, "0x1": [...], "0x80000001": [...] or null, '
              '"0x80000022": [...] or null}, "decoded": {same keys as guest_pmu, from the guest\'s own CPUID}, '
              '"perf_capabilities": {"guest_rdmsr": ' + _ACCESS + ' or null (AMD), "host_before_run": v or '
              'null, "host_set_after_run_errno": e or null, "host_after_run": v or null, "without_pdcm": null (the '
              'guest has PDCM, or AMD) or {"host_read": v, "host_set_zero_errno": e, "host_set_bits_accepted": '
              'mask of the single-bit values KVM_SET_MSRS took before KVM_RUN}}, "exceptions": [...]'),
    ProbeSpec("guards", True, {},
              "mediated-vPMU guards that must #GP: AnyThread (EVTSEL bit 21, FIXED_CTR_CTRL bit 2), PEBS, DS "
              "and LBR MSRs (no PEBS/LBR under the mediated PMU: vmx_get_perf_capabilities), a guest WRMSR of "
              "IA32_PERF_CAPABILITIES (vmx_pmu_caps_test.c: always #GP), the AMD LBRv2 MSR",
              '"accesses": [' + _ACCESS + ' + "case": "anythread_evtsel"|"anythread_fixed_ctrl"|"pebs_enable"|'
              '"ds_area"|"lbr_select"|"lbr_tos"|"lbr_from0"|"arch_lbr_ctl"|"perf_capabilities_write"|'
              '"amd_lbr_select"], "exceptions": [...]'),
    # --- counters --------------------------------------------------------------------------------
    ProbeSpec("arch_events", True, {"iterations": 1000},
              "every architectural event on every GP counter, and every fixed counter, over the exit-free "
              "loop; llc_references, llc_misses and topdown_be_bound over the clflush loop where the guest "
              "has CLFLUSH (finding 5)",
              WORKLOAD + ', "workload_clflush": {same keys} or null -- ' + WORKLOAD_CLFLUSH +
              ', "gp": [{"counter": i, "event": name, "loop": "plain"|"clflush", "count": c, "kvm_exits": n or '
              'null (KVM\'s exit count over the batch holding only this loop, its PORT_DONE included)}], '
              '"fixed": [{"counter": j, "event": name, "loop": "plain", "count": c, "kvm_exits": n or null}], '
              '"unavailable_enumerated": null (AMD) or [{"ebx_length": L, "ebx_mask": m, "host_events_mask": m, '
              '"gp": [same entries, GP 0 only, every event the host has]}] -- one VM per CPUID.0AH (EAX[31:24] '
              'length, EBX unavailable mask): (0, 0), (N, all N bits), (N, alternate bits), (N+1, bit 1), N = '
              'the vendor table\'s architectural events; KVM must not refuse events the enumeration calls '
              'unavailable (pmu_counters_test.c test_intel_counters / test_arch_events)'),
    ProbeSpec("disabled_counter", True, {"iterations": 1000},
              "counters programmed with the enable bit clear do not move over the loop",
              '"gp": [{"counter": i, "before": v, "after": v}], "fixed": [{"counter": j, "before": v, '
              '"after": v}]'),
    ProbeSpec("counter_width", True, {},
              "legacy 32-bit alias writes, full-width writes up to the width, a write beyond it",
              '"gp_width": w, "legacy_write": {"written": v, "read": v, "vector": null} or null, '
              '"full_width": [{"written": v, "read": v, "vector": null}], '
              '"beyond_width": {"written": v, "vector": 13 or null, "read": v or null}'),
    ProbeSpec("global_ctrl", True, {},
              "GLOBAL_CTRL (PerfCntrGlobalCtl) after reset, and a written value across a VM-exit",
              '"gp_counters": n, "fixed_counters": m, "reset_value": v, "written": v, "after_exit": v'),
    ProbeSpec("overflow_status", True, {},
              "a counter preset near overflow sets its status bit; clear and set via OVF_CTRL/StatusClr/"
              "StatusSet",
              '"counter": 0, "after_overflow": v, "after_clear": v, "after_set": v, "set_mask": v'),
    ProbeSpec("rdpmc", True, {},
              "a value written to each counter (disabled) reads back via RDMSR and RDPMC",
              '"counters": [{"kind": "gp"|"fixed", "index": i, "written": v, "rdmsr": v, "rdpmc": v}]'),
    ProbeSpec("fixed_counters", True, {"iterations": 1000},
              "Intel: every fixed counter the architecture defines (0..3) with fixed_counters=j, fixed_bitmap=k, "
              "pmu_version=v: supported ones (i < j or bit i of k with v >= 5) are written/read/RDPMC'd and "
              "count their event over the loop; unsupported ones #GP on the counter, on their FIXED_CTR_CTRL "
              "field and on their GLOBAL_CTRL bit (pmu_counters_test.c guest_test_fixed_counters)",
              '"fixed_counters": j, "fixed_bitmap": k, "version": v, "counters": [{"index": i, "supported": bool '
              '(as enumerated), "wrmsr": ' + _ACCESS + ', "rdmsr": {...}, "rdpmc": {...}, "ctrl_wrmsr": {...}, '
              '"global_ctrl_wrmsr": {...}, "count": c or null (supported only)}], ' + WORKLOAD +
              ', "exceptions": [...]'),
    ProbeSpec("counter_freeze", True, {"iterations": 1000},
              "each GP counter (instructions) and fixed counter counts the loop, then the loop runs again with "
              "GLOBAL_CTRL clear, then again with GLOBAL_CTRL set but the counter's own enable clear: the value "
              "must not move (pmu_counters_test.c __guest_test_arch_event: count frozen after disable)",
              WORKLOAD + ', "counters": [{"kind": "gp"|"fixed", "index": i, "counted": c, '
              '"after_global_off": c, "after_local_off": c}], "exceptions": [...]'),
    ProbeSpec("all_counters", True, {"iterations": 1000},
              "every GP counter and every fixed counter count at once over one loop (kvm-unit-tests x86/pmu.c "
              "check_counters_many): GP i counts instructions (even i) or branches (odd i), fixed j its event",
              WORKLOAD + ', "gp": [{"counter": i, "event": name, "count": c}], "fixed": [{"counter": j, '
              '"event": name, "count": c}], "exceptions": [...]'),
    ProbeSpec("cmask", True, {"iterations": 1000},
              "GP counter 0 counts instructions over the loop with CMASK 0 and with CMASK 2 (kvm-unit-tests "
              "x86/pmu.c check_cmask: the CMASK count is below the plain one)",
              WORKLOAD + ', "cmask": 2, "count_plain": c, "count_cmask": c, "exceptions": [...]'),
    ProbeSpec("running_write", True, {"iterations": 1000},
              "WRMSR to a running counter (kvm-unit-tests x86/pmu.c check_running_counter_wrmsr): counter 0 "
              "counts instructions, the guest writes 0 to it after the loop while it runs; then the guest "
              "writes -1 (all width bits) to the running counter and runs the loop, which wraps it",
              WORKLOAD + ', "after_write_zero": c (only what retired after the write), "from_minus_one": '
              '{"written": v, "count": c (after the wrap), "global_status": v or null}, "exceptions": [...]'),
    ProbeSpec("privilege", True, {"iterations": 1000},
              "GP counter 0 counts instructions with USR only, OS only, and both (EVTSEL bits 16/17) over the CPL0 "
              "loop (USR-only must not count it) and over a CPL3 loop (OS-only must not count it)",
              WORKLOAD + ', "cpl": 0, "counts": {"usr": c, "os": c, "both": c}, "user_loop": {"iterations": [N, 2N], '
              '"insns_per_iter": 2, "counts": {"usr": [c, c], "os": [c, c], "both": [c, c]}} -- the same filters over '
              "a CPL3 loop of N and 2N x {DEC, JNZ} (IRETQ in, a #UD out, both inside the window): USR's difference "
              'is 2N, OS\'s 0, "host_guest_only": null (Intel, or < 4 GP counters) or {"guest_svm": bool, "pmcs": '
              '["none", "guest_only", "host_only", "both"], "steps": [{"step": "svme0"|"svme1"|"deny"|"allow"|'
              '"both_minus_host_only"|"both_restored"|"svme0_again", "efer_svme": 0|1, "efer_vector": 13 or null, '
              '"filter": null|"deny"|"allow", "counts": [c, c, c, c]}]} -- AMD EVTSEL bits 40/41 on GP 0-3 '
              "(svm_pmu_host_guest_test.c without its L2 steps: SVME=0 only \"none\" counts, SVME=1 all but "
              'guest_only), "exceptions": [...]'),
    ProbeSpec("umask_pair", True, {"iterations": 1000},
              "Intel: events that share an event select and differ in unit mask (cycles 0x3c/0x00 vs "
              "ref_cycles 0x3c/0x01, llc_references 0x2e/0x4f vs llc_misses 0x2e/0x41) count side by side on "
              "GP 0/1, then again with the filter denying the second of each pair (the filter key includes "
              "the umask); unsupported on AMD (no such pair among the events KVM's tests use)",
              WORKLOAD + ', "pairs": [{"select": s, "first": {"event": name, "umask": u, "count": c, '
              '"count_second_denied": c}, "second": {"event": name, "umask": u, "count": c, '
              '"count_second_denied": c}, "set_errno": e}], "exceptions": [...]'),
    ProbeSpec("legacy_k7", True, {"iterations": 1000},
              "AMD legacy K7 MSRs (PERFEVTSEL0-3 0xc0010000-3, PERFCTR0-3 0xc0010004-7; kvm-unit-tests x86/pmu.c "
              "AMD legacy path): a value written through K7 reads back through K7, RDPMC and the F15H alias, and "
              "a K7-programmed counter counts instructions over the loop; unsupported on Intel",
              WORKLOAD + ', "counters": [{"index": i, "written": v, "k7_wrmsr": ' + _ACCESS + ', "k7_rdmsr": {...}, '
              '"f15h_rdmsr": '
              '{...}, "rdpmc": {...}, "k7_sel_wrmsr": {...}, "f15h_sel_read": v or null, "count": c or null}], '
              '"exceptions": [...]'),
    # --- filter ----------------------------------------------------------------------------------
    ProbeSpec("event_filter", True, {"case": "none", "iterations": 1000},
              "KVM_SET_PMU_EVENT_FILTER variants; the guest counts instructions and branches on GP "
              "counters and instructions on fixed counter 0 (Intel). cases: none, allow_member, "
              "allow_nonmember, deny_member, deny_nonmember, masked_include, masked_exclude, "
              "fixed_allow, fixed_deny, fixed_priority, deny_high_select (AMD: denying 0x1C2 -- select "
              "bits 35:32 = 1 -- must not deny 0xC2 branches; pmu_event_filter_test.c test_amd_deny_list)",
              '"case": c, "set_errno": e, "filter": {...as set...}, ' + WORKLOAD +
              ', "counts": {"instructions": c, "branches": c, "fixed_instructions": c or null}'),
    ProbeSpec("filter_update", True, {"iterations": 1000},
              "the guest counts branches; the host denies the event while the guest runs, then allows",
              '"selector_written": v, "selector_read_after_deny": v, "count_before_deny": c, '
              '"count_after_deny": c, "count_after_allow": c (each a delta over one loop)'),
    ProbeSpec("masked_events", True, {"density": "sparse", "iterations": 1000},
              "the 7 upstream masked-event cases (pmu_event_filter_test.c test_cases: loads, stores, "
              "loads+stores via Intel MEM_INST_RETIRED 0xd0 umask 0x81/0x82/0x83 or AMD LS_DISPATCH 0x29 umask "
              "bit 0/1/2 on GP 0-2 over a load/store/read-modify-write loop), with the case's entries alone "
              "(density=sparse) or after 290 dummy entries (density=dense, add_dummy_events: 300 - MAX_TEST_EVENTS)",
              '"density": d, "nevents_dummy": n, "cases": [{"case": i (0..6, upstream order), "set_errno": e, '
              '"events": [entries], "counts": {"loads": c, "stores": c, "loads_stores": c}}], "exceptions": [...]'),
    ProbeSpec("filter_fixed_bitmap", True, {"iterations": 1000},
              "Intel: for every fixed counter i and every bitmap b < 2^fixed, allow and deny with "
              "fixed_counter_bitmap=b, alone and together with the GP events[] list: FC i counts iff the "
              "filter allows bit i (pmu_event_filter_test.c __test_fixed_counter_bitmap)",
              '"fixed_counters": m, "no_filter": [c per counter], "results": [{"counter": i, "bitmap": b, '
              '"action": "allow"|"deny", "with_events": bool, "set_errno": e, "count": c}], "exceptions": [...]'),
    ProbeSpec("filter_invalid", True, {},
              "invalid KVM_SET_PMU_EVENT_FILTER inputs",
              '"cases": [{"case": "bad_action"|"bad_flags"|"too_many_events"|"masked_bad_entry"|'
              '"junk_bits_unmasked"|"masked_valid"|"fixed_bitmap_nonexistent", "errno": e}] -- the last three '
              "must be accepted (pmu_event_filter_test.c test_filter_ioctl: ~0 with flags=0, a masked entry "
              "with every field at its maximum, a fixed_counter_bitmap naming counters that do not exist)"),
    # --- pmi -------------------------------------------------------------------------------------
    ProbeSpec("pmi", True, {"lvtpc": "unmasked"},
              "GP counter 0 counting branches (a JNZ per iteration, never emulated by KVM, so the overflow "
              "is a hardware one; finding 7) preset 64 from overflow with the INT bit; LVTPC unmasked or masked",
              '"lvtpc": "unmasked"|"masked", "event": "branches", "vector": v, "interrupts": n (guest handler '
              'hits), "global_status": v, "host_vpmi_before": n or null, "host_vpmi_after": n or null, '
              '"host_nmi_delta": n or null (all CPUs), "cpu": c (the probe pins itself), "host_nmi_delta_cpu": n '
              'or null (that CPU only: other CPUs may take exclude_guest sampling NMIs; finding 15)'),
    ProbeSpec("overflow_all", True, {},
              "overflow and PMI on every GP and fixed counter in turn (kvm-unit-tests x86/pmu.c "
              "check_counter_overflow): branches preset 64 from overflow, with and without the INT bit; after "
              "each PMI the guest reads LVTPC (Intel sets its mask bit on delivery) and unmasks it again",
              '"event": "branches", "vector": v, "counters": [{"kind": "gp"|"fixed", "index": i, "event": name (GP: '
              'branches; fixed j: its own event), "int": bool, '
              '"count": c (after the wrap), "global_status": v or null, "interrupts": n, "lvtpc_after": v or '
              'null}], "exceptions": [...]'),
]}

# Every PMU probe takes the guest-PMU shaping parameters after its own.
PROBES = {name: spec if not spec.needs_pmu else
          ProbeSpec(spec.name, True, {**spec.params, **GUEST_PMU_PARAMS}, spec.summary,
                    spec.observations + ", " + GUEST_PMU_OBS)
          for name, spec in PROBES.items()}

SUITE_PROBES: dict[str, list[str]] = {
    "isolation": ["selftest", "guest_count", "host_excludes_guest", "exclusivity", "fresh_state",
                  "cross_context", "unexposed", "pmu_disabled", "hidden_counters", "pmu_enum", "guards"],
    "counters": ["arch_events", "disabled_counter", "counter_width", "global_ctrl", "overflow_status",
                 "rdpmc", "fixed_counters", "counter_freeze", "all_counters", "cmask", "running_write",
                 "privilege", "umask_pair", "legacy_k7"],
    "filter": ["event_filter", "filter_update", "filter_invalid", "masked_events", "filter_fixed_bitmap"],
    "pmi": ["pmi", "overflow_all"],
}


COUNT_DEFAULTS = {"iterations": 1_000_000, "runs": 5}
SAMPLE_DEFAULTS = {"iterations": 50_000_000, "period": 1_000_000}

_GUEST = ('"accel": "kvm"|"tcg", "accel_reason": str, "boot_s": s, "guest_kernel": release, '
          '"guest_hypervisor_id": "KVMKVMKVM"|"TCGTCGTCGTCG"')
_EVENT = ('{"errno": 0, "error": null, "baseline": [c per run, loop(0)], "counts": [c per run, loop(N)], '
          '"multiplexed": false}')

GUEST_PROBES: dict[str, ProbeSpec] = {p.name: p for p in [
    ProbeSpec("guest_boot", False, {},
              "a Linux guest boots (QEMU, KVM or TCG), runs the static perfload workload and returns its JSON "
              "on the serial console; a software event (task-clock) opens in the guest; no PMU needed",
              _GUEST + ', "workload_rc": 0, "guest_task_clock": {"errno": e, "count": ns or null}, '
                       '"guest_hw_events": {"instructions": errno, "branches": errno, "cycles": errno}'),
    ProbeSpec("guest_perf_count", True, dict(COUNT_DEFAULTS),
              "user-only (exclude_kernel) counting of instructions, branches and cycles over a loop of "
              "3 instructions and 1 branch per iteration, in the guest and on the host (same binary); each run "
              "measures loop(0) (baseline) and loop(N)",
              _GUEST + ', "iterations": N, "runs": R, "loop": {"instructions": 3N, "branches": N}, '
                       '"guest": {"instructions": EV, "branches": EV, "cycles": EV}, "host": {same}, '
                       '"guest_exclude_guest": 0, "host_exclude_guest": 1 -- EV = ' + _EVENT),
    ProbeSpec("guest_perf_sample", True, dict(SAMPLE_DEFAULTS),
              "instructions sampled with sample_period=period over the loop (N iterations), overflow signals "
              "(SIGIO) and PERF_RECORD_SAMPLE records counted, in the guest and on the host",
              _GUEST + ', "iterations": N, "period": P, "loop_instructions": 3N, "guest": {"samples": s, '
                       '"signals": g, "lost": l, "throttle": t, "count": total instructions counted, '
                       '"multiplexed": bool, "errno": 0}, "host": {same}'),
    ProbeSpec("guest_perf_enum", True, {},
              "the guest's own CPUID PMU enumeration, its perf PMU in sysfs, and the largest group of GP-only "
              "events (branches) its perf can schedule, with the host's facts for KVM's supported PMU",
              _GUEST + ', "guest_cpuid": {"vendor_id", "leaf_0xa": {...}, "perfctr_core", "perfmon_v2", '
                       '"amd_core_counters", "gp_counters": n, "gp_counters_source": str}, "guest_sysfs_pmu": '
                       '{"cpu_present": bool, "type": n, "caps": {...}}, "guest_max_group": k, '
                       '"group_stop": {"stopped_by": str, "errno": e}, "guest_nmi_watchdog": 0, '
                       '"guest_kernel_pmu_log": [lines], "host_kvm_supported_pmu": {...facts...}'),
    ProbeSpec("guest_perf_tool", False, {"iterations": 10_000_000},
              "Debian's perf itself in the guest (the host's linux-perf and its libraries in the initramfs): "
              "perf stat -e instructions:u,branches:u and perf record (instructions:u and cpu-clock:u) over "
              "perfload --mode spin (loop(N)), and the same perf stat on the host",
              _GUEST + ', "perf_version": str, "loop": {"instructions": 3N, "branches": N}, "guest_stat": '
                       '{"instructions:u": STAT, "branches:u": STAT}, "host_stat": {same}, "record_hw": REC, '
                       '"record_sw": REC + {"top_symbol": str, "top_percent": p} -- STAT = {"count": c or null, '
                       '"text": "<not supported>"...}, REC = {"rc": n, "samples": s or null, "output": perf text}'),
    ProbeSpec("guest_perf_test", False, {},
              "`perf test` (the built-in tests of the host's perf) inside the guest, each test's verdict; "
              "`perf test -v N` output for each failed one",
              _GUEST + ', "perf_version": str, "rc": n, "timed_out": bool, "tests": {"4.1": {"name": str, '
                       '"result": "Ok"|"Skip"|"FAILED!", "reason": str, "verbose": str}}'),
    ProbeSpec("host_include_guest", True, {},
              "the host opens a user-only instructions event WITHOUT exclude_guest (and with it) before a KVM "
              "guest starts, while it runs, and after it is gone",
              '"accel": "kvm", "before_vm": {"without_exclude_guest_errno": e, "with_exclude_guest_errno": e}, '
              '"while_vm": {same}, "after_vm": {same}, "guest_booted": true'),
]}

# Guest-perf probes need a real Linux guest; only the guest driver answers them, so they stay a
# catalogue of their own rather than entries every driver must serve.
GUEST_SUITE_PROBES: dict[str, list[str]] = {
    "guest_perf": ["guest_boot", "guest_perf_count", "guest_perf_sample", "guest_perf_enum", "guest_perf_tool",
                   "guest_perf_test", "host_include_guest"],
}


def parse_params(spec: ProbeSpec, pairs: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Merge ``k=v`` arguments (or a dict) over the probe's defaults, typed like the defaults."""
    params = dict(spec.params)
    items = pairs.items() if isinstance(pairs, dict) else (p.split("=", 1) for p in pairs)
    for item in items:
        if len(item) != 2:
            raise ValueError(f"probe {spec.name}: argument {item[0]!r} is not k=v")
        key, value = item
        if key not in params:
            raise ValueError(f"probe {spec.name}: unknown parameter {key!r} (known: {', '.join(params) or 'none'})")
        default = spec.params[key]
        if isinstance(default, int) and not isinstance(value, int):
            try:
                value = int(str(value), 0)
            except ValueError:
                raise ValueError(f"probe {spec.name}: parameter {key}={value!r} is not an integer") from None
        params[key] = value
    return params
