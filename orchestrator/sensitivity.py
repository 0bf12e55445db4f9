"""Fault-injection sensitivity of the suites: does every known class of KVM bug turn some test red?

For each simulated host of ``inventory/sim.yaml`` (``driver: model``) the selected suites run once
healthy (the baseline: any failure there is a false failure) and once per fault of
``inventory/faults.yaml`` injected as ``model.faults=[id]``. Each run is ``python -m pytest`` in a
subprocess with ``--pmufarm-host``/``--pmufarm-results`` (the same path as a farm job), a few in
parallel. A fault only changes the probes it lists, so a fault run executes only the selected suites
that use one of those probes (``agent.protocol.SUITE_PROBES``), and of those only the test files that
call one (``probe("name", ...)``), and only on hosts whose baseline ran
PMU tests (hosts without a mediated vPMU answer every PMU probe ``unsupported``).

``run_sensitivity`` returns the table; ``render_table`` prints it; ``exit_code`` is 0 when every
exercised fault is caught by at least one test and the baseline has no failures, 1 otherwise, 3 when
only infrastructure (pytest not running) went wrong.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from agent.protocol import SUITE_PROBES

REPO = Path(__file__).resolve().parents[1]
SIM_FILE = REPO / "inventory" / "sim.yaml"
FAULTS_FILE = REPO / "inventory" / "faults.yaml"
CAUGHT = ("failed", "error")
PYTEST_OK = (0, 1, 5)   # passed / tests failed / no tests collected; anything else: pytest itself broke


def _load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_sim_hosts(path: Path = SIM_FILE) -> list[dict[str, Any]]:
    data = _load_yaml(path) or {}
    hosts = data.get("hosts", []) if isinstance(data, dict) else data
    return [h for h in hosts if h.get("driver") == "model"]


def load_faults(path: Path = FAULTS_FILE) -> list[dict[str, Any]]:
    return list(_load_yaml(path) or [])


def _suite_name(suite: str) -> str:
    return Path(suite.rstrip("/")).name


def _suite_path(suite: str) -> Path:
    p = Path(suite)
    if p.exists():
        return p.resolve()
    return REPO / "suites" / _suite_name(suite)


_PROBE_CALL = re.compile(r"""\bprobe\(\s*["'](\w+)["']""")


def _files_using(suite_dir: Path, probes: set[str]) -> list[Path]:
    """The suite's test files that call one of ``probes`` (``probe("name", ...)``): a fault changes
    only its probes' observations, so no other file can see it. A file calling ``probe`` with a
    name that is not a literal counts as using every probe."""
    out = []
    for f in sorted(suite_dir.glob("test_*.py")):
        text = f.read_text(encoding="utf-8")
        named = set(_PROBE_CALL.findall(text))
        dynamic = text.count("probe(") > len(_PROBE_CALL.findall(text))
        if named & probes or dynamic:
            out.append(f)
    return out


def _short(nodeid: str) -> str:
    return nodeid[len("suites/"):] if nodeid.startswith("suites/") else nodeid


def _run_pytest(job: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    tag = job["tag"]
    host_file, results_file = workdir / f"{tag}.host.json", workdir / f"{tag}.results.json"
    host_file.write_text(json.dumps({"host": job["host"]}))
    results_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *map(str, job["paths"]), "-p", "no:cacheprovider", "-q",
           "--no-header", "--pmufarm-host", str(host_file), "--pmufarm-results", str(results_file)]
    # Only pmufarm's plugin (loaded by suites/conftest.py) is needed; third-party plugins such as
    # hypothesis cost ~0.5 s of imports per run, more than the suites themselves.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("PMUFARM_HOST_FILE", None)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = None, f"timeout after {timeout}s: {exc}"
    tests: list[dict[str, Any]] = []
    if results_file.exists():
        tests = json.loads(results_file.read_text()).get("tests", [])
    infra = None
    if rc not in PYTEST_OK or (rc != 5 and not tests):
        infra = f"pytest exit {rc}: " + "\n".join(out.strip().splitlines()[-5:])
    return {**job, "exit_code": rc, "tests": tests, "infra_error": infra,
            "seconds": round(time.monotonic() - start, 2)}


def _column(host: dict[str, Any], hosts: list[dict[str, Any]]) -> str:
    uarch = (host.get("model") or {}).get("uarch", "?")
    same = [h for h in hosts if (h.get("model") or {}).get("uarch") == uarch]
    return uarch if len(same) == 1 else f"{uarch}@{host.get('name')}"


def run_sensitivity(suites: list[str], uarchs: list[str] | None, faults: list[str] | None, workdir: Path,
                    *, jobs: int | None = None, sim_file: Path = SIM_FILE, faults_file: Path = FAULTS_FILE,
                    timeout: float = 300.0) -> dict[str, Any]:
    """Baseline + one run per fault per simulated host; see the module docstring."""
    started = time.monotonic()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    suites = suites or list(SUITE_PROBES)
    names = [_suite_name(s) for s in suites]
    unknown = [n for n in names if n not in SUITE_PROBES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown} (known: {', '.join(SUITE_PROBES)})")
    paths = {n: _suite_path(s) for n, s in zip(names, suites, strict=True)}

    hosts = load_sim_hosts(sim_file)
    if uarchs:
        known = sorted({(h.get("model") or {}).get("uarch") for h in hosts})
        missing = [u for u in uarchs if u not in known]
        if missing:
            raise ValueError(f"uarch(s) {missing} not in {sim_file.name} (known: {', '.join(known)})")
        hosts = [h for h in hosts if (h.get("model") or {}).get("uarch") in uarchs]
    catalogue = load_faults(faults_file)
    if faults:
        ids = [f["id"] for f in catalogue]
        missing = [f for f in faults if f not in ids]
        if missing:
            raise ValueError(f"fault(s) {missing} not in {faults_file.name} (known: {', '.join(ids)})")
        catalogue = [f for f in catalogue if f["id"] in faults]
    columns = {h["name"]: _column(h, hosts) for h in hosts}
    jobs = jobs or min(4, os.cpu_count() or 2)

    def host_with(h: dict[str, Any], fault: str | None) -> dict[str, Any]:
        entry = json.loads(json.dumps(h))
        entry.setdefault("model", {})["faults"] = [fault] if fault else []
        return entry

    # 1. baselines (all selected suites), 2. fault runs where they can show anything.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        base_jobs = [{"tag": f"{h['name']}.baseline", "host_name": h["name"], "fault": None,
                      "suites": names, "paths": [paths[n] for n in names], "host": host_with(h, None)}
                     for h in hosts]
        baseline_runs = list(pool.map(lambda j: _run_pytest(j, workdir, timeout), base_jobs))
        by_host = {r["host_name"]: r for r in baseline_runs}
        pmu_hosts = [h for h in hosts
                     if any(t["outcome"] != "skipped" and "selftest" not in t["nodeid"]
                            for t in by_host[h["name"]]["tests"])]
        fault_jobs = []
        exercised: dict[str, list[str]] = {}
        for f in catalogue:
            fsuites = [n for n in names if set(SUITE_PROBES[n]) & set(f.get("probes") or [])]
            exercised[f["id"]] = fsuites
            fprobes = set(f.get("probes") or [])
            fpaths = [p for n in fsuites for p in (_files_using(paths[n], fprobes) if paths[n].is_dir()
                                                   else [paths[n]])]
            for h in pmu_hosts if fsuites else []:
                fault_jobs.append({"tag": f"{h['name']}.{f['id']}", "host_name": h["name"], "fault": f["id"],
                                   "suites": fsuites, "paths": fpaths, "host": host_with(h, f["id"])})
        fault_runs = list(pool.map(lambda j: _run_pytest(j, workdir, timeout), fault_jobs))

    baseline: dict[str, Any] = {}
    for r in baseline_runs:
        counts: dict[str, int] = {}
        for t in r["tests"]:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        baseline[columns[r["host_name"]]] = {
            "host": r["host_name"], "exit_code": r["exit_code"], "counts": counts, "infra_error": r["infra_error"],
            "false_failures": [{"test": _short(t["nodeid"]), "outcome": t["outcome"], "message": t["message"]}
                               for t in r["tests"] if t["outcome"] in CAUGHT + ("xpassed",)],
            "xfailed": sorted({f"{_short(t['nodeid'])} ({t['erratum']})" for t in r["tests"]
                               if t["outcome"] == "xfailed"}),
        }
    base_bad = {r["host_name"]: {t["nodeid"] for t in r["tests"] if t["outcome"] in CAUGHT} for r in baseline_runs}

    result_faults: dict[str, Any] = {}
    for f in catalogue:
        fid = f["id"]
        per: dict[str, Any] = {}
        for r in (r for r in fault_runs if r["fault"] == fid):
            caught = sorted(_short(t["nodeid"]) for t in r["tests"]
                            if t["outcome"] in CAUGHT and t["nodeid"] not in base_bad[r["host_name"]])
            per[columns[r["host_name"]]] = {"host": r["host_name"], "caught": caught,
                                            "exit_code": r["exit_code"], "infra_error": r["infra_error"]}
        status = "not_exercised" if not exercised[fid] or not per else (
            "caught" if any(v["caught"] for v in per.values()) else "missed")
        result_faults[fid] = {"description": f.get("description", ""), "probes": list(f.get("probes") or []),
                              "suites": exercised[fid], "status": status, "by_uarch": per,
                              "tests": sorted({t for v in per.values() for t in v["caught"]})}

    infra = [f"{r['tag']}: {r['infra_error']}" for r in baseline_runs + fault_runs if r["infra_error"]]
    ran = {_short(t["nodeid"]) for r in baseline_runs for t in r["tests"] if t["outcome"] in ("passed", "xfailed")}
    reached = {t for f in result_faults.values() for t in f["tests"]}
    return {
        "suites": names,
        "columns": list(columns.values()),
        "hosts": [{"name": h["name"], "uarch": (h.get("model") or {}).get("uarch"), "column": columns[h["name"]],
                   "pmu_tests": h in pmu_hosts} for h in hosts],
        "baseline": baseline,
        "faults": result_faults,
        "infra_errors": infra,
        # informational: tests that ran but that no injected fault turned red (rules the catalogue
        # does not bend; tests/test_suites_model.py mutates observations to show they can fail)
        "tests_no_fault_reaches": sorted(ran - reached),
        "runs": len(baseline_runs) + len(fault_runs),
        "jobs": jobs,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return out


def render_table(result: dict[str, Any]) -> str:
    """Markdown: fault x uarch (number of catching tests), the catching tests, the baseline."""
    cols = result["columns"]
    lines = [f"# Sensitivity: {len(result['faults'])} faults x {len(cols)} simulated hosts, suites "
             f"{', '.join(result['suites'])}: {result['runs']} pytest runs in {result['elapsed_s']} s", ""]
    rows = [["fault", "status", *cols]]
    for fid, f in result["faults"].items():
        cells = []
        for c in cols:
            v = f["by_uarch"].get(c)
            cells.append("-" if v is None else ("ERR" if v["infra_error"] else str(len(v["caught"]))))
        rows.append([fid, f["status"].upper() if f["status"] == "missed" else f["status"], *cells])
    rows.append(["(baseline false failures)", "", *[
        "ERR" if result["baseline"][c]["infra_error"] else str(len(result["baseline"][c]["false_failures"]))
        for c in cols]])
    lines += _grid(rows)
    lines += ["", "Cells: tests that failed/errored under the fault (and not in the baseline); "
              "'-' = not run (suite not selected, or host without a mediated vPMU).", "", "## Catching tests"]
    for fid, f in result["faults"].items():
        lines.append(f"- **{fid}** ({f['status']}; probes {', '.join(f['probes'])}):")
        for t in f["tests"][:12]:
            where = [c for c in cols if t in (f["by_uarch"].get(c) or {}).get("caught", [])]
            lines.append(f"  - {t} [{len(where)}/{len(f['by_uarch'])} hosts]")
        if len(f["tests"]) > 12:
            lines.append(f"  - ... {len(f['tests']) - 12} more")
        if not f["tests"]:
            lines.append("  - none")
    lines += ["", "## Baseline (no fault)"]
    for c in cols:
        b = result["baseline"][c]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(b["counts"].items()))
        lines.append(f"- {c} ({b['host']}): {counts or 'no tests'}"
                     + (f"; xfailed: {', '.join(sorted({x.split(' (')[1][:-1] for x in b['xfailed']}))}"
                        if b["xfailed"] else ""))
        for ff in b["false_failures"]:
            lines.append(f"  - FALSE FAILURE {ff['outcome']}: {ff['test']}: {ff['message']}")
        if b["infra_error"]:
            lines.append(f"  - INFRA: {b['infra_error']}")
    for e in result["infra_errors"]:
        lines.append(f"- INFRA: {e}")
    quiet = result.get("tests_no_fault_reaches") or []
    if quiet:
        lines += ["", f"## Tests no injected fault reaches ({len(quiet)}; informational)",
                  ", ".join(t.split("::", 1)[-1] for t in quiet)]
    missed = [fid for fid, f in result["faults"].items() if f["status"] == "missed"]
    false = sum(len(b["false_failures"]) for b in result["baseline"].values())
    lines += ["", f"Verdict: {len(missed)} fault(s) missed{': ' + ', '.join(missed) if missed else ''}; "
                  f"{false} baseline false failure(s); {len(result['infra_errors'])} infrastructure error(s)."]
    return "\n".join(lines)


def exit_code(result: dict[str, Any]) -> int:
    """1 if a fault is caught by no test or a test fails with no fault; 3 if only infra broke; else 0."""
    missed = any(f["status"] == "missed" for f in result["faults"].values())
    false = any(b["false_failures"] for b in result["baseline"].values())
    if missed or false:
        return 1
    if result["infra_errors"]:
        return 3
    return 0
