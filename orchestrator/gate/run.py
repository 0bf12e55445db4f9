"""The gate pipeline: intake -> apply -> build -> baseline (reuse or run) -> candidate -> re-runs -> verdict
-> on a regression of a multi-patch series, bisection to the first bad patch (``bisect.py``).

Order matters for CI cost: the series is applied and the candidate built *before* any farm time is
spent, so a series that does not apply or build fails in seconds. Every path, including errors,
writes ``gate.md`` and ``gate.json`` to the output directory.
"""

from __future__ import annotations

import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.gate.apply import Worktrees, apply_series, check_tree, resolve_base, tree_identity
from orchestrator.gate.baseline import build_digest, find_baselines, host_class, job_class, suites_digest
from orchestrator.gate.bisect import bisect
from orchestrator.gate.build import DEFAULT_BUILD_CMD, SIM_FILE, run_build
from orchestrator.gate.common import EXIT_INCONCLUSIVE, EXIT_INPUT, GateError
from orchestrator.gate.provision import Provisioned, SshOptions, provision
from orchestrator.gate.series import intake
from orchestrator.gate.verdict import (
    compare,
    decide,
    items_json,
    job_outcome,
    job_tests,
    load_known_issues,
    rerun_suspects,
    rerun_target,
    write_gate_files,
)
from orchestrator.inventory import Host, InventoryError, load_inventory, parse_select, select_hosts
from orchestrator.runner import RunError, RunOptions, execute_run, write_run_reports
from orchestrator.store import Store


@dataclass
class GateOptions:
    series: list[str]
    tree: Path
    base: str | None = None
    build_cmd: str = DEFAULT_BUILD_CMD
    build_timeout: float = 7200.0
    inventory: str = "inventory/local.yaml"
    hosts: str | None = None
    select: tuple[str, ...] = ()
    suites: tuple[str, ...] = ()
    reruns: int = 2
    known_issues: Path | None = None
    out: Path | None = None
    timeout: float = 1800.0
    expires: float = 600.0
    provision_timeout: float = 900.0
    fresh_baseline: bool = False
    bisect: bool = True
    known_hosts: tuple[Path, ...] = ()
    identities: tuple[str, ...] = ()
    tty: bool | None = None


@dataclass
class GateResult:
    verdict: str
    exit_code: int
    out: Path
    report: dict[str, Any] = field(default_factory=dict)


def new_gate_id() -> str:
    return "gate-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def select(o: GateOptions, store: Store) -> list[Host]:
    from agent.facts import flat_facts
    from agent.tasks import host_facts

    def facts_for(hs: list[Host]) -> dict[str, dict[str, Any]]:
        stored = store.host_facts()
        out = {}
        for h in hs:
            if h.driver == "model" or h.address == "local":
                out[h.name] = flat_facts(host_facts(h.entry()))
            elif h.name in stored:
                out[h.name] = flat_facts(stored[h.name]["facts"])
        return out

    try:
        chosen = select_hosts(load_inventory(o.inventory), o.hosts, parse_select(o.select), facts_for)
    except (InventoryError, ValueError) as exc:  # ValueError: a model host's uarch/fault is unknown
        raise GateError(2, "input-error", str(exc)) from None
    if not chosen:
        raise GateError(2, "input-error", f"no host of {o.inventory} matches --hosts/--select")
    return chosen


def suite_names(o: GateOptions) -> tuple[list[str], Path]:
    from agent.tasks import SuiteRefused, resolve_suite, tree_root
    from orchestrator.health import HEALTH_SUITE

    root = tree_root()
    if not o.suites:
        names = sorted(p.name for p in (root / "suites").iterdir()
                       if p.is_dir() and not p.name.startswith(("_", ".")) and p.name != HEALTH_SUITE
                       and any(p.glob("test_*.py")))
        if not names:
            raise GateError(2, "input-error", f"no suites under {root / 'suites'}")
        return names, root
    names = []
    for s in o.suites:
        try:
            names.append(resolve_suite(s, root)[0])
        except SuiteRefused as exc:
            raise GateError(2, "input-error", str(exc)) from None
    return sorted(set(names)), root


def _execute(store: Store, state_dir: Path, hosts: list[Host], suites: list[str], inventory: str, opts: RunOptions,
             echo: Any) -> str:
    """runner.execute_run, then drop kombu's process-global connection pools: the local default's next
    private Redis reuses the same unix socket path, and pooled connections to the stopped server would
    break the next run in this process with EPIPE (the gate runs several runs in one process)."""
    try:
        return execute_run(store, state_dir, hosts, suites, inventory, opts, echo)
    finally:
        from kombu import pools

        pools.reset()


def provision_tree(tree: Path, hosts: list[Host], build: Any, timeout: float, echo: Any,
                   ssh: SshOptions) -> Provisioned:
    """provision(), then point the upstream suites at the tree just built: suites/kselftest_kvm judges a series
    by the selftests of its own tree (agent/upstream.py). Only a ``local`` host can see the gate's worktree; a
    remote host keeps its inventory's ``kernel_tree`` (shipping the tree is not done yet)."""
    prov = provision(hosts, build, timeout, echo, ssh)
    prov.hosts = [h.model_copy(update={"kernel_tree": str(tree)}) if h.address == "local" else h
                  for h in prov.hosts]
    return prov


def predicted_class(h: Host, stored: dict[str, dict[str, Any]]) -> str | None:
    """The host class before running anything: simulated facts, or the last stored probe of a real host."""
    if h.driver == "model":
        from agent.drivers.model import simulated_facts

        try:
            return host_class(simulated_facts(h.entry()))
        except ValueError as exc:  # unknown uarch/fault/erratum in the inventory entry
            raise GateError(2, "input-error", f"{h.source or 'inventory'}: {exc}") from None
    facts = (stored.get(h.name) or {}).get("facts")
    return host_class(facts) if facts else None


def run_gate(o: GateOptions, store: Store, state_dir: Path, reports_dir: Path, echo: Any = print) -> GateResult:
    gate_id = new_gate_id()
    out = o.out or reports_dir / gate_id
    work = state_dir / "gate" / gate_id
    t0 = time.monotonic()
    timing: dict[str, float] = {}
    report: dict[str, Any] = {"gate_id": gate_id, "verdict": None, "exit_code": None, "tree": {"tree": str(o.tree)},
                              "inventory": o.inventory, "reruns": o.reruns, "timing": timing, "notes": [],
                              "compared": False}
    try:
        _pipeline(o, store, state_dir, out, work, gate_id, report, timing, echo, t0)
    except GateError as exc:
        report.update(verdict=exc.verdict, exit_code=exc.code, message=str(exc), detail=exc.detail)
    except RunError as exc:
        report.update(verdict="inconclusive" if exc.code == EXIT_INCONCLUSIVE else "input-error",
                      exit_code=exc.code, message=str(exc))
    finally:
        timing["total"] = round(time.monotonic() - t0, 2)
        if report["verdict"] is None:  # interrupted
            report.update(verdict="interrupted", exit_code=130)
        if out.is_dir():
            report.setdefault("reports", {}).update(
                {f.name: str(f) for f in sorted(out.iterdir()) if f.name == "series.mbx" or f.suffix == ".log"})
        write_gate_files(out, report)
        shutil.rmtree(work, ignore_errors=True)
    return GateResult(report["verdict"], report["exit_code"], out, report)


def _pipeline(o: GateOptions, store: Store, state_dir: Path, out: Path, work: Path, gate_id: str,
              report: dict[str, Any], timing: dict[str, float], echo: Any, t0: float) -> None:
    if o.reruns < 0:
        raise GateError(EXIT_INPUT, "input-error", "--reruns must be >= 0")
    known = load_known_issues(o.known_issues)
    ssh = SshOptions(known_hosts=list(o.known_hosts), identities=list(o.identities))
    tree = check_tree(o.tree)
    report["tree"] = tree_identity(tree)
    hosts = select(o, store)
    suites, suites_root = suite_names(o)
    report["suites"] = suites
    report["hosts"] = [h.name for h in hosts]

    t = time.monotonic()
    series = intake(o.series, work, tree)
    report["series"] = series.to_json()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(series.mbx, out / "series.mbx")
    base_sha, origin, notes = resolve_base(tree, series, o.base)
    report["base"] = {"sha": base_sha, "origin": origin}
    report["notes"] += notes
    for note in notes:
        echo(note)
    echo(f"gate {gate_id}: {series.subject!r}: {series.count} patch(es), patchset {series.patchset_hash[:16]}, "
         f"base {base_sha[:12]} ({origin})")

    with Worktrees(tree, work / "wt") as wts:
        cand_wt = wts.add("candidate", base_sha)
        commits = apply_series(cand_wt, series, base_sha)
        head = commits[-1]
        report["candidate_head"] = head
        timing["apply"] = round(time.monotonic() - t, 2)
        echo(f"applied {len(commits)} patch(es) on {base_sha[:12]} -> {head[:12]}")

        t = time.monotonic()
        cand_build = run_build(cand_wt, "candidate", head, o.build_cmd, o.build_timeout, out)
        report["builds"] = {"candidate": cand_build.to_json()}
        timing["build_candidate"] = round(cand_build.duration, 2)

        # Baseline: reuse per (host class, suite), run only what is missing.
        digests = suites_digest(suites, suites_root)
        bdig = build_digest(o.build_cmd)
        common = {"base": base_sha, "gate": {"id": gate_id, "build": bdig, "suites_digest": digests}}
        kernel = {**report["tree"], "commit": base_sha}
        found = {} if o.fresh_baseline else find_baselines(store, base_sha, bdig, digests)
        stored = store.host_facts()
        predicted = {h.name: predicted_class(h, stored) for h in hosts}
        need = [h for h in hosts if predicted[h.name] is None or any((predicted[h.name], s) not in found
                                                                   for s in suites)]
        new_baseline: str | None = None
        t = time.monotonic()
        if need:
            echo(f"baseline: running on {', '.join(h.name for h in need)} (no stored baseline for their CPU model "
                 f"on {base_sha[:12]})")
            base_wt = wts.add("baseline", base_sha)
            base_build = run_build(base_wt, "baseline", base_sha, o.build_cmd, o.build_timeout, out)
            report["builds"]["baseline"] = base_build.to_json()
            if base_build.sim_faults is None and any(h.driver == "model" for h in hosts):
                report["notes"].append(f"the base tree has no {SIM_FILE}: simulated hosts run it without "
                                       "kernel-induced faults")
            prov = provision_tree(base_wt, need, base_build, o.provision_timeout, echo, ssh)
            meta = {**common, "role": "baseline", "kernel": {**kernel, "patchset_hash": ""}}
            meta["gate"] = {**common["gate"], "kernel_faults": prov.kernel_faults}
            new_baseline = _execute(store, state_dir, prov.hosts, suites, o.inventory,
                                       RunOptions(timeout=o.timeout, expires=o.expires, meta=meta, tty=o.tty), echo)
            fresh = find_baselines(store, base_sha, bdig, digests)
            if o.fresh_baseline:
                fresh = {k: v for k, v in fresh.items() if v["run_id"] == new_baseline}
            found = {**found, **fresh}
        else:
            echo(f"baseline: reusing stored results for base {base_sha[:12]}")
        timing["baseline"] = round(time.monotonic() - t, 2)

        # Candidate.
        t = time.monotonic()
        if cand_build.sim_faults is None and any(h.driver == "model" for h in hosts):
            report["notes"].append(f"the candidate tree has no {SIM_FILE}: simulated hosts run it without "
                                   "kernel-induced faults")
        prov = provision_tree(cand_wt, hosts, cand_build, o.provision_timeout, echo, ssh)
        cand_meta = {**common, "role": "candidate",
                     "kernel": {**kernel, "patchset_hash": series.patchset_hash},
                     "series": {"subject": series.subject, "patch_count": series.count,
                                "message_id": series.message_id, "head": head}}
        cand_meta["gate"] = {**common["gate"], "kernel_faults": prov.kernel_faults}
        cand_run = _execute(store, state_dir, prov.hosts, suites, o.inventory,
                               RunOptions(timeout=o.timeout, expires=o.expires, meta=cand_meta, tty=o.tty), echo)
        cand_jobs = [j for j in store.jobs(cand_run) if j["suite"] in suites]  # not the runner's health checks
        expected = [(h.name, s) for h in hosts for s in suites]
        timing["candidate"] = round(time.monotonic() - t, 2)

        # Flake guard: re-run each suspected regression up to --reruns times on the same host.
        t = time.monotonic()
        reruns: dict[tuple[str, str], list[str | None]] = {}
        rerun_ids: list[str] = []
        items, inconclusive = compare(found, cand_jobs, cand_meta, known, reruns, o.reruns, expected)
        for attempt in range(1, o.reruns + 1):
            suspects = rerun_suspects(items, o.reruns)
            if not suspects:
                break
            only: dict[tuple[str, str], list[str]] = {}
            for it in suspects:
                only.setdefault((it.host, it.suite), []).append(rerun_target(it.nodeid, it.suite))
            rhosts = [h for h in prov.hosts if any(k[0] == h.name for k in only)]
            rsuites = sorted({s for _, s in only})
            echo(f"re-run {attempt}/{o.reruns}: {len(suspects)} failing test(s) on {', '.join(h.name for h in rhosts)}")
            rmeta = {**cand_meta, "role": "rerun", "parent": cand_run, "attempt": attempt}
            rid = _execute(store, state_dir, rhosts, rsuites, o.inventory,
                              RunOptions(timeout=o.timeout, expires=o.expires, meta=rmeta, only=only, tty=o.tty), echo)
            rerun_ids.append(rid)
            rjobs = {(j["host"], j["suite"]): j for j in store.jobs(rid)}
            for it in suspects:
                outcome = job_outcome(rjobs.get((it.host, it.suite)), it.nodeid, it.suite)
                reruns.setdefault(it.key, []).append(None if outcome == "absent" else outcome)
            items, inconclusive = compare(found, cand_jobs, cand_meta, known, reruns, o.reruns, expected)
        timing["reruns"] = round(time.monotonic() - t, 2)
        verdict, code = decide(items, inconclusive)
        timing["to_verdict"] = round(time.monotonic() - t0, 2)

        # Which patch broke it: bisect the applied commits, regressed tests only, on the hosts that regressed.
        regressions = [i for i in items if i.category == "regression"]
        if verdict == "regression" and series.count > 1 and o.bisect:
            t = time.monotonic()
            report["bisect"] = bisect(
                series, commits, cand_wt, regressions, hosts, o.reruns,
                lambda wt, role, sha: run_build(wt, role, sha, o.build_cmd, o.build_timeout, out),
                lambda hs, ss, ro: _execute(store, state_dir, hs, ss, o.inventory, ro, echo),
                store, RunOptions(timeout=o.timeout, expires=o.expires, meta=cand_meta, tty=o.tty),
                lambda hs, b: provision_tree(cand_wt, hs, b, o.provision_timeout, echo, ssh), echo)
            timing["bisect"] = round(time.monotonic() - t, 2)
            timing["to_first_bad"] = round(time.monotonic() - t0, 2)
        elif verdict == "regression" and series.count > 1:
            report["notes"].append("--no-bisect: the first bad patch was not looked for")

    used = sorted({(found[(c, j["suite"])]["run_id"]) for j in cand_jobs
                   if (c := job_class(j, cand_meta)) and (c, j["suite"]) in found})
    report["runs"] = {"baseline": [{"id": r, "how": "ran" if r == new_baseline else "reused"} for r in used],
                      "candidate": cand_run, "reruns": rerun_ids}
    report["baseline_reused"] = bool(used) and new_baseline not in used
    report["host_classes"] = {}
    for j in cand_jobs:
        c = job_class(j, cand_meta)
        bj = found.get((c or "", j["suite"]))
        report["host_classes"].setdefault(j["host"], {"class": c, "kernel_faults": prov.kernel_faults.get(j["host"]),
                                                      "baseline": {}})["baseline"][j["suite"]] = \
            bj["run_id"] if bj else None
    report["compared"] = True
    report["items"] = items_json(items)
    report["inconclusive"] = [vars(i) for i in inconclusive]
    report["notes"] += _same_kernel_notes(found, cand_jobs, cand_meta)
    n = {c: len([r for r in report["items"] if r["category"] == c]) for c in ("regression", "flaky", "known")}
    report.update(verdict=verdict, exit_code=code,
                  message=f"{n['regression']} regression(s), {n['flaky']} flaky, {n['known']} known issue(s), "
                          f"{len(inconclusive)} inconclusive job(s)")
    baseline_map = {}
    for j in cand_jobs:
        bj = found.get((job_class(j, cand_meta) or "", j["suite"]))
        if bj:
            for nodeid, tr in job_tests(bj).items():
                if not nodeid.endswith("/"):
                    baseline_map[f"{j['host']}|{nodeid}"] = tr["outcome"]
    report.setdefault("reports", {})
    try:
        paths, _ = write_run_reports(store, cand_run, out, baseline=baseline_map)
        report["reports"].update({k: str(v) for k, v in paths.items()})
    except Exception as exc:  # reports are attachments; a renderer bug must not hide the verdict
        report["notes"].append(f"candidate reports could not be written: {type(exc).__name__}: {exc}")


def _same_kernel_notes(found: dict[tuple[str, str], dict[str, Any]], cand_jobs: list[dict[str, Any]],
                       cand_meta: dict[str, Any]) -> list[str]:
    notes = []
    for j in cand_jobs:
        facts = j.get("facts") or {}
        if facts.get("simulated") or not facts:
            continue
        bj = found.get((job_class(j, cand_meta) or "", j["suite"]))
        rel = (facts.get("kernel") or {}).get("release")
        if bj and rel and ((bj.get("facts") or {}).get("kernel") or {}).get("release") == rel:
            notes.append(f"{j['host']} {j['suite']}: baseline and candidate both ran kernel {rel} "
                         "(provision: none): the comparison is only as good as that")
    return sorted(set(notes))
