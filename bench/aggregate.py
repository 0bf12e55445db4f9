"""Benchmark: aggregate N hosts x M tests into every report (orchestrator.reports.write_reports).

    python bench/aggregate.py            # 1000 hosts x 100 tests = 100k results, 5 runs
    python bench/aggregate.py --quick    # 100 hosts x 100 tests, 3 runs
    python bench/aggregate.py --hosts 500 --tests 200 --runs 7
    python bench/aggregate.py --kcidb-all   # every result also into kcidb.json (worst case)

Prints one JSON object (median, min, max, per-run seconds, result count, per-output split of the
last run) and one text line. Target: 100k results into all outputs in <= 3 s.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

UARCHES = [  # (vendor, uarch, name, family, model, errata)
    ("intel", "sapphirerapids", "Sapphire Rapids", 6, 0x8F, ["SPR4"]),
    ("intel", "emeraldrapids", "Emerald Rapids", 6, 0xCF, []),
    ("intel", "graniterapids", "Granite Rapids", 6, 0xAD, []),
    ("intel", "sierraforest", "Sierra Forest", 6, 0xAF, ["SRF7"]),
    ("intel", "icelake", "Ice Lake-SP", 6, 0x6A, []),
    ("intel", "alderlake", "Alder Lake", 6, 0x97, ["ADL1"]),
    ("amd", "zen3", "Zen 3", 0x19, 0x01, []),
    ("amd", "zen4", "Zen 4", 0x19, 0x11, ["ZEN4-1"]),
    ("amd", "zen5", "Zen 5", 0x1A, 0x02, []),
    ("amd", "zen2", "Zen 2", 0x17, 0x31, ["1215"]),
]
SUITES = ["isolation", "counting", "sampling", "msr"]


def make_facts(i: int, simulated: bool) -> dict:
    vendor, uarch, name, fam, model, errata = UARCHES[i % len(UARCHES)]
    return {
        "schema": 1, "simulated": simulated,
        "cpu": {"vendor": vendor, "vendor_id": "GenuineIntel" if vendor == "intel" else "AuthenticAMD",
                "family": fam, "model": model, "stepping": 1 + i % 3, "microcode": "0x2b000603",
                "model_name": name, "uarch": uarch, "uarch_name": name, "hybrid": False, "hypervisor": False},
        "pmu": {"version": 5 if vendor == "intel" else 2, "gp_counters": 8, "gp_width": 48,
                "fixed_counters": 4, "fixed_width": 48},
        "kvm": {"present": True, "module": f"kvm_{vendor}", "enable_pmu": True, "enable_mediated_pmu": True},
        "kernel": {"release": "simulated" if simulated else "7.0.0", "cmdline": "", "nmi_watchdog": 0,
                   "perf_event_paranoid": 2},
        "mediated_pmu": {"status": "available", "reasons": []},
        "errata": [{"id": e, "symptoms": ["insn_overcount_on_vm_transition"]} for e in errata],
    }


def make_jobs(n_hosts: int, n_tests: int, run_id: str = "20261125-120000-bench", seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    per_suite = max(1, n_tests // len(SUITES))
    for h in range(n_hosts):
        host = f"host{h:04d}"
        facts = make_facts(h, simulated=h % 4 != 0)
        for s_i, suite in enumerate(SUITES):
            count = per_suite if s_i < len(SUITES) - 1 else n_tests - per_suite * (len(SUITES) - 1)
            if h % 97 == 5 and s_i == 0:
                jobs.append({"run_id": run_id, "host": host, "suite": suite, "attempt": 2,
                             "status": "infra_error", "exit_code": 255, "facts": {}, "tests": [],
                             "started": "2026-11-25T12:00:00+00:00", "finished": "2026-11-25T12:00:05+00:00",
                             "log_tail": "ssh: connect to host port 22: Connection refused"})
                continue
            tests = []
            for t in range(count):
                r = rng.random()
                nodeid = f"suites/{suite}/test_{suite}_{t % 5}.py::test_case_{t}[param-{t % 3}]"
                if r < 0.80:
                    outcome, msg, err = "passed", "", None
                elif r < 0.88:
                    outcome, msg, err = "skipped", "requires perfmon_v2=True: host has perfmon_v2=False", None
                elif r < 0.93 and facts["errata"]:
                    err = facts["errata"][0]["id"]
                    outcome, msg = "xfailed", f"{err}: instructions 1000003 != 1000000 (3 transitions)"
                elif r < 0.995:
                    outcome, msg, err = "passed", "", None
                elif r < 0.998:
                    outcome, msg, err = "failed", "AssertionError: counter leaked: 12 != 0\nassert 12 == 0", None
                else:
                    outcome, msg, err = "error", "fixture 'probe' raised ProbeError: ioctl EINVAL", None
                tests.append({"nodeid": nodeid, "suite": suite, "name": nodeid.split("::")[-1],
                              "classname": f"suites.{suite}.test_{suite}_{t % 5}", "outcome": outcome,
                              "duration": round(rng.random() * 0.05, 4), "message": msg, "erratum": err})
            status = "failed" if any(t["outcome"] in ("failed", "error") for t in tests) else "passed"
            jobs.append({"run_id": run_id, "host": host, "suite": suite, "attempt": 1, "status": status,
                         "exit_code": 1 if status == "failed" else 0, "facts": facts, "tests": tests,
                         "started": "2026-11-25T12:00:00+00:00", "finished": "2026-11-25T12:01:00+00:00",
                         "log_tail": ""})
    return jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--tests", type=int, default=100, help="tests per host (over all suites)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="100 hosts, 3 runs")
    ap.add_argument("--kcidb-all", action="store_true",
                    help="worst case: put the simulated hosts' results into kcidb.json too "
                         "(by default only real hosts, a quarter of the generated ones, go there)")
    args = ap.parse_args(argv)
    if args.quick:
        args.hosts, args.runs = 100, 3

    from orchestrator.reports import write_reports

    run = {"id": "20261125-120000-bench", "created": "2026-11-25T12:00:00+00:00", "suites": SUITES,
           "kernel": {"tree": "kvm-next", "commit": "a" * 40, "patchset_hash": None}, "origin": "pmufarm"}
    jobs = make_jobs(args.hosts, args.tests)
    n_results = sum(len(j["tests"]) for j in jobs)
    times = []
    with tempfile.TemporaryDirectory(prefix="pmufarm-bench-") as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"r{i}"
            t0 = time.perf_counter()
            written = write_reports(run, jobs, out, kcidb_include_simulated=args.kcidb_all)
            times.append(time.perf_counter() - t0)
        sizes = {k: p.stat().st_size for k, p in written.items() if not k.startswith("junit/")}
        sizes["junit/*"] = sum(p.stat().st_size for k, p in written.items() if k.startswith("junit/"))
    result = {
        "hosts": args.hosts, "tests_per_host": args.tests, "results": n_results, "jobs": len(jobs),
        "kcidb_all": args.kcidb_all,
        "runs": args.runs, "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
        "max_s": round(max(times), 3), "stdev_s": round(statistics.pstdev(times), 3),
        "times_s": [round(t, 3) for t in times], "files": len(written),
        "junit_files": sum(1 for k in written if k.startswith("junit/")), "bytes": sizes,
        "target_s": 3.0,
    }
    print(json.dumps(result))
    print(f"write_reports: {n_results} results from {len(jobs)} jobs -> {len(written)} files in "
          f"median {result['median_s']:.3f} s (min {result['min_s']:.3f}, max {result['max_s']:.3f}, "
          f"{args.runs} runs{', kcidb incl. simulated' if args.kcidb_all else ''}; target <= 3 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
