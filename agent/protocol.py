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
WORKLOAD = ('"workload": {"iterations": N, "instructions": I, "branches": B, "vm_exits": E} -- '
            "instructions/branches retired by the measured guest code by construction; vm_exits = "
            "forced exits inside the counting window")

PROBES: dict[str, ProbeSpec] = {p.name: p for p in [
    # --- isolation -------------------------------------------------------------------------------
    ProbeSpec("selftest", False, {"iterations": 1000},
              "guest loop of known length with one port-I/O VM-exit per iteration; no PMU needed",
              '"iterations": N, "vm_exits": exits seen by the host on the channel port, '
              '"guest_sum": checksum the guest reported, "expected_sum": sum(range(N)), '
              '"exceptions": [{"vector": v, "rip": x}]'),
    ProbeSpec("guest_count", True, {"iterations": 1000},
              "guest counts instructions (GP0) and branches (GP1) over a loop with a VM-exit per iteration",
              WORKLOAD + ', "counts": {"instructions": c, "branches": c}, "exceptions": [...]'),
    ProbeSpec("host_excludes_guest", True, {"iterations": 1000000},
              "host perf_event_open(exclude_guest=1) on the vCPU thread while the guest runs a small "
              "then a large compute loop with the same number of exits",
              '"perf_open_errno": 0, "runs": [{"guest_instructions": I, "host_count": c, "vm_exits": e}, '
              "{...large...}]"),
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
              '"quirk": null or "p6_perfctr"}], "fast_rdpmc": {"vector": 13 or null}'),
    ProbeSpec("pmu_disabled", True, {},
              "KVM_CAP_PMU_CAPABILITY(KVM_PMU_CAP_DISABLE) before vCPU creation, and again after",
              '"cap_disable_errno": e, "guest_pmu_version": v (guest CPUID), "guest_gp_counters": n, '
              '"counter_access_vector": 13 or null, "cap_after_vcpu_errno": e'),
    # --- counters --------------------------------------------------------------------------------
    ProbeSpec("arch_events", True, {"iterations": 1000},
              "every architectural event on every GP counter, and every fixed counter, over the loop",
              WORKLOAD + ', "gp": [{"counter": i, "event": name, "count": c}], '
              '"fixed": [{"counter": j, "event": name, "count": c}]'),
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
    # --- filter ----------------------------------------------------------------------------------
    ProbeSpec("event_filter", True, {"case": "none", "iterations": 1000},
              "KVM_SET_PMU_EVENT_FILTER variants; the guest counts instructions and branches on GP "
              "counters and instructions on fixed counter 0 (Intel). cases: none, allow_member, "
              "allow_nonmember, deny_member, deny_nonmember, masked_include, masked_exclude, "
              "fixed_allow, fixed_deny, fixed_priority",
              '"case": c, "set_errno": e, "filter": {...as set...}, ' + WORKLOAD +
              ', "counts": {"instructions": c, "branches": c, "fixed_instructions": c or null}'),
    ProbeSpec("filter_update", True, {"iterations": 1000},
              "the guest counts branches; the host denies the event while the guest runs, then allows",
              '"selector_written": v, "selector_read_after_deny": v, "count_before_deny": c, '
              '"count_after_deny": c, "count_after_allow": c (each a delta over one loop)'),
    ProbeSpec("filter_invalid", True, {},
              "invalid KVM_SET_PMU_EVENT_FILTER inputs",
              '"cases": [{"case": "bad_action"|"bad_flags"|"too_many_events"|"masked_bad_entry", '
              '"errno": e}]'),
    # --- pmi -------------------------------------------------------------------------------------
    ProbeSpec("pmi", True, {"lvtpc": "unmasked"},
              "a counter preset near overflow with the INT bit; LVTPC unmasked or masked",
              '"lvtpc": "unmasked"|"masked", "vector": v, "interrupts": n (guest handler hits), '
              '"global_status": v, "host_vpmi_before": n or null, "host_vpmi_after": n or null, '
              '"host_nmi_delta": n or null'),
]}

SUITE_PROBES: dict[str, list[str]] = {
    "isolation": ["selftest", "guest_count", "host_excludes_guest", "exclusivity", "fresh_state",
                  "cross_context", "unexposed", "pmu_disabled"],
    "counters": ["arch_events", "disabled_counter", "counter_width", "global_ctrl", "overflow_status",
                 "rdpmc"],
    "filter": ["event_filter", "filter_update", "filter_invalid"],
    "pmi": ["pmi"],
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
    ProbeSpec("host_include_guest", True, {},
              "the host opens a user-only instructions event WITHOUT exclude_guest (and with it) before a KVM "
              "guest starts, while it runs, and after it is gone",
              '"accel": "kvm", "before_vm": {"without_exclude_guest_errno": e, "with_exclude_guest_errno": e}, '
              '"while_vm": {same}, "after_vm": {same}, "guest_booted": true'),
]}

# Guest-perf probes need a real Linux guest; only the guest driver answers them, so they stay a
# catalogue of their own rather than entries every driver must serve.
GUEST_SUITE_PROBES: dict[str, list[str]] = {
    "guest_perf": ["guest_boot", "guest_perf_count", "guest_perf_sample", "guest_perf_enum", "host_include_guest"],
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
