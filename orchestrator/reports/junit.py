"""JUnit XML: one file per CPU model and errata set, one testsuite per host and suite.

Valid against the strict Ant/Jenkins JUnit schema (windyroad JUnit.xsd, shared/reference/junit/;
``tests/test_reports.py`` validates every file with lxml). That schema is what decides the shape:

* ``<testsuites>`` carries no attributes; each ``<testsuite>`` has name, package, id (0-based within
  the file), hostname, timestamp (UTC, seconds, no zone: the schema's pattern), tests, failures,
  errors, skipped and time, then ``<properties>``, the ``<testcase>``s, ``<system-out>`` and
  ``<system-err>`` (both required, in that order);
* a ``<testcase>`` has name, classname and time only (no ``file``), and at most one of
  ``<failure>``/``<error>``/``<skipped>``; ``<skipped>`` takes only a message, so an erratum xfail
  says so in it: ``message="xfail: SRF7: ..."``; a plain skip's message is its reason.

Neither junit-xml (``testcase@file``, ``testsuite@disabled``, totals on the root) nor pytest's own
``--junitxml`` (no package/id, timestamps with fractions and a zone, ``skipped@type``) produce that,
and the agent's pytest file lives on the farm host anyway; so the document is built here with
ElementTree from the stored results.

Every failure carries a message and, as its body, the assertion and the traceback pytest printed
(the result's ``details``); a failure with no message at all says ``"failed (no message)"`` with the
job's log tail as body, so it can never read as passed.

Layout for CI consumers: GitLab ignores suite names and properties and shows ``classname`` as the
suite, so the host goes into ``classname = <host>.<suite>.<module>[.<Class>]`` (dots in a host
name become ``_``). Each ``<testsuite name="<host>/<suite>">`` carries the host facts as
properties (host, vendor, uarch, family, model, stepping, microcode, kernel, mediated, simulated,
driver, errata, tested and a few more). A job that ended ``infra_error``/``timeout`` (or ``error``
with no test results) adds one ``<error type="<status>">`` testcase named ``[job] <status>`` whose
message states the cause and whose text is the log tail; tests that did report before a timeout are
kept, and the test that hung gets its own ``<error type="timeout">``. A ``no_tests`` job becomes one
skipped case, so an empty suite is visible rather than missing.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .naming import (
    ERROR,
    FAILED,
    HUNG,
    NO_VERDICT_STATUSES,
    SKIPPED,
    XFAILED,
    XPASSED,
    CpuId,
    driver_of,
    erratum_of,
    first_line,
    job_cause,
    job_cpu,
    junit_filename,
    kernel_release,
    latest_attempts,
    mediated_status,
    not_tested_reason,
    parse_test,
    rfc3339,
    xml_clean,
)

NO_MESSAGE = "failed (no message)"
REQUIRED_PROPERTIES = ("host", "vendor", "uarch", "family", "model", "stepping", "microcode", "kernel",
                       "mediated", "simulated", "driver", "errata")
_TAIL_LIMIT = 8000


def _s(value: Any) -> str:
    if value is None or value == "":
        return "unknown"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def suite_properties(run: Mapping[str, Any], job: Mapping[str, Any], cpu: CpuId) -> dict[str, str]:
    facts = job.get("facts") or {}
    kernel = run.get("kernel") or {}
    pmu = facts.get("pmu") or {}
    props = {
        "host": job.get("host"),
        "vendor": cpu.vendor,
        "uarch": cpu.uarch,
        "uarch_name": cpu.uarch_name,
        "family": cpu.family,
        "model": cpu.model,
        "stepping": cpu.stepping,
        "cpuid": (f"{cpu.family:02x}-{cpu.model:02x}-{cpu.stepping:02x}"
                  if None not in (cpu.family, cpu.model, cpu.stepping) else None),
        "microcode": cpu.microcode,
        "kernel": kernel_release(job),
        "kernel_tree": kernel.get("tree"),
        "kernel_commit": kernel.get("commit"),
        "patchset_hash": kernel.get("patchset_hash"),
        "mediated": mediated_status(job),
        "mediated_reasons": "; ".join((facts.get("mediated_pmu") or {}).get("reasons") or []) or None,
        "simulated": cpu.simulated,
        "driver": driver_of(job),
        "errata": ",".join(cpu.errata) if cpu.errata else ("none" if cpu.known else "unknown"),
        "pmu_version": pmu.get("version"),
        "gp_counters": pmu.get("gp_counters"),
        "fixed_counters": pmu.get("fixed_counters"),
        "facts_known": cpu.known,
        "run_id": job.get("run_id") or run.get("id"),
        "suite": job.get("suite"),
        "attempt": job.get("attempt"),
        "job_status": job.get("status"),
        "exit_code": job.get("exit_code"),
        # false when no test of the suite's subject ran here (all skipped for a missing fact): not a pass
        "tested": "false" if (untested := not_tested_reason(job)) else (
            "true" if job.get("status") in ("passed", "failed") else None),
        "not_tested_reason": untested,
    }
    # The facts every consumer may rely on are always present ("unknown" when unknown);
    # the extras only when known.
    return {k: xml_clean(_s(v)) for k, v in props.items()
            if k in REQUIRED_PROPERTIES or v not in (None, "")}


def _host_token(host: str) -> str:
    return (host or "unknown").replace(".", "_")


def _timestamp(*values: Any) -> str:
    """The first parseable value as the schema wants it: UTC, whole seconds, no zone."""
    for value in values:
        stamp = rfc3339(value)
        if stamp:
            dt = datetime.fromisoformat(stamp).astimezone(UTC)
            return dt.strftime("%Y-%m-%dT%H:%M:%S")
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _case(name: str, classname: str, duration: float | None) -> ET.Element:
    return ET.Element("testcase", {"name": xml_clean(name) or "unknown", "classname": xml_clean(classname),
                                   "time": f"{duration or 0.0:.3f}"})


def _result(case: ET.Element, tag: str, message: str, body: str | None, kind: str | None = None) -> None:
    attrs = {"message": xml_clean(message).strip()}
    if kind is not None:
        attrs["type"] = kind  # required on <failure>/<error>, not allowed on <skipped>
    el = ET.SubElement(case, tag, attrs)
    if body:
        el.text = xml_clean(body)


def _body(test: Mapping[str, Any]) -> str:
    """The message, then the assertion and traceback as pytest printed them."""
    message, details = test.get("message") or "", test.get("details") or ""
    return f"{message}\n\n{details}" if details and message and message not in details else (details or message)


def _cases_for_job(job: Mapping[str, Any]) -> tuple[list[ET.Element], dict[str, Any], list[str]]:
    """<testcase> elements, the counts (tests/failures/errors/skipped/time) and lines for system-out."""
    host = job.get("host") or "unknown"
    suite = job.get("suite") or "unknown"
    prefix = f"{_host_token(host)}.{suite}."
    cases: list[ET.Element] = []
    out: list[str] = []
    n: dict[str, Any] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    tail = None
    for t in job.get("tests") or ():
        tn = parse_test(t)
        duration = t.get("duration") or None
        case = _case(tn.name, prefix + tn.module + (f".{tn.cls}" if tn.cls else ""), duration)
        outcome = t.get("outcome")
        message = t.get("message") or ""
        if outcome == FAILED:
            if message.strip():
                _result(case, "failure", first_line(message), _body(t), "failure")
            else:
                if tail is None:
                    tail = (job.get("log_tail") or "")[-_TAIL_LIMIT:]
                _result(case, "failure", NO_MESSAGE, f"{t.get('nodeid')} on {host}: the result carried no "
                        f"message.\n{t.get('details') or ''}\n--- job log tail ---\n{tail or '(empty)'}", "failure")
            n["failures"] += 1
        elif outcome == ERROR:
            _result(case, "error", first_line(message) or "error (no message)",
                    _body(t) or f"{t.get('nodeid')} on {host}: error without message", "error")
            n["errors"] += 1
        elif outcome == HUNG:
            _result(case, "error", first_line(message) or "hung", message or None, HUNG)
            n["errors"] += 1
        elif outcome == XFAILED:
            erratum = erratum_of(t)
            text = message or (f"{erratum}: expected failure" if erratum else "expected failure")
            if erratum and not text.startswith(erratum):
                text = f"{erratum}: {text}"
            _result(case, "skipped", "xfail: " + first_line(text, 500), message or None)
            n["skipped"] += 1
        elif outcome == SKIPPED:
            _result(case, "skipped", first_line(message, 500) or "skipped", message or None)
            n["skipped"] += 1
        elif outcome == XPASSED:
            # A non-strict XPASS is a pass for JUnit; say which erratum did not show.
            erratum = erratum_of(t)
            out.append(f"XPASS {tn.name}: erratum {erratum} did not manifest" if erratum else f"XPASS {tn.name}")
        elif outcome != "passed":
            _result(case, "error", f"unknown outcome {outcome!r}", message or None, "unknown_outcome")
            n["errors"] += 1
        n["tests"] += 1
        n["time"] += duration or 0.0
        cases.append(case)

    status = job.get("status")
    has_tests = bool(cases)
    hung = any(t.get("outcome") == HUNG for t in job.get("tests") or ())
    if hung:
        pass  # the hung test's own <error type="timeout"> already says it
    elif status in ("infra_error", "timeout") or (status in NO_VERDICT_STATUSES and not has_tests):
        case = _case(f"[job] {status}", f"{prefix}job", None)
        _result(case, "error", job_cause(job), (job.get("log_tail") or "")[-_TAIL_LIMIT:] or "(no log output)",
                str(status))
        cases.append(case)
        n["tests"] += 1
        n["errors"] += 1
    elif status == "no_tests" and not has_tests:
        case = _case("[job] no_tests", f"{prefix}job", None)
        _result(case, "skipped", "no tests collected", job.get("log_tail") or None)
        cases.append(case)
        n["tests"] += 1
        n["skipped"] += 1
    return cases, n, out


def build_junit_files(run: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]]
                      ) -> dict[str, tuple[ET.Element, list[dict]]]:
    """filename -> (<testsuites> root, per-suite summaries). Pure: nothing is written."""
    groups: dict[str, list[tuple[Mapping[str, Any], CpuId]]] = defaultdict(list)
    for job in latest_attempts(jobs):
        cpu = job_cpu(job)
        groups[junit_filename(cpu)].append((job, cpu))

    out: dict[str, tuple[ET.Element, list[dict]]] = {}
    for fname in sorted(groups):
        members = sorted(groups[fname], key=lambda jc: (str(jc[0].get("host")), str(jc[0].get("suite"))))
        root = ET.Element("testsuites")
        summaries = []
        for index, (job, cpu) in enumerate(members):
            cases, n, notes = _cases_for_job(job)
            host = job.get("host") or "unknown"
            el = ET.SubElement(root, "testsuite", {
                "name": xml_clean(f"{host}/{job.get('suite')}"),
                "package": xml_clean(f"{_host_token(host)}.{job.get('suite')}"),
                "id": str(index),
                "hostname": xml_clean(host),
                "timestamp": _timestamp(job.get("started"), job.get("finished"), run.get("created")),
                **{k: str(n[k]) for k in ("tests", "failures", "errors", "skipped")},
                "time": f"{n['time']:.3f}",
            })
            props = ET.SubElement(el, "properties")
            for name, value in suite_properties(run, job, cpu).items():
                ET.SubElement(props, "property", {"name": name, "value": value})
            el.extend(cases)
            ET.SubElement(el, "system-out").text = xml_clean("\n".join(notes)) if notes else None
            ET.SubElement(el, "system-err")
            summaries.append({"host": host, "suite": job.get("suite"), **n})
        out[fname] = (root, summaries)
    return out


def write_junit(run: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]], junit_dir: Path,
                pretty: bool = True) -> dict[str, Path]:
    """Write ``junit_dir/<name>.xml`` files; stale ``*.xml`` from an earlier rendering are removed.

    Returns {"junit/<name>.xml": path}.
    """
    junit_dir.mkdir(parents=True, exist_ok=True)
    built = build_junit_files(run, jobs)
    written: dict[str, Path] = {}
    for fname, (root, _) in built.items():
        if pretty:
            ET.indent(root, space=" ")
        path = junit_dir / fname
        tmp = path.with_suffix(".xml.tmp")
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, path)
        written[f"junit/{fname}"] = path
    for stale in junit_dir.glob("*.xml"):
        if f"junit/{stale.name}" not in written:
            stale.unlink()
    return written
