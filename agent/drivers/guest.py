"""The ``guest`` driver: real ``perf`` inside a real Linux guest, against the same workload on the host.

Where the ``kvm`` driver checks the mediated vPMU's architecture with minimal VMs, this driver checks
what the mediated vPMU exists for: ``perf`` inside a VM as accurate as on bare metal. It boots a
Linux guest (``agent/guestimage.py``: busybox initramfs + the static ``perfload`` workload, QEMU with
KVM where it can run a Linux guest, TCG otherwise), runs ``perfload`` in it, and runs the same binary
on the host as the bare-metal reference. Observations are the raw numbers of both; judging them is
``suites/guest_perf``'s job.

Probe catalogue: ``GUEST_PROBES`` in agent/protocol.py (answered by this driver only):

* ``guest_boot``         the guest boots and runs the workload; a software event works (no PMU needed)
* ``guest_perf_count``   user-only instructions/branches/cycles over a loop of known length, guest and host
* ``guest_perf_sample``  instructions sampled every ``period`` over the loop, guest and host
* ``guest_perf_enum``    the guest's CPUID PMU enumeration vs how many counters its perf can use
* ``host_include_guest`` the host opens instructions without exclude_guest before, while and after
  a KVM guest lives

Status rules: ``error`` when the guest does not boot, times out or prints no result (the reason
carries the console tail), or perfload does not build/run; ``unsupported`` when an event cannot be
opened for lack of a PMU (ENOENT, EOPNOTSUPP, ENODEV), with a reason naming the errno and the facts
behind it (TCG emulates no PMU; host CPUID 0xA version; kvm.enable_pmu), or when a prerequisite is
missing on this host (no guest kernel, no QEMU, no static busybox, no compiler: the reason names
it); ``ok`` otherwise.
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
import subprocess
import sys
import time
from typing import Any

from agent import guestimage
from agent.protocol import COUNT_DEFAULTS, GUEST_PROBES, SAMPLE_DEFAULTS, ProbeResult, parse_params

NO_PMU_ERRNOS = {errno_mod.ENOENT, errno_mod.EOPNOTSUPP, errno_mod.ENODEV}


PERF_EVENTS = ("instructions:u", "branches:u")
_SAMPLES_RE = re.compile(r"\((\d+) samples\)")
# "  4.1: Read samples using the mmap interface     : Ok"; a name may hold ':' (16: syscalls:...), a
# verdict (Ok, Skip (why), FAILED!) never does, and a long name has no padding before its ':'
_PERF_TEST_RE = re.compile(r"^\s*(\d+(?:[.:]\d+)?): (.*?\S)\s*:\s*(Ok|FAILED!|Skip(?: \(.*\))?|[^:]*?)\s*$")


def parse_perf_stat(text: str) -> dict[str, dict[str, Any]]:
    """``perf stat -x ,`` lines -> {event: {"count": int or None, "text": the count field}}."""
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        f = line.split(",")
        if len(f) >= 3 and f[2] in PERF_EVENTS:
            out[f[2]] = {"count": int(f[0]) if f[0].isdigit() else None, "text": f[0]}
    return out


def parse_perf_record(section: dict[str, Any] | None) -> dict[str, Any]:
    if not section:
        return {"rc": None, "samples": None, "output": "(not run: the guest never reached it)"}
    m = _SAMPLES_RE.search(section["output"])
    return {"rc": section["rc"], "samples": int(m.group(1)) if m else None,
            "output": "\n".join(ln for ln in section["output"].splitlines() if not ln.startswith("{"))[-1500:]}


def parse_perf_test(text: str) -> dict[str, dict[str, str]]:
    """``perf test`` lines -> {"4.1": {"name", "result", "reason"}}; parents of subtests (no verdict) left out."""
    tests: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        m = _PERF_TEST_RE.match(line)
        if not m or not m.group(3):
            continue
        verdict = m.group(3)
        result, _, reason = verdict.partition(" (")
        tests[m.group(1).replace(":", ".")] = {"name": m.group(2), "result": result.strip(),
                                               "reason": reason.rstrip(")").strip()}
    return tests


def perf_test_selection() -> list[str]:
    """``PMUFARM_PERF_TESTS`` (e.g. ``2,5,7``): only these top-level ``perf test`` numbers; unset = all."""
    raw = os.environ.get("PMUFARM_PERF_TESTS", "").replace(" ", ",")
    nums = [n for n in raw.split(",") if n]
    bad = [n for n in nums if not n.isdigit()]
    if bad:
        raise ValueError(f"PMUFARM_PERF_TESTS: {bad[0]!r} is not a perf test number")
    return nums


def perf_test_list(perf: str | None = None) -> list[tuple[str, str]]:
    """``(id, name)`` of every leaf ``perf test`` case of the host's perf (``perf test list``; the
    guest runs the same binary), restricted to :func:`perf_test_selection`."""
    binary = perf or str(guestimage.find_perf())
    r = subprocess.run([binary, "test", "list"], capture_output=True, text=True, timeout=60, check=False)
    entries = []
    for line in (r.stdout + r.stderr).splitlines():
        m = re.match(r"^\s*(\d+(?:[.:]\d+)?): (.*\S)\s*$", line)
        if m:
            entries.append((m.group(1).replace(":", "."), m.group(2)))
    parents = {tid.split(".")[0] for tid, _ in entries if "." in tid}
    only = set(perf_test_selection())
    return [(tid, name) for tid, name in entries
            if tid not in parents and (not only or tid.split(".")[0] in only)]


def _ename(e: int | None) -> str:
    if e is None:
        return "?"
    return errno_mod.errorcode.get(e, str(e)) if e else "OK"


class GuestDriver:
    """``make_driver`` builds it for a host entry with ``driver: guest``; suites/guest_perf builds it directly."""

    name = "guest"
    simulated = False

    def __init__(self, facts: dict[str, Any], kernel: str | None = None, accel: str | None = None,
                 timeout: float | None = None):
        self.facts = facts or {}
        self.kernel = kernel or os.environ.get("PMUFARM_GUEST_KERNEL") or None
        self.accel = accel or os.environ.get("PMUFARM_GUEST_ACCEL") or "auto"
        self.timeout = float(timeout or os.environ.get("PMUFARM_GUEST_TIMEOUT") or 120)
        self._guest_cache: dict[tuple, guestimage.GuestRun] = {}
        self._host_cache: dict[tuple, dict[str, Any]] = {}

    def list(self) -> list[str]:
        return list(GUEST_PROBES)

    # ----------------------------------------------------------------------------------------------
    def run(self, probe: str, **params: Any) -> ProbeResult:
        start = time.monotonic_ns()
        spec = GUEST_PROBES.get(probe)
        if spec is None:
            return ProbeResult(probe, "error", f"guest driver: unknown probe {probe!r} (known: "
                               f"{', '.join(GUEST_PROBES)})", {}, 0)
        try:
            merged = parse_params(spec, params)
            status, reason, obs = getattr(self, f"_probe_{probe}")(**merged)
        except guestimage.GuestImageError as exc:
            # a missing prerequisite (kernel, QEMU, busybox, compiler) is a fact of this host: unsupported;
            # anything else (perfload does not build, exits non-zero) is an error
            status = "unsupported" if exc.missing else "error"
            status, reason, obs = status, f"guest image: {exc}", {"missing": exc.missing}
        except ValueError as exc:
            status, reason, obs = "error", str(exc), {}
        return ProbeResult(probe, status, reason, obs, time.monotonic_ns() - start)

    # ----------------------------------------------------------------------------------------------
    # Runs (cached: count, sample and enum share one boot at default parameters)

    @staticmethod
    def _perf_args(count: dict[str, int], sample: dict[str, int], exclude_guest: int) -> list[str]:
        """perfload arguments. The host reference counts with exclude_guest=1 (perf's default for a
        host event; it never trips the mediated exclusivity rule). The guest counts with
        exclude_guest=0: a guest has no guests of its own to exclude, and on AMD exclude_guest would
        set the HostOnly bit in the guest's own event selector, whose meaning inside a guest is KVM's
        HO/GO emulation (vpmu.md §1.1, "Disable counters based on Host-Only/Guest-Only bits in SVM"),
        not what these probes measure."""
        return ["--mode", "count,sample,enum", "--iterations", str(count["iterations"]), "--runs",
                str(count["runs"]), "--sample-iterations", str(sample["iterations"]), "--period",
                str(sample["period"]), "--exclude-guest", str(exclude_guest)]

    def _guest(self, count: dict[str, int] | None = None, sample: dict[str, int] | None = None
               ) -> guestimage.GuestRun:
        args = self._perf_args(count or COUNT_DEFAULTS, sample or SAMPLE_DEFAULTS, exclude_guest=0)
        key = tuple(args)
        if key not in self._guest_cache:
            self._guest_cache[key] = guestimage.run_guest(kernel=self.kernel, accel=self.accel, args=args,
                                                          timeout=self.timeout)
        return self._guest_cache[key]

    def _perf_guest(self, iterations: int) -> guestimage.GuestRun:
        """One boot of the perf image serves perf stat, perf record and perf test (cached)."""
        key = ("perf", iterations)
        if key not in self._guest_cache:
            limit = int(os.environ.get("PMUFARM_PERF_TEST_TIMEOUT") or 600)
            only = perf_test_selection()
            self._guest_cache[key] = guestimage.run_guest(
                kernel=self.kernel, initrd=guestimage.build_initramfs(with_perf=True), accel=self.accel,
                timeout=max(self.timeout, limit + 120), memory_mb=512,
                extra_cmdline=f"pmufarm_iterations={iterations} pmufarm_perf_test_timeout={limit}"
                              + (f" pmufarm_perf_tests={'+'.join(only)}" if only else ""))
        return self._guest_cache[key]

    def _host(self, count: dict[str, int] | None = None, sample: dict[str, int] | None = None) -> dict[str, Any]:
        args = self._perf_args(count or COUNT_DEFAULTS, sample or SAMPLE_DEFAULTS, exclude_guest=1)
        key = tuple(args)
        if key not in self._host_cache:
            self._host_cache[key] = guestimage.run_host(args, timeout=self.timeout)
        return self._host_cache[key]

    # ----------------------------------------------------------------------------------------------
    # Reasons

    def _host_pmu_text(self) -> str:
        pmu, kvm = self.facts.get("pmu") or {}, self.facts.get("kvm") or {}
        cpu = self.facts.get("cpu") or {}
        bits = []
        if cpu.get("vendor") == "amd":
            bits.append(f"host CPUID PerfMonV2={int(bool(pmu.get('perfmon_v2')))} "
                        f"PerfCtrExtCore={int(bool(pmu.get('perfctr_core')))}")
        if pmu.get("version") is not None:
            bits.append(f"host CPUID 0xA version {pmu.get('version')}")
        ep = kvm.get("enable_pmu")
        if ep is not None:
            bits.append(f"kvm.enable_pmu={'Y' if ep else 'N'}")
        return ", ".join(bits)

    def _guest_context(self, run: guestimage.GuestRun) -> str:
        enum = (run.result or {}).get("enum") or {}
        bits = []
        if run.accel == "tcg":
            bits.append("guest ran under QEMU TCG, which emulates no PMU"
                        + (f" [{run.accel_reason}]" if run.accel_reason else ""))
        else:
            bits.append("guest ran under KVM")
        log = [line.split("] ", 1)[-1] for line in enum.get("kernel_pmu_log") or []]
        if log:
            bits.append(f"guest kernel: {log[0]!r}")
        host = self._host_pmu_text()
        if host:
            bits.append(host)
        return "; ".join(bits)

    def _boot_error(self, run: guestimage.GuestRun) -> tuple[str, str, dict[str, Any]]:
        tail = run.console_tail(15)
        reason = (f"guest ({run.accel}) {run.error}; console tail:\n{tail}" if tail
                  else f"guest ({run.accel}) {run.error}; console empty")
        return "error", reason, {**self._run_obs(run), "console_tail": tail, "timed_out": run.timed_out,
                                 "qemu_rc": run.qemu_rc}

    @staticmethod
    def _run_obs(run: guestimage.GuestRun) -> dict[str, Any]:
        res = run.result or {}
        cpuid = (res.get("enum") or {}).get("cpuid") or {}
        return {"accel": run.accel, "accel_reason": run.accel_reason, "boot_s": run.boot_s,
                "total_s": round(run.total_s, 3), "guest_kernel": res.get("kernel_release"),
                "guest_hypervisor_id": cpuid.get("hypervisor_id"), "kernel_image": run.kernel}

    def _unavailable(self, where: str, what: str, ev: dict[str, Any], run: guestimage.GuestRun | None
                     ) -> tuple[str, str]:
        """(status, reason) for an event that did not open/read."""
        e = ev.get("errno")
        op = ev.get("op") or "perf_event_open"
        call = f"{where} {op}({what}): {_ename(e)}"
        if e in NO_PMU_ERRNOS and op == "perf_event_open":
            if where == "guest":
                return "unsupported", f"{call} — no PMU in the guest ({self._guest_context(run)})"
            return "unsupported", f"{call} — no PMU on the host ({self._host_pmu_text() or 'facts unknown'})"
        return "error", f"{call} (errno {e})"

    # ----------------------------------------------------------------------------------------------
    # Probes

    def _probe_guest_boot(self) -> tuple[str, str, dict[str, Any]]:
        run = self._guest()
        if run.error:
            return self._boot_error(run)
        count = run.result.get("count") or {}
        events = count.get("events") or {}
        sw = count.get("software") or {}
        obs = {**self._run_obs(run), "workload_rc": run.workload_rc,
               "guest_task_clock": {"errno": sw.get("errno"), "count": sw.get("count")},
               "guest_hw_events": {k: v.get("errno") for k, v in events.items()}}
        return "ok", "", obs

    def _probe_guest_perf_count(self, iterations: int, runs: int) -> tuple[str, str, dict[str, Any]]:
        cnt = {"iterations": iterations, "runs": runs}
        run = self._guest(count=cnt)
        if run.error:
            return self._boot_error(run)
        guest = (run.result.get("count") or {}).get("events") or {}
        obs = {**self._run_obs(run), "iterations": iterations, "runs": runs,
               "loop": (run.result.get("count") or {}).get("loop"), "guest": guest,
               "guest_exclude_guest": run.result.get("exclude_guest")}
        for ev in ("instructions", "branches"):
            info = guest.get(ev) or {"errno": None, "op": "missing"}
            if info.get("errno"):
                status, reason = self._unavailable("guest", ev, info, run)
                return status, reason, obs
        host_res = self._host(count=cnt)
        host = (host_res.get("count") or {}).get("events") or {}
        obs.update(host=host, host_exclude_guest=host_res.get("exclude_guest"))
        for ev in ("instructions", "branches"):
            info = host.get(ev) or {"errno": None, "op": "missing"}
            if info.get("errno"):
                status, reason = self._unavailable("host", ev, info, None)
                return status, reason, obs
        return "ok", "", obs

    def _probe_guest_perf_sample(self, iterations: int, period: int) -> tuple[str, str, dict[str, Any]]:
        smp = {"iterations": iterations, "period": period}
        run = self._guest(sample=smp)
        if run.error:
            return self._boot_error(run)
        guest = run.result.get("sample") or {}
        obs = {**self._run_obs(run), "iterations": iterations, "period": period,
               "loop_instructions": guest.get("loop_instructions"), "guest": guest}
        if guest.get("errno"):
            status, reason = self._unavailable("guest", "instructions, sample_period", guest, run)
            return status, reason, obs
        host = self._host(sample=smp).get("sample") or {}
        obs["host"] = host
        if host.get("errno"):
            status, reason = self._unavailable("host", "instructions, sample_period", host, None)
            return status, reason, obs
        return "ok", "", obs

    def _probe_guest_perf_enum(self) -> tuple[str, str, dict[str, Any]]:
        run = self._guest()
        if run.error:
            return self._boot_error(run)
        enum = run.result.get("enum") or {}
        cpuid = enum.get("cpuid") or {}
        group = enum.get("group") or {}
        obs = {**self._run_obs(run), "guest_cpuid": cpuid, "guest_sysfs_pmu": enum.get("sysfs_pmu"),
               "guest_max_group": group.get("max_group"),
               "group_stop": {"stopped_by": group.get("stopped_by"), "errno": group.get("stop_errno")},
               "guest_nmi_watchdog": run.result.get("nmi_watchdog"),
               "guest_kernel_pmu_log": enum.get("kernel_pmu_log"),
               "host_kvm_supported_pmu": (self.facts.get("kvm") or {}).get("supported_pmu")}
        leaf = cpuid.get("leaf_0xa") or {}
        enumerated = bool(leaf.get("version")) or bool(cpuid.get("perfmon_v2")) or bool(cpuid.get("perfctr_core"))
        if not enumerated and not group.get("max_group"):
            # nothing to compare: the guest CPU enumerates no PMU and its perf has none
            src = cpuid.get("gp_counters_source")
            what = ("guest CPUID enumerates no PMU (leaf 0xA version 0"
                    + (", no PerfCtrExtCore/PerfMonV2: AMD legacy counters only implied" if src ==
                       "amd_legacy_implied" else "") + ")")
            return ("unsupported", f"{what} and guest perf_event_open(branches): "
                    f"{_ename(group.get('stop_errno'))} — no PMU in the guest ({self._guest_context(run)})", obs)
        return "ok", "", obs

    def _probe_guest_perf_tool(self, iterations: int) -> tuple[str, str, dict[str, Any]]:
        run = self._perf_guest(iterations)
        if run.error and not run.sections:
            return self._boot_error(run)
        sec = run.sections
        obs: dict[str, Any] = {**self._run_obs(run), "iterations": iterations,
                               "perf_version": (sec.get("version") or {}).get("output", "").strip(),
                               "loop": {"instructions": 3 * iterations, "branches": iterations},
                               "guest_stat": parse_perf_stat((sec.get("stat") or {}).get("output", "")),
                               "guest_stat_rc": (sec.get("stat") or {}).get("rc"),
                               "record_hw": parse_perf_record(sec.get("record_hw")),
                               "record_sw": parse_perf_record(sec.get("record_sw"))}
        top = next((ln.split() for ln in (sec.get("report_sw") or {}).get("output", "").splitlines()
                    if ln.strip().split(" ")[0].endswith("%")), None)  # "  97.30%  [.] loop"
        if top:
            obs["record_sw"].update(top_percent=float(top[0].rstrip("%")), top_symbol=top[-1])
        obs["host_stat"] = self._host_perf_stat(iterations)
        missing = [n for n in ("version", "stat", "record_hw", "record_sw", "report_sw")
                   if (sec.get(n) or {}).get("rc") is None]
        if missing:  # a later crash (say in perf test) does not void what these commands printed
            return "error", f"guest ({run.accel}) did not finish {', '.join(missing)}: {run.error}", obs
        return "ok", "", obs

    def _host_perf_stat(self, iterations: int) -> dict[str, Any]:
        """The same ``perf stat`` on the host, over the same static workload."""
        try:
            perf = guestimage.find_perf()
        except guestimage.GuestImageError as exc:
            return {"error": str(exc)}
        cmd = [str(perf), "stat", "-x", ",", "-e", ",".join(PERF_EVENTS), "--", str(guestimage.build_perfload()),
               "--where", "host", "--mode", "spin", "--iterations", str(iterations)]
        # the guest's init runs perfload with a near-empty environment; libc's start-up walks the
        # environment, so the host run gets a small one too (the counts include start-up)
        env = {"PATH": "/bin:/usr/bin", "HOME": "/tmp", "TERM": "linux"}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env)
        return {**parse_perf_stat(r.stderr), "rc": r.returncode,
                "output": "\n".join(ln for ln in r.stderr.splitlines() if ln.strip())[-600:]}

    def _probe_guest_perf_test(self) -> tuple[str, str, dict[str, Any]]:
        run = self._perf_guest(guestimage.PERF_ITERATIONS)
        sec = run.sections.get("test")
        if sec is None:
            return self._boot_error(run) if run.error else ("error", "the guest printed no perf test section", {})
        tests = parse_perf_test(sec["output"])
        for name, verbose in run.sections.items():
            if name.startswith("test_verbose "):
                num = name.split()[1]
                for tid, t in tests.items():
                    if tid == num or tid.startswith(num + "."):
                        t["verbose"] = verbose["output"][-3000:]
        obs = {**self._run_obs(run), "perf_version": (run.sections.get("version") or {}).get("output", "").strip(),
               "rc": sec["rc"], "timed_out": sec["rc"] == 124 or sec["rc"] is None, "tests": tests}
        if not tests:
            return "error", f"perf test printed no verdicts (rc {sec['rc']}): {sec['output'][-400:]}", obs
        return "ok", "", obs

    def _probe_host_include_guest(self) -> tuple[str, str, dict[str, Any]]:
        kernel = guestimage.find_kernel(self.kernel)
        initrd = guestimage.build_initramfs()
        accel, why = (self.accel, "requested") if self.accel != "auto" else guestimage.choose_accel(kernel, initrd)
        obs: dict[str, Any] = {"accel": accel, "accel_reason": why}
        if accel != "kvm":
            return ("unsupported", f"the guest runs under QEMU TCG ({why}): no KVM VM exists, so there is no "
                    "mediated vPMU to refuse host events without exclude_guest", obs)

        def probe_host() -> dict[str, Any]:
            res = guestimage.run_host(["--mode", "include_guest"], timeout=30).get("include_guest") or {}
            return {f"{k}_errno": (res.get(k) or {}).get("errno")
                    for k in ("without_exclude_guest", "with_exclude_guest")}

        obs["before_vm"] = probe_host()
        if obs["before_vm"]["with_exclude_guest_errno"] in NO_PMU_ERRNOS:
            e = obs["before_vm"]["with_exclude_guest_errno"]
            return ("unsupported", f"host perf_event_open(instructions, exclude_guest=1): {_ename(e)} — no PMU "
                    f"on the host ({self._host_pmu_text() or 'facts unknown'})", obs)
        run = guestimage.run_guest(kernel=kernel, initrd=initrd, accel="kvm", args=["--mode", "enum"],
                                   timeout=self.timeout, while_running=lambda _run: probe_host())
        obs.update(self._run_obs(run), guest_booted=run.ready)
        obs["while_vm"] = run.hook_result
        obs["after_vm"] = probe_host()
        if run.hook_result is None:
            return self._boot_error(run) if run.error else ("error", "guest never asked to be released", obs)
        if run.error:
            status, reason, extra = self._boot_error(run)
            return status, reason, {**obs, **extra}
        return "ok", "", obs


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.drivers.guest [list | run PROBE k=v...]``: one JSON object, exit 0/4/1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "list":
        for spec in GUEST_PROBES.values():
            print(f"{spec.name:20} {'pmu ' if spec.needs_pmu else 'none'} {spec.summary}")
        return 0
    if argv[0] != "run" or len(argv) < 2:
        print("usage: python -m agent.drivers.guest [list | run PROBE k=v...]", file=sys.stderr)
        return 2
    from agent.facts import collect_facts

    params = dict(a.split("=", 1) if "=" in a else (a, "") for a in argv[2:])
    result = GuestDriver(collect_facts()).run(argv[1], **params)
    print(result.to_json())
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
