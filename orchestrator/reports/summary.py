"""summary.md: one screen: verdict, counts per microarchitecture, failures, infra errors, links.

Verdict (first line after the title):
    FAIL  any test failed or errored (or a job errored without results: the suite itself broke);
    INFRA no failure, but some job ended infra_error/timeout (or nothing ran at all): inconclusive;
    NOT TESTED  no job tested its suite's subject: every subject test was skipped for a missing fact
          (``naming.not_tested_reason``; the harness self-test passing alone is not a PASS);
    PASS  otherwise (skips and erratum xfails do not change it); jobs that tested nothing are listed.
Failures are grouped by test (one line lists every host it failed on). With a ``baseline``
(result_key -> outcome, see ``naming.result_key``/``baseline_from_jobs``) a failure is NEW when any of
its hosts did not fail/error in the baseline (a key missing from the baseline counts as new); new
failures are listed first and marked. Lists are capped so the file stays one screen; the matrix
and JUnit files hold the rest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from .naming import (
    ERROR,
    FAILED,
    HUNG,
    NO_VERDICT_STATUSES,
    PASSED,
    SKIPPED,
    XFAILED,
    XPASSED,
    cpu_order,
    cpuid_label,
    first_line,
    job_cause,
    job_cpu,
    latest_attempts,
    not_tested_reason,
    parse_test,
    result_key,
)

MAX_FAILURES = 10
MAX_INFRA = 6
COUNT_COLS = (PASSED, FAILED, ERROR, XFAILED, XPASSED, SKIPPED, "infra")
_BAD = (FAILED, ERROR)


def verdict(jobs: Iterable[Mapping[str, Any]]) -> tuple[str, dict[str, int]]:
    jobs = latest_attempts(jobs)
    counts: dict[str, int] = defaultdict(int)
    for job in jobs:
        tests = job.get("tests") or ()
        for t in tests:
            counts[t.get("outcome") or ERROR] += 1
        status = job.get("status")
        if status in ("infra_error", "timeout"):
            counts["infra"] += 1
        elif status in NO_VERDICT_STATUSES and not tests:
            counts["job_error"] += 1
    counts["jobs"] = len(jobs)
    counts["hosts"] = len({j.get("host") for j in jobs})
    counts["tests"] = sum(counts[o] for o in (PASSED, FAILED, ERROR, XFAILED, XPASSED, SKIPPED))
    if counts[FAILED] or counts[ERROR] or counts["job_error"]:
        return "FAIL", dict(counts)
    if counts["infra"] or not jobs:
        return "INFRA", dict(counts)
    counts["not_tested"] = sum(1 for j in jobs if not_tested_reason(j))
    if counts["not_tested"] == len(jobs):
        return "NOT TESTED", dict(counts)
    return "PASS", dict(counts)


def _infra_cause(job: Mapping[str, Any]) -> str:
    """Why a job gave no full verdict; a suite killed by --timeout names the test that hung."""
    tests = job.get("tests") or ()
    hung = [t for t in tests if t.get("outcome") == HUNG]
    if not hung:
        return job_cause(job)
    kept = len(tests) - len(hung)
    return (f"timeout: hung in {parse_test(hung[0]).short} ({first_line(hung[0].get('message'), 140)}); "
            f"{kept} finished test{'s' if kept != 1 else ''} kept")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def render_summary(run: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]],
                   links: Mapping[str, str] | None = None,
                   baseline: Mapping[str, str] | None = None) -> str:
    jobs = latest_attempts(jobs)
    word, c = verdict(jobs)
    run_id = run.get("id", "?")
    lines = [f"# pmufarm run {run_id}: {word}", ""]
    bits = [f"{c.get(FAILED, 0)} failed", f"{c.get(ERROR, 0) + c.get('job_error', 0)} error",
            f"{c.get('infra', 0)} infra/timeout jobs"]
    rest = [f"{c.get(PASSED, 0)} passed", f"{c.get(XFAILED, 0)} xfail (errata)",
            f"{c.get(XPASSED, 0)} xpass", f"{c.get(SKIPPED, 0)} skipped"]
    lines.append(f"**{word}**: {', '.join(bits)}; {', '.join(rest)} "
                 f"({c.get('tests', 0)} results, {c.get('jobs', 0)} jobs on {c.get('hosts', 0)} hosts)")
    kernel = run.get("kernel") or {}
    kbits = [str(kernel[k])[:40] for k in ("tree", "commit") if kernel.get(k)]
    if kernel.get("patchset_hash"):
        kbits.append(f"patchset {str(kernel['patchset_hash'])[:12]}")
    suites = ", ".join(run.get("suites") or sorted({str(j.get('suite')) for j in jobs}))
    lines.append(f"Kernel: {' '.join(kbits) or 'as booted on each host'} · suites: {suites}")
    lines.append("")

    # Counts per microarchitecture (same columns as the matrix).
    per: dict[str, dict[str, Any]] = {}
    for job in jobs:
        cpu = job_cpu(job)
        # Same column order as the matrix (naming.cpu_order): vendor, then generation.
        row = per.setdefault(cpu.column_key, {"label": cpu.label, "hosts": set(), "models": set(),
                                              "sort": cpu_order(cpu), **{k: 0 for k in COUNT_COLS}})
        row["hosts"].add(job.get("host"))
        if cpu.family is not None and cpu.model is not None:
            row["models"].add(cpuid_label(cpu.family, cpu.model))
        for t in job.get("tests") or ():
            o = t.get("outcome") or ERROR
            row[o if o in row else ERROR] += 1
        if job.get("status") in ("infra_error", "timeout"):
            row["infra"] += 1
        elif job.get("status") in NO_VERDICT_STATUSES and not job.get("tests"):
            row[ERROR] += 1
    lines.append("| microarchitecture | models | hosts | pass | fail | error | xfail | xpass | skip | infra |")
    lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for key in sorted(per, key=lambda k: per[k]["sort"]):
        r = per[key]
        cells = [str(r[k]) if r[k] else "·" for k in COUNT_COLS]
        if r[FAILED]:
            cells[1] = f"**{cells[1]}**"
        lines.append(f"| {_md(r['label'])} | {', '.join(sorted(r['models'])) or '?'} | {len(r['hosts'])} | "
                     + " | ".join(cells) + " |")
    lines.append("")

    # Failures, grouped by test; new ones first.
    groups: dict[tuple[str, str, str], list[tuple[str, str, bool]]] = defaultdict(list)
    for job in jobs:
        host = str(job.get("host") or "unknown")
        for t in job.get("tests") or ():
            o = t.get("outcome")
            if o not in _BAD:
                continue
            nodeid = str(t.get("nodeid") or t.get("name") or "?")
            new = False
            if baseline is not None:
                before = baseline.get(result_key(host, nodeid), baseline.get(nodeid))
                new = before not in _BAD
            groups[(str(job.get("suite")), nodeid, o)].append(
                (host, first_line(t.get("message"), 140) or "(no message)", new))
    if groups:
        nnew = sum(1 for v in groups.values() if any(n for _, _, n in v))
        head = f"## Failures ({len(groups)} tests"
        head += f", {nnew} new vs baseline)" if baseline is not None else ")"
        lines.append(head)
        order = sorted(groups.items(), key=lambda kv: (
            not any(n for _, _, n in kv[1]), kv[0][2] != FAILED, kv[0][0], kv[0][1]))
        for (suite, nodeid, o), hits in order[:MAX_FAILURES]:
            is_new = any(n for _, _, n in hits)
            hosts = [h for h, _, _ in hits]
            shown = ", ".join(hosts[:4]) + (f" +{len(hosts) - 4}" if len(hosts) > 4 else "")
            tag = "**NEW** " if is_new else ""
            short = parse_test({"nodeid": nodeid}).short
            lines.append(f"- {tag}{'FAIL' if o == FAILED else 'ERROR'} `{suite}::{_md(short)}` "
                         f"on {shown}: {_md(hits[0][1])}")
        if len(order) > MAX_FAILURES:
            lines.append(f"- … {len(order) - MAX_FAILURES} more failing tests: see matrix.md / JUnit")
        lines.append("")

    infra = [j for j in jobs if j.get("status") in ("infra_error", "timeout")
             or (j.get("status") in NO_VERDICT_STATUSES and not j.get("tests"))]
    if infra:
        lines.append(f"## Infra / job errors ({len(infra)} job{'s' if len(infra) != 1 else ''})")
        for j in sorted(infra, key=lambda j: (str(j.get("host")), str(j.get("suite"))))[:MAX_INFRA]:
            lines.append(f"- {j.get('host')} / {j.get('suite')}: {_md(_infra_cause(j))}")
        if len(infra) > MAX_INFRA:
            lines.append(f"- … {len(infra) - MAX_INFRA} more: see JUnit `[job]` cases")
        lines.append("")

    untested = [(j, why) for j in jobs if (why := not_tested_reason(j))]
    if untested:
        lines.append(f"## Not tested here ({len(untested)} job{'s' if len(untested) != 1 else ''}): "
                     "no test of the suite's subject ran")
        for j, why in sorted(untested, key=lambda jw: (str(jw[0].get("host")), str(jw[0].get("suite"))))[:MAX_INFRA]:
            lines.append(f"- {j.get('host')} / {j.get('suite')}: {_md(why)}")
        if len(untested) > MAX_INFRA:
            lines.append(f"- … {len(untested) - MAX_INFRA} more: see the JUnit property `tested`")
        lines.append("")

    if links:
        junit = [p for p in links.values() if p.startswith("junit/")]
        other = [(k, p) for k, p in links.items() if not p.startswith("junit/") and k != "summary.md"]
        lines.append("## Reports")
        if other:
            lines.append(" · ".join(f"[{k}]({p})" for k, p in other))
        if junit:
            shown = junit[:12]
            txt = ", ".join(f"[{p[6:-4]}]({p})" for p in shown)
            if len(junit) > len(shown):
                txt += f", … {len(junit) - len(shown)} more in [junit/](junit/)"
            lines.append(f"JUnit ({len(junit)} files): {txt}")
        lines.append("")
    return "\n".join(lines)
