"""Compatibility matrix: rows = tests grouped by suite, columns = microarchitectures.

A column is one microarchitecture as seen by the hosts' facts (``cpu.uarch``); simulated hosts get
their own column (key ``<vendor>-<uarch>-sim``, label "… (sim)"), never merged with real silicon.
Column label: uarch name, the CPU model ids seen (``06-8F``) and the host count.

A cell collapses every result of one test in one column. It shows the *worst* outcome and how many
of the cell's results had it ("fail 1/3"), in this order (worst first):

    error > fail > xpass > xfail > pass > skip

error beats fail (the test could not judge at all); xpass beats xfail (an erratum that no longer
shows is a stale errata entry, i.e. news; an xfail is documented and expected); skip is last so
"not applicable here" never hides a result that did run. An xfail cell names its erratum ids, a
skip cell its (most common) reason; the full per-outcome host lists are in the JSON and, in HTML,
in the cell's hover text (``title``).

Columns are ordered by vendor (Intel, AMD) and generation (``naming.cpu_order``: the order of
``inventory/microarch.yaml``), the same order as summary.md. Above the tests, a verdict block answers
"does it work on this CPU" per column: the column's verdict (FAIL, INFRA, NOT TESTED when no host of the
column ran a test of its suite's subject, else PASS), the hosts' mediated vPMU status (reasons on hover),
the result counts, and the errata that apply to its hosts. The HTML groups column headers per vendor,
keeps the header and the test column in view while scrolling, and fits ten columns in 1400 px.

Jobs that produced no verdict (``infra_error``/``timeout``, or ``error`` without results) add a
``[job]`` row to their suite with an ``infra`` cell ("infra 1/3" = one of three hosts of that
column that ran the suite), so missing hosts are visible rather than silently absent.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .naming import (
    ERROR,
    FAILED,
    NO_VERDICT_STATUSES,
    PASSED,
    SEVERITY,
    SKIPPED,
    XFAILED,
    XPASSED,
    cpu_order,
    cpuid_label,
    erratum_of,
    first_line,
    job_cause,
    job_cpu,
    latest_attempts,
    mediated_status,
    not_tested_reason,
    parse_test,
)

# Display words, worst first (also the legend order).
SHORT = {"infra_error": "infra", "timeout": "timeout", ERROR: "error", FAILED: "fail",
         XPASSED: "xpass", XFAILED: "xfail", PASSED: "pass", SKIPPED: "skip"}
LEGEND = [
    ("infra", "job did not run to completion (infra_error / timeout): no verdict, never a kernel failure"),
    ("timeout", "job timed out"),
    ("error", "test errored (setup/harness broke): no verdict"),
    ("fail", "test failed"),
    ("xpass", "expected failure did not happen (erratum not observed: stale errata entry?)"),
    ("xfail", "expected failure explained by a CPU erratum (id shown)"),
    ("pass", "test passed"),
    ("skip", "not applicable on this host (reason on hover)"),
    ("none", "not run in this column"),
]
JOB_ROW = "[job]"


@dataclass
class Column:
    key: str
    label: str
    vendor: str
    uarch: str
    uarch_name: str
    simulated: bool
    models: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    sort: tuple = ()
    jobs: int = 0
    untested: int = 0
    counts: Counter = field(default_factory=Counter)       # test outcome -> n; "infra" -> jobs
    mediated: Counter = field(default_factory=Counter)     # hosts' mediated vPMU status -> jobs
    mediated_reasons: Counter = field(default_factory=Counter)
    errata: set[str] = field(default_factory=set)          # errata that apply to the column's hosts

    @property
    def verdict(self) -> str:
        """FAIL > INFRA > NOT TESTED > PASS, as summary.md judges a run."""
        if self.counts[FAILED] or self.counts[ERROR]:
            return "FAIL"
        if self.counts["infra"]:
            return "INFRA"
        if self.jobs and self.untested == self.jobs:
            return "NOT TESTED"
        return "PASS"

    @property
    def mediated_text(self) -> str:
        return "/".join(sorted(self.mediated)) or "unknown"

    @property
    def results(self) -> list[str]:
        """Result counts, worst first: ["1 fail", "3 pass", "20 skip"]."""
        order = ("infra", ERROR, FAILED, XPASSED, XFAILED, PASSED, SKIPPED)
        return [f"{self.counts[o]} {SHORT.get(o, o)}" for o in order if self.counts[o]]

    @property
    def errata_text(self) -> str:
        return ",".join(sorted(self.errata)) or "none"

    @property
    def header(self) -> str:
        models = ",".join(self.models) if self.models else "?"
        n = len(self.hosts)
        return f"{self.label} {models} ×{n} host{'s' if n != 1 else ''}"


@dataclass
class Cell:
    outcomes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # outcome -> hosts
    errata: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    messages: dict[str, str] = field(default_factory=dict)  # host -> first line (fail/error/infra)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.outcomes.values())

    @property
    def worst(self) -> str:
        return max(self.outcomes, key=SEVERITY.__getitem__) if self.outcomes else ""

    @property
    def worst_count(self) -> int:
        return len(self.outcomes.get(self.worst, ()))

    @property
    def word(self) -> str:
        return SHORT.get(self.worst, self.worst)

    @property
    def detail(self) -> str:
        """Erratum ids for xfail, top skip reason for skip."""
        if self.worst in (XFAILED, XPASSED) and self.errata:
            return "+".join(sorted(self.errata))
        if self.worst == SKIPPED and self.reasons:
            return self.reasons.most_common(1)[0][0]
        if self.worst in (FAILED, ERROR, "infra_error", "timeout") and self.messages:
            hosts = self.outcomes[self.worst]
            for h in hosts:
                if self.messages.get(h):
                    return self.messages[h]
        return ""

    @property
    def text(self) -> str:
        return f"{self.word} {self.worst_count}/{self.total}"

    def title(self, limit_hosts: int = 8) -> str:
        lines = []
        for outcome in sorted(self.outcomes, key=SEVERITY.__getitem__, reverse=True):
            hosts = self.outcomes[outcome]
            shown = ", ".join(hosts[:limit_hosts]) + (f" +{len(hosts) - limit_hosts} more"
                                                      if len(hosts) > limit_hosts else "")
            lines.append(f"{outcome} {len(hosts)}/{self.total}: {shown}")
            if outcome in (FAILED, ERROR, "infra_error", "timeout"):
                for h in hosts[:3]:
                    if self.messages.get(h):
                        lines.append(f"  {h}: {self.messages[h]}")
        if self.errata:
            lines.append("errata: " + ", ".join(f"{e} ×{c}" for e, c in self.errata.most_common()))
        for reason, c in self.reasons.most_common(3):
            lines.append(f"skip reason ×{c}: {reason}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "worst": self.worst, "text": self.text, "count": self.worst_count, "total": self.total,
            "counts": {o: len(h) for o, h in self.outcomes.items()},
            "hosts": {o: list(h) for o, h in self.outcomes.items()},
        }
        if self.errata:
            out["errata"] = dict(self.errata)
        if self.reasons:
            out["skip_reasons"] = dict(self.reasons)
        if self.messages:
            out["messages"] = dict(self.messages)
        return out


@dataclass
class Row:
    suite: str
    test: str      # display name within the suite, or "[job]"
    nodeid: str    # "" for the job row
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def worst(self) -> str:
        worst = [c.worst for c in self.cells.values() if c.outcomes]
        return max(worst, key=SEVERITY.__getitem__) if worst else ""


@dataclass
class Matrix:
    columns: list[Column]
    rows: list[Row]
    run_ids: list[str] = field(default_factory=list)
    title: str = "pmufarm compatibility matrix"

    @property
    def suites(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.setdefault(r.suite, None)
        return list(seen)

    def cell(self, nodeid_or_test: str, column_key: str) -> Cell | None:
        for r in self.rows:
            if nodeid_or_test in (r.nodeid, r.test):
                return r.cells.get(column_key)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "run_ids": self.run_ids,
            "order": [SHORT[o] for o in sorted(SEVERITY, key=SEVERITY.__getitem__, reverse=True)],
            "columns": [{"key": c.key, "label": c.label, "header": c.header, "vendor": c.vendor,
                         "uarch": c.uarch, "uarch_name": c.uarch_name, "simulated": c.simulated,
                         "models": c.models, "hosts": c.hosts, "verdict": c.verdict,
                         "mediated": dict(c.mediated), "mediated_reasons": dict(c.mediated_reasons),
                         "counts": dict(c.counts), "errata": sorted(c.errata), "jobs": c.jobs,
                         "not_tested_jobs": c.untested} for c in self.columns],
            "rows": [{"suite": r.suite, "test": r.test, "nodeid": r.nodeid,
                      "cells": {k: c.to_json() for k, c in r.cells.items()}} for r in self.rows],
        }


def build_matrix(jobs: Iterable[Mapping[str, Any]], suite: str | None = None) -> Matrix:
    """Aggregate jobs (contracts §5; last attempt of each host+suite counts) into a Matrix."""
    cols: dict[str, Column] = {}
    col_models: dict[str, set] = defaultdict(set)
    rows: dict[tuple[str, str], Row] = {}
    run_ids: dict[str, None] = {}
    for job in latest_attempts(jobs):
        jsuite = job.get("suite") or "unknown"
        if suite is not None and jsuite != suite:
            continue
        if job.get("run_id"):
            run_ids.setdefault(str(job["run_id"]), None)
        cpu = job_cpu(job)
        key = cpu.column_key
        col = cols.get(key)
        if col is None:
            col = cols[key] = Column(key=key, label=cpu.label, vendor=cpu.vendor, uarch=cpu.uarch,
                                     uarch_name=cpu.uarch_name, simulated=cpu.simulated, sort=cpu_order(cpu))
        host = str(job.get("host") or "unknown")
        if host not in col.hosts:
            col.hosts.append(host)
        if cpu.family is not None or cpu.model is not None:
            col_models[key].add((cpu.family or 0, cpu.model or 0))
        col.jobs += 1
        col.untested += bool(not_tested_reason(job))
        col.errata.update(cpu.errata)
        if cpu.known:
            col.mediated[mediated_status(job)] += 1
            for why in ((job.get("facts") or {}).get("mediated_pmu") or {}).get("reasons") or ():
                col.mediated_reasons[str(why)] += 1

        tests = job.get("tests") or ()
        for t in tests:
            nodeid = t.get("nodeid") or t.get("name") or "unknown"
            rk = (jsuite, nodeid)
            row = rows.get(rk)
            if row is None:
                row = rows[rk] = Row(suite=jsuite, test=parse_test(t).short, nodeid=nodeid)
            cell = row.cells.get(key)
            if cell is None:
                cell = row.cells[key] = Cell()
            outcome = t.get("outcome") or ERROR
            if outcome not in SEVERITY:
                outcome = ERROR
            cell.outcomes[outcome].append(host)
            col.counts[outcome] += 1
            if outcome in (XFAILED, XPASSED):
                e = erratum_of(t)
                if e:
                    cell.errata[e] += 1
            elif outcome == SKIPPED:
                cell.reasons[first_line(t.get("message"), 160) or "skipped"] += 1
            elif outcome in (FAILED, ERROR):
                cell.messages[host] = first_line(t.get("message"), 160) or "(no message)"
        status = job.get("status")
        if status in ("infra_error", "timeout") or (status in NO_VERDICT_STATUSES and not tests):
            rk = (jsuite, "")
            row = rows.get(rk)
            if row is None:
                row = rows[rk] = Row(suite=jsuite, test=JOB_ROW, nodeid="")
            cell = row.cells.get(key)
            if cell is None:
                cell = row.cells[key] = Cell()
            o = status if status in ("infra_error", "timeout") else ERROR
            cell.outcomes[o].append(host)
            col.counts["infra" if o != ERROR else ERROR] += 1
            cell.messages[host] = first_line(job_cause(job), 160)

    for key, col in cols.items():
        col.models = [cpuid_label(f, m) for f, m in sorted(col_models[key])]
    columns = sorted(cols.values(), key=lambda c: c.sort)
    # Rows: suites alphabetically, the [job] row first in its suite, then tests by node id.
    ordered = sorted(rows.values(), key=lambda r: (r.suite, r.nodeid != "", r.nodeid))
    return Matrix(columns=columns, rows=ordered, run_ids=list(run_ids))


# ---------------------------------------------------------------- rendering

def render_matrix(matrix: Matrix, fmt: str = "md") -> str:
    """Render as "md", "html", "json" or "csv"."""
    if fmt == "md":
        return _render_md(matrix)
    if fmt == "html":
        return _render_html(matrix)
    if fmt == "json":
        return json.dumps(matrix.to_json(), indent=1, sort_keys=False) + "\n"
    if fmt == "csv":
        return _render_csv(matrix)
    raise ValueError(f"unknown matrix format {fmt!r} (md, html, json, csv)")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_cell(cell: Cell | None) -> str:
    if cell is None or not cell.outcomes:
        return "–"
    text = cell.text
    detail = cell.detail
    if cell.worst in (XFAILED, XPASSED) and detail:
        text = f"{cell.word}({detail}) {cell.worst_count}/{cell.total}"
    elif cell.worst == SKIPPED and detail:
        short = detail if len(detail) <= 40 else detail[:39] + "…"
        text = f"skip({short}) {cell.worst_count}/{cell.total}"
    if cell.worst in (FAILED, ERROR, "infra_error", "timeout"):
        text = f"**{text}**"
    return _md_escape(text)


def _render_md(m: Matrix) -> str:
    out = [f"# {m.title}", ""]
    if m.run_ids:
        out += [f"Run: {', '.join(m.run_ids)}", ""]
    out.append("Cells: worst outcome and how many of the column's results had it. Order: "
               "infra > timeout > error > fail > xpass > xfail > pass > skip; (sim) = simulated hosts.")
    out.append("")
    if m.columns:
        out += ["## Per column", ""]
        out.append("| | " + " | ".join(_md_escape(f"{_vendor_label(c.vendor)} {c.header}") for c in m.columns) + " |")
        out.append("|---|" + "---|" * len(m.columns))
        for label, values in _verdict_rows(m):
            out.append(f"| **{label}** | " + " | ".join(_md_escape(v) for v, _, _ in values) + " |")
        out.append("")
    for suite in m.suites:
        out += [f"## {suite}", ""]
        out.append("| test | " + " | ".join(_md_escape(c.header) for c in m.columns) + " |")
        out.append("|---|" + "---|" * len(m.columns))
        for r in m.rows:
            if r.suite != suite:
                continue
            out.append(f"| {_md_escape(r.test)} | "
                       + " | ".join(_md_cell(r.cells.get(c.key)) for c in m.columns) + " |")
        out.append("")
    return "\n".join(out)


def _vendor_label(vendor: str) -> str:
    return {"intel": "Intel", "amd": "AMD"}.get(vendor, vendor.capitalize() or "Unknown")


VERDICT_CLASS = {"PASS": "pass", "FAIL": "fail", "INFRA": "infra", "NOT TESTED": "untested"}


def _verdict_rows(m: Matrix) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The per-column verdict block: (label, [(text, css class, hover text) per column])."""
    def mediated(c: Column) -> tuple[str, str, str]:
        ok = c.mediated and set(c.mediated) == {"available"}
        why = "; ".join(f"{r} (×{n})" for r, n in c.mediated_reasons.most_common(5))
        return c.mediated_text, "pass" if ok else ("none" if not c.mediated else "skip"), why or c.mediated_text

    return [
        ("verdict", [(c.verdict, VERDICT_CLASS[c.verdict], f"{c.jobs} job(s), {c.untested} tested nothing of "
                      "their suite's subject") for c in m.columns]),
        ("mediated vPMU", [mediated(c) for c in m.columns]),
        ("results", [(" · ".join(c.results) or "–", "count", ", ".join(c.results)) for c in m.columns]),
        ("errata", [(c.errata_text, "xfail" if c.errata else "none", "errata that apply to this column's hosts: "
                     + c.errata_text) for c in m.columns]),
    ]


def _render_csv(m: Matrix) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["suite", "test", "nodeid"] + [c.header for c in m.columns])
    for r in m.rows:
        row = [r.suite, r.test, r.nodeid]
        for c in m.columns:
            cell = r.cells.get(c.key)
            if cell is None or not cell.outcomes:
                row.append("")
            else:
                d = cell.detail if cell.worst in (XFAILED, XPASSED, SKIPPED) else ""
                row.append(cell.text + (f" ({d})" if d else ""))
        w.writerow(row)
    return buf.getvalue()


_CSS = """
:root { --pass:#2e7d32; --pass-bg:#e3f4e4; --fail:#b71c1c; --fail-bg:#fdd9d7; --error:#6a1b9a;
  --error-bg:#f1dcf7; --xfail:#8a6100; --xfail-bg:#fff1c2; --xpass:#0d47a1; --xpass-bg:#d6e6fb;
  --skip:#555; --skip-bg:#eeeeee; --infra:#4e342e; --infra-bg:#ffd9b8; }
* { box-sizing: border-box; }
body { font: 14px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 16px;
  color: #1b1b1b; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
p.meta { margin: 0 0 10px; color: #555; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 14px; margin: 8px 0 14px; padding: 8px 10px;
  border: 1px solid #ddd; border-radius: 6px; background: #fafafa; }
.legend .item { display: flex; align-items: center; gap: 6px; }
.legend .cell { min-width: 56px; padding: 2px 6px; }
table.matrix { border-collapse: separate; border-spacing: 0; }
table.matrix th, table.matrix td { border-bottom: 1px solid #e4e4e4; border-right: 1px solid #e4e4e4;
  padding: 3px 6px; }
table.matrix { font-size: 12.5px; }
table.matrix thead { position: sticky; top: 0; z-index: 3; }
table.matrix thead th { background: #f4f6f8; vertical-align: bottom; font-weight: 600; text-align: center;
  min-width: 62px; max-width: 104px; border-bottom: 2px solid #bbb; padding: 2px 4px; }
table.matrix thead th.test { text-align: left; min-width: 180px; max-width: 230px; }
table.matrix thead tr.vendors th { border-bottom: 2px solid #263238; font-size: 13px; letter-spacing: .04em; }
table.matrix thead tr.vendors th.v-intel { background: #dbe9f7; }
table.matrix thead tr.vendors th.v-amd { background: #f7dedb; }
tr.verdict td.test { font-family: inherit; font-weight: 600; }
tr.verdict td.cell { font-size: 12px; white-space: normal; overflow-wrap: anywhere; }
td.cell { max-width: 104px; }
.cell.untested { color: #5d4037; background: repeating-linear-gradient(135deg, #eee 0 5px, #ddd 5px 10px); }
.cell.count { color: #333; background: #fff; font-weight: 400; white-space: normal; }
th .models, th .hosts { display: block; font-weight: 400; color: #555; font-size: 12px; }
th.sim { background: repeating-linear-gradient(135deg, #f4f6f8 0 6px, #e2e6ea 6px 12px) !important;
  border-top: 2px dashed #888; }
th.sim .simtag { display: inline-block; font-size: 11px; padding: 0 4px; border: 1px dashed #666;
  border-radius: 3px; margin-left: 3px; background: #fff; }
tr.suite th { text-align: left; background: #263238; color: #fff; padding: 5px 8px; font-size: 14px; }
td.test { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12px;
  max-width: 230px; overflow-wrap: anywhere; }  /* wraps: the parameters at the end must stay visible */
table.matrix td { padding: 2px 4px; }
td.test { position: sticky; left: 0; background: #fff; z-index: 1; }
thead th.test { left: 0; z-index: 3; }
tr.jobrow td.test { font-style: italic; color: #4e342e; }
td.cell, span.cell { text-align: center; white-space: nowrap; font-weight: 600; border-radius: 0; }
span.cell { display: inline-block; border-radius: 4px; }
.cell.pass { color: var(--pass); background: var(--pass-bg); }
.cell.fail { color: #fff; background: var(--fail); }
.cell.error { color: #fff; background: var(--error); }
.cell.xfail { color: var(--xfail); background: var(--xfail-bg); }
.cell.xpass { color: var(--xpass); background: var(--xpass-bg); }
.cell.skip { color: var(--skip); background: var(--skip-bg); font-weight: 400; }
.cell.infra, .cell.timeout { color: var(--infra); background: var(--infra-bg); }
.cell.none { color: #bbb; font-weight: 400; background: #fff; }
td.cell.sim { outline: 1px dashed rgba(0,0,0,.35); outline-offset: -3px; }
.cell .d { display: block; font-size: 11px; font-weight: 400; max-width: 100px; overflow: hidden;
  text-overflow: ellipsis; margin: 0 auto; }
tbody tr:hover td { filter: brightness(0.96); }
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _render_html(m: Matrix) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{_esc(m.title)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{_esc(m.title)}</h1>"]
    nsim = sum(1 for c in m.columns if c.simulated)
    meta = f"{len(m.rows)} rows × {len(m.columns)} microarchitecture columns"
    if m.run_ids:
        meta = f"run {', '.join(m.run_ids)} · " + meta
    if nsim:
        meta += f" · {nsim} simulated (hatched header, dashed cells)"
    parts.append(f'<p class="meta">{_esc(meta)}</p>')
    parts.append('<div class="legend" id="legend"><strong>Legend</strong>')
    for word, desc in LEGEND:
        parts.append(f'<span class="item"><span class="cell {word}">{word}</span>{_esc(desc)}</span>')
    parts.append('<span class="item">cells show worst outcome and count/total; hover a cell for '
                 'hosts, messages, errata and skip reasons</span></div>')
    parts.append('<table class="matrix" id="matrix"><thead><tr class="vendors"><th class="test" rowspan="2">'
                 'test</th>')
    groups: list[list[Column]] = []
    for c in m.columns:  # columns are sorted by vendor: consecutive runs form the groups
        if groups and groups[-1][0].vendor == c.vendor:
            groups[-1].append(c)
        else:
            groups.append([c])
    for g in groups:
        parts.append(f'<th class="vendor v-{_esc(g[0].vendor)}" colspan="{len(g)}" data-vendor="{_esc(g[0].vendor)}">'
                     f'{_esc(_vendor_label(g[0].vendor))}</th>')
    parts.append("</tr><tr>")
    for c in m.columns:
        cls = "col sim" if c.simulated else "col"
        tag = ' <span class="simtag">sim</span>' if c.simulated else ""
        name = c.uarch_name or c.uarch
        title = f"{c.label}: {c.vendor} {c.uarch}, models {', '.join(c.models) or '?'}; hosts: " \
                + ", ".join(c.hosts[:20]) + (f" +{len(c.hosts) - 20} more" if len(c.hosts) > 20 else "")
        n = len(c.hosts)
        parts.append(
            f'<th class="{cls}" data-col="{_esc(c.key)}" data-simulated="{str(c.simulated).lower()}" '
            f'title="{_esc(title)}">{_esc(name)}{tag}<span class="models">{_esc(", ".join(c.models))}'
            f'</span><span class="hosts">{n} host{"s" if n != 1 else ""}</span></th>')
    parts.append("</tr></thead><tbody>")
    ncols = len(m.columns) + 1
    parts.append(f'<tr class="suite"><th colspan="{ncols}">per column: does it work on this CPU?</th></tr>')
    for label, values in _verdict_rows(m):
        parts.append(f'<tr class="verdict" data-row="{_esc(label)}"><td class="test">{_esc(label)}</td>')
        for c, (text, cls, hover) in zip(m.columns, values, strict=True):
            parts.append(f'<td class="cell {cls}" data-col="{_esc(c.key)}" title="{_esc(hover)}">'
                         + "<br>".join(_esc(x) for x in text.split(" · ")) + "</td>")
        parts.append("</tr>")
    for suite in m.suites:
        parts.append(f'<tr class="suite"><th colspan="{ncols}">{_esc(suite)}</th></tr>')
        for r in m.rows:
            if r.suite != suite:
                continue
            rcls = ' class="jobrow"' if r.nodeid == "" else ""
            parts.append(f'<tr{rcls} data-test="{_esc(r.nodeid or suite + "::[job]")}">'
                         f'<td class="test" title="{_esc(r.nodeid or "job-level outcome")}">{_esc(r.test)}</td>')
            for c in m.columns:
                cell = r.cells.get(c.key)
                sim = " sim" if c.simulated else ""
                if cell is None or not cell.outcomes:
                    parts.append(f'<td class="cell none{sim}" data-col="{_esc(c.key)}" '
                                 f'title="not run here">–</td>')
                    continue
                detail = cell.detail if cell.worst in (XFAILED, XPASSED, SKIPPED) else ""
                dhtml = f'<span class="d">{_esc(detail)}</span>' if detail else ""
                parts.append(
                    f'<td class="cell {cell.word}{sim}" data-col="{_esc(c.key)}" '
                    f'data-outcome="{cell.worst}" title="{_esc(cell.title())}">'
                    f'{cell.word} {cell.worst_count}/{cell.total}{dhtml}</td>')
            parts.append("</tr>")
    parts.append("</tbody></table></body></html>")
    return "\n".join(parts) + "\n"
