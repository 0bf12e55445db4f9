"""Which patch of the series broke it: ``git bisect`` over the applied commits, failing tests only.

Runs after a ``regression`` verdict on a series of more than one patch (``--no-bisect`` turns it
off). The base is known good (the baseline) and the last patch known bad (the candidate), so the
first bad patch is found in ceil(log2 n) builds at most: each step checks out one applied commit in
the candidate's worktree (an incremental build, as ``git bisect`` would), builds it, provisions
**only the hosts that regressed** and runs **only the regressed tests** there. A test that fails at
a step is re-run up to ``--reruns`` times, like the verdict's flake guard: a passing re-run makes it
pass at that step. A step is bad when any regressed test fails (or skips / goes missing: coverage
lost, as in the verdict table) on any of its hosts. Hosts with ``provision: none`` run the same
kernel at every step and are left out (gate.md says so).

A commit that does not build is skipped (``git bisect skip``): the search tries its neighbours, and
when every remaining commit is untestable the result is a range of patches. An infrastructure
failure at a step (host lost, job timed out, provisioning failed) stops the search; the verdict
stands, and gate.md says the bisection was inconclusive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.gate.apply import git
from orchestrator.gate.common import GateError
from orchestrator.gate.series import Series, bare_subject
from orchestrator.gate.verdict import BAD, GOOD, Item, job_outcome, rerun_target
from orchestrator.inventory import Host
from orchestrator.runner import RunError, RunOptions

GOOD_STEP, BAD_STEP, SKIP_STEP, STOP_STEP = "good", "bad", "untestable", "inconclusive"


@dataclass
class Step:
    index: int  # patch number, 1-based: the tree with patches 1..index applied
    commit: str
    result: str = ""
    tests: list[str] = field(default_factory=list)  # regressed tests that fail here ("<nodeid> on <host>")
    detail: str = ""
    runs: list[str] = field(default_factory=list)
    seconds: float = 0.0


def search(n: int, test: Callable[[int], str]) -> tuple[int | None, int, int]:
    """Binary search over patches 1..n, 0 (base) good and n bad; ``test(k)`` says good/bad/untestable/
    inconclusive for the tree with patches 1..k. Returns (first bad or None, last good, first bad known)."""
    good, bad = 0, n
    skipped: set[int] = set()
    while bad - good > 1:
        mid = (good + bad) / 2
        k = next((c for c in sorted(range(good + 1, bad), key=lambda c: (abs(c - mid), c)) if c not in skipped), None)
        if k is None:
            return None, good, bad  # every patch in between is untestable
        result = test(k)
        if result == GOOD_STEP:
            good = k
        elif result == BAD_STEP:
            bad = k
        elif result == SKIP_STEP:
            skipped.add(k)
        else:
            return None, good, bad
    return bad, good, bad


def bisect(series: Series, commits: list[str], worktree: Path, regressions: list[Item], hosts: list[Host],
           reruns: int, build: Callable[[Path, str, str], Any], execute: Callable[[list[Host], list[str],
                                                                                      RunOptions], str],
           store: Any, run_options: RunOptions, provision: Callable[[list[Host], Any], Any],
           echo: Any) -> dict[str, Any]:
    """Find the first bad patch; returns the ``bisect`` section of gate.json."""
    n = series.count
    # Only a host whose kernel follows the commit can tell patches apart: simulated hosts (the tree's
    # pmufarm-sim.yaml) and kexec/reboot hosts. A provision: none host runs the same kernel at every step.
    follows = {h.name for h in hosts if h.driver == "model" or h.provision != "none"}
    fixed = sorted({i.host for i in regressions} - follows)
    regressions = [i for i in regressions if i.host in follows]
    if not regressions:
        return {"steps": [], "builds": 0, "seconds": 0.0, "first_bad": None, "range": [1, n],
                "message": f"not bisected: the hosts that regressed ({', '.join(fixed)}) run a fixed kernel "
                           "(provision: none), so no patch can be told apart there"}
    names = {i.host for i in regressions}
    failing_hosts = [h for h in hosts if h.name in names]
    steps: list[Step] = []
    t0 = time.monotonic()

    def label(k: int) -> str:
        return f"patch {k}/{n} {bare_subject(series.patches[k - 1].subject)!r}"

    def test(k: int) -> str:
        step = Step(index=k, commit=commits[k - 1])
        steps.append(step)
        t = time.monotonic()
        try:
            _run_step(step, worktree, regressions, failing_hosts, reruns, build, execute, store, run_options,
                      provision)
        finally:
            step.seconds = round(time.monotonic() - t, 2)
        echo(f"bisect: {label(k)}: {step.result}" + (f" ({step.detail})" if step.detail else ""))
        return step.result

    echo(f"bisect: {len(regressions)} regressed test(s) on {', '.join(sorted(names))}, {n} patches")
    first, good, bad = search(n, test)
    out: dict[str, Any] = {"steps": [asdict(s) for s in steps], "builds": len(steps),
                           "seconds": round(time.monotonic() - t0, 2), "first_bad": None}
    if first is not None:
        tested = next((s for s in steps if s.index == first), None)
        tests = tested.tests if tested else sorted({f"{i.nodeid} on {i.host}" for i in regressions})
        out["first_bad"] = {"index": first, "subject": bare_subject(series.patches[first - 1].subject),
                            "commit": commits[first - 1], "tests": tests}
        out["message"] = f"first bad patch: {label(first)}"
    elif steps and steps[-1].result == STOP_STEP:
        out["message"] = (f"inconclusive at {label(steps[-1].index)}: {steps[-1].detail}; the first bad patch is "
                          f"one of {good + 1}..{bad}")
    else:
        out["message"] = f"patches {good + 1}..{bad - 1} do not build: the first bad patch is one of {good + 1}..{bad}"
    out["range"] = [good + 1, bad]
    if fixed:
        out["message"] += f" (not bisected on {', '.join(fixed)}: provision none, a fixed kernel)"
    return out


def _run_step(step: Step, worktree: Path, regressions: list[Item], hosts: list[Host], reruns: int,
              build: Callable[[Path, str, str], Any], execute: Callable[[list[Host], list[str], RunOptions], str],
              store: Any, run_options: RunOptions, provision: Callable[[list[Host], Any], Any]) -> None:
    proc = git(worktree, "checkout", "-q", "--detach", "--force", step.commit, check=False)
    if proc.returncode != 0:
        step.result, step.detail = STOP_STEP, f"git checkout {step.commit[:12]}: {proc.stderr.strip()[:200]}"
        return
    try:
        built = build(worktree, f"bisect-{step.index}", step.commit)
    except GateError as exc:  # a commit that does not build is skipped, as git bisect skip does
        step.result, step.detail = (SKIP_STEP if exc.verdict == "build-failed" else STOP_STEP), str(exc)
        return
    try:
        prov = provision(hosts, built)
    except GateError as exc:
        step.result, step.detail = STOP_STEP, str(exc)
        return
    pending = list(regressions)
    failing: list[str] = []
    for attempt in range(reruns + 1):
        only: dict[tuple[str, str], list[str]] = {}
        for it in pending:
            only.setdefault((it.host, it.suite), []).append(rerun_target(it.nodeid, it.suite))
        meta = {**run_options.meta, "role": "bisect", "patch": step.index, "commit": step.commit, "attempt": attempt,
                "gate": {**(run_options.meta.get("gate") or {}), "kernel_faults": prov.kernel_faults}}
        opts = RunOptions(timeout=run_options.timeout, expires=run_options.expires, tty=run_options.tty, meta=meta,
                          only=only)
        try:
            rid = execute([h for h in prov.hosts if any(k[0] == h.name for k in only)], sorted({s for _, s in only}),
                          opts)
        except RunError as exc:
            step.result, step.detail = STOP_STEP, str(exc)
            return
        step.runs.append(rid)
        jobs = {(j["host"], j["suite"]): j for j in store.jobs(rid)}
        still: list[Item] = []
        for it in pending:
            outcome = job_outcome(jobs.get((it.host, it.suite)), it.nodeid, it.suite)
            if outcome is None:
                step.result, step.detail = STOP_STEP, f"{it.host} {it.suite}: the job did not complete"
                return
            if outcome in BAD:
                still.append(it)  # re-run: it may be a flake
            elif outcome not in GOOD:  # skipped / absent: coverage lost, no re-run (as in the verdict)
                failing.append(f"{it.nodeid} on {it.host} ({outcome})")
        pending = still
        if not pending:
            break
    failing += [f"{it.nodeid} on {it.host}" for it in pending]
    step.tests = sorted(failing)
    step.result = BAD_STEP if failing else GOOD_STEP
    step.detail = f"{len(failing)} of {len(regressions)} regressed test(s) fail" if failing else \
        f"all {len(regressions)} regressed test(s) pass"
