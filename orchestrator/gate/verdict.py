"""Compare candidate results with the baseline of the same host class; decide; render gate.md/gate.json.

Per (host, test) of the candidate run, against the baseline job of the host's class (``baseline.py``):

=================  ==========================  =====================================================
baseline           candidate                   category
=================  ==========================  =====================================================
passed / xfailed   failed / error              regression, unless a re-run passes (-> ``flaky``),
                                               a known issue matches (-> ``known``), or the re-runs
                                               could not run (-> ``unconfirmed``: inconclusive)
passed / xfailed   skipped / absent            regression (coverage lost: a kernel that makes a
                                               test skip, e.g. mediated vPMU no longer available,
                                               is a PMU-virtualization regression) unless known
failed / error     passed / xfailed            fix
failed / error     failed / error              unchanged failure (``known`` when one matches)
skipped / absent   failed / error              new failure without a passing baseline (listed
                                               with unchanged failures; not a regression)
=================  ==========================  =====================================================

A job whose suite process died (job status ``error``) also yields the pseudo-test ``suites/<suite>/``
with outcome ``error`` (``passed`` for a job that completed), compared the same way; its re-run
re-runs the whole suite. Candidate jobs that ended ``infra_error``/``timeout`` and classes without a
baseline are ``inconclusive`` items: never a regression, never a pass.

Verdict: any regression -> ``regression`` (exit 1; a finding stands even when other hosts were
inconclusive); else any inconclusive item -> ``inconclusive`` (exit 3); else ``pass`` (exit 0).

Known issues (``--known-issues FILE``): a YAML list of ``{test: glob, uarch: glob (optional),
reason: text}``; ``test`` matches the node id, ``<suite>::<name>`` or the bare test name.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.gate.baseline import INFRA, job_class
from orchestrator.gate.common import EXIT_INCONCLUSIVE, EXIT_PASS, EXIT_REGRESSION, GateError

GOOD = {"passed", "xfailed"}
BAD = {"failed", "error"}
ORDER = ("regression", "fix", "unchanged", "flaky", "known", "unconfirmed")


@dataclass
class KnownIssue:
    test: str
    reason: str
    uarch: str = "*"

    def matches(self, item: Item) -> bool:
        name = item.nodeid.split("::", 1)[-1]
        tests = (item.nodeid, f"{item.suite}::{name}", name)
        return any(fnmatch.fnmatchcase(t, self.test) for t in tests) and fnmatch.fnmatchcase(item.uarch, self.uarch)


def load_known_issues(path: Path | None) -> list[KnownIssue]:
    if path is None:
        return []
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except OSError as exc:
        raise GateError(2, "input-error", f"--known-issues {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise GateError(2, "input-error", f"--known-issues {path}: YAML error: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, list):
        raise GateError(2, "input-error", f"--known-issues {path}: expected a list of {{test, uarch?, reason}}")
    out = []
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict) or not isinstance(row.get("test"), str) or not row.get("reason"):
            raise GateError(2, "input-error", f"--known-issues {path}: entry #{i}: needs 'test' (glob) and 'reason'")
        extra = set(row) - {"test", "uarch", "reason"}
        if extra:
            raise GateError(2, "input-error", f"--known-issues {path}: entry #{i}: unknown field {sorted(extra)[0]!r}")
        out.append(KnownIssue(test=row["test"], reason=str(row["reason"]), uarch=str(row.get("uarch") or "*")))
    return out


@dataclass
class Item:
    category: str
    host_class: str
    uarch: str
    host: str
    suite: str
    nodeid: str
    baseline: str
    candidate: str
    message: str = ""
    reruns: list[str | None] = field(default_factory=list)
    reason: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.host, self.nodeid)


@dataclass
class Inconclusive:
    host: str
    suite: str
    why: str


def pseudo_nodeid(suite: str) -> str:
    return f"suites/{suite}/"


def job_tests(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """nodeid -> result, plus the suite-process pseudo-test."""
    tests = {t["nodeid"]: t for t in job.get("tests") or []}
    first = (job.get("log_tail") or "").strip().splitlines()
    tests[pseudo_nodeid(job["suite"])] = {
        "nodeid": pseudo_nodeid(job["suite"]), "outcome": "error" if job["status"] == "error" else "passed",
        "message": first[0] if first and job["status"] == "error" else ""}
    return tests


def rerun_target(nodeid: str, suite: str) -> str:
    """The node id as the agent accepts it (relative to its tree: ``suites/<suite>/...``)."""
    marker = f"suites/{suite}/"
    i = nodeid.find(marker)
    return nodeid[i:] if i >= 0 else nodeid


def job_outcome(job: dict[str, Any] | None, nodeid: str, suite: str) -> str | None:
    """The outcome of ``nodeid`` in a (re-)run job: None when the job did not complete (infrastructure)."""
    if job is None or job["status"] in INFRA or job["status"] in ("queued", "running"):
        return None
    want = rerun_target(nodeid, suite)
    for nid, t in job_tests(job).items():
        if rerun_target(nid, suite) == want:
            return t["outcome"]
    return "absent"


def compare(baselines: dict[tuple[str, str], dict[str, Any]], cand_jobs: list[dict[str, Any]],
            cand_meta: dict[str, Any], known: list[KnownIssue],
            reruns: dict[tuple[str, str], list[str | None]] | None = None,
            rerun_budget: int = 0, expected: Iterable[tuple[str, str]] = ()
            ) -> tuple[list[Item], list[Inconclusive]]:
    """Classify every candidate result (module docstring); ``reruns[(host, nodeid)]`` = outcomes of the
    re-runs done so far (None = that attempt did not run). ``expected`` (host, suite) pairs without a
    candidate job (host out of service, left out by its health check) are inconclusive."""
    reruns = reruns or {}
    items: list[Item] = []
    ran = {(j["host"], j["suite"]) for j in cand_jobs}
    inconclusive = [Inconclusive(h, s, "no candidate job: host out of service or left out by its health check")
                    for h, s in sorted(set(expected) - ran)]
    for job in sorted(cand_jobs, key=lambda j: (j["host"], j["suite"])):
        host, suite = job["host"], job["suite"]
        if job["status"] in INFRA or job["status"] in ("queued", "running"):
            tail = (job.get("log_tail") or "").strip().splitlines()
            inconclusive.append(Inconclusive(host, suite, f"candidate job {job['status']}: "
                                                          f"{tail[0][:200] if tail else 'no detail'}"))
            continue
        cls = job_class(job, cand_meta)
        base_job = baselines.get((cls, suite)) if cls else None
        if base_job is None:
            inconclusive.append(Inconclusive(host, suite, f"no baseline for host class {cls or 'unknown'}"))
            continue
        uarch = ((job.get("facts") or {}).get("cpu") or {}).get("uarch") or "unknown"
        before, after = job_tests(base_job), job_tests(job)
        for nodeid in sorted(set(before) | set(after)):
            b = before.get(nodeid, {}).get("outcome", "absent")
            c = after.get(nodeid, {}).get("outcome", "absent")
            msg = (after.get(nodeid) or before.get(nodeid) or {}).get("message") or ""
            item = Item("", cls or "unknown", uarch, host, suite, nodeid, b, c, msg.strip().split("\n")[0][:300])
            if b in GOOD and (c in BAD or c in ("skipped", "absent")):
                item.category = "regression"
            elif b in BAD and c in GOOD:
                item.category = "fix"
            elif c in BAD:
                item.category = "unchanged"
            else:
                continue
            issue = next((k for k in known if k.matches(item)), None) if item.category != "fix" else None
            if issue is not None:
                item.category, item.reason = "known", issue.reason
            elif item.category == "regression" and c in BAD and rerun_budget > 0:
                item.reruns = list(reruns.get(item.key, []))
                if any(o in GOOD for o in item.reruns):
                    item.category = "flaky"
                elif len(item.reruns) >= rerun_budget and all(o is None for o in item.reruns):
                    item.category = "unconfirmed"  # failed once, and no re-run could confirm it
            items.append(item)
    return items, inconclusive


def rerun_suspects(items: Iterable[Item], budget: int) -> list[Item]:
    """Regressions with a failing outcome that still have re-runs left and no passing re-run."""
    return [i for i in items if i.category == "regression" and i.candidate in BAD and len(i.reruns) < budget]


def decide(items: list[Item], inconclusive: list[Inconclusive]) -> tuple[str, int]:
    if any(i.category == "regression" for i in items):
        return "regression", EXIT_REGRESSION
    if inconclusive or any(i.category == "unconfirmed" for i in items):
        return "inconclusive", EXIT_INCONCLUSIVE
    return "pass", EXIT_PASS


# ------------------------------------------------------------------------------------------------
# rendering

TITLES = {
    "regression": "Regressions (pass on the base, fail/skip on the candidate)",
    "fix": "Fixes (fail on the base, pass on the candidate)",
    "unchanged": "Unchanged failures (fail on the base and on the candidate, or no passing baseline)",
    "flaky": "Flaky (failed on the candidate, passed on a re-run: not a regression)",
    "known": "Known issues (matched --known-issues: not counted)",
    "unconfirmed": "Unconfirmed (failed once; the re-runs could not run: inconclusive)",
}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _grouped(items: list[Item]) -> list[dict[str, Any]]:
    """One row per (test, host class, outcomes): hosts merged."""
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for i in items:
        k = (i.category, i.nodeid, i.host_class, i.baseline, i.candidate, i.reason)
        row = rows.setdefault(k, {**asdict(i), "hosts": []})
        row["hosts"].append(i.host)
        row.pop("host", None)
    return sorted(rows.values(), key=lambda r: (ORDER.index(r["category"]), r["nodeid"], r["host_class"]))


def render_markdown(report: dict[str, Any]) -> str:
    s = report.get("series") or {}
    base = report.get("base") or {}
    lines = [f"# pmufarm gate: **{report['verdict'].upper()}** (exit {report['exit_code']})", ""]
    if report.get("message"):
        lines += [f"> {report['message']}", ""]
    lines += [
        f"- series: {_cell(s.get('subject') or '?')}",
        f"- patches: {s.get('patch_count', '?')}"
        + (f" (message-id {s['message_id']})" if s.get("message_id") else ""),
        f"- patchset hash: `{s.get('patchset_hash') or '-'}` (KCIDB: sha256 of the per-patch sha256s)",
        f"- base: `{base.get('sha') or '?'}` ({base.get('origin') or '?'})",
        f"- tree: {report.get('tree', {}).get('tree', '?')}; suites: {', '.join(report.get('suites') or []) or '-'}",
    ]
    runs = report.get("runs") or {}
    if runs:
        bl = ", ".join(f"{r['id']} ({r['how']})" for r in runs.get("baseline") or []) or "-"
        rr = ", ".join(runs.get("reruns") or []) or "-"
        lines.append(f"- runs: baseline {bl}; candidate {runs.get('candidate') or '-'}; re-runs {rr}")
    lines.append("")
    lines += _bisect_lines(report.get("bisect"), s.get("patch_count"))
    if report.get("detail"):
        lines += ["```", report["detail"].rstrip(), "```", ""]
    rows = report.get("items") or []
    counts = {c: len([r for r in rows if r["category"] == c]) for c in ORDER}
    if report.get("compared"):
        lines += ["Compared per CPU model (host class): " + ", ".join(f"{n} {c}" for c, n in counts.items()), ""]
    for cat in ORDER:
        mine = [r for r in rows if r["category"] == cat]
        if not mine and cat not in ("regression",):
            continue
        lines += [f"## {TITLES[cat]}", ""]
        if not mine:
            lines += ["None." if report.get("compared") else "Not compared.", ""]
            continue
        lines += ["| test | CPU model | hosts | base → candidate | detail |", "|---|---|---|---|---|"]
        for r in mine:
            detail = r["reason"] or r["message"]
            if r.get("reruns"):
                detail = f"re-runs: {', '.join(o or 'did not run' for o in r['reruns'])}; " + detail
            lines.append(f"| `{_cell(r['nodeid'])}` | {_cell(r['host_class'])} | {_cell(', '.join(r['hosts']))} | "
                         f"{r['baseline']} → {r['candidate']} | {_cell(detail)[:300]} |")
        lines.append("")
    inc = report.get("inconclusive") or []
    if inc:
        lines += ["## Inconclusive (infrastructure; never counted as a kernel failure)", ""]
        lines += [f"- {_cell(i['host'])} {_cell(i['suite'])}: {_cell(i['why'])}" for i in inc]
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {_cell(n)}" for n in report["notes"]] + [""]
    if report.get("reports"):
        lines += ["## Files", ""] + [f"- {k}: {v}" for k, v in sorted(report["reports"].items())] + [""]
    return "\n".join(lines)


def _bisect_lines(b: dict[str, Any] | None, total: Any) -> list[str]:
    if not b:
        return []
    bad = b.get("first_bad")
    lines = ["## First bad patch", ""]
    if bad:
        lines += [f"**patch {bad['index']}/{total}: {_cell(bad['subject'])}** (`{bad['commit'][:12]}`) breaks:", ""]
        lines += [f"- `{_cell(t)}`" for t in bad["tests"]]
    else:
        lines.append(_cell(b.get("message") or "not found"))
    if not b.get("steps"):
        return lines + [""]
    lines += ["", f"Bisection: {b.get('builds', 0)} build(s) in {b.get('seconds', 0)}s, regressed tests only, "
                  "on the hosts that regressed:", "", "| patch | commit | result | detail |", "|---|---|---|---|"]
    for st in b.get("steps") or []:
        detail = _cell(st["detail"])[:300]
        lines.append(f"| {st['index']}/{total} | `{st['commit'][:12]}` | {st['result']} | {detail} |")
    return lines + [""]


def write_gate_files(out: Path, report: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "gate.md", out / "gate.json"
    report.setdefault("reports", {}).update({"gate.md": str(md), "gate.json": str(js)})
    md.write_text(render_markdown(report), encoding="utf-8")
    js.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return {"gate.md": md, "gate.json": js}


def items_json(items: list[Item]) -> list[dict[str, Any]]:
    return _grouped(items)
