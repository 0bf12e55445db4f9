"""JUnit XML: one file per CPU model and errata set, one testsuite per host and suite.

Written with junit-xml (the project's dependency, ``TestSuite.build_xml_doc``) and post-processed
with ElementTree, because junit-xml alone gets three things wrong for a farm
(shared/reference/stack.md §4):

* it silently drops a ``<failure>``/``<error>`` with neither message nor output, so the case reads
  as passed: every failure here carries a message (``"failed (no message)"`` plus the node id and
  the job's log tail as output when the result had none);
* it always writes ``<skipped type="skipped">``: xfails are rewritten to
  ``<skipped type="xfail" message="SRF7: ...">`` (pytest's own convention is ``pytest.xfail``),
  plain skips to ``type="skip"`` with the skip reason as message;
* its ``<testsuites>`` root sums tests/failures/errors/time but not ``skipped``: the root is built
  here with all four totals computed from the results.

Layout for CI consumers: GitLab ignores suite names and properties and shows ``classname`` as the
suite, so the host goes into ``classname = <host>.<suite>.<module>[.<Class>]`` (dots in a host
name become ``_``). Each ``<testsuite name="<host>/<suite>">`` carries the host facts as
properties (host, vendor, uarch, family, model, stepping, microcode, kernel, mediated, simulated,
driver, errata and a few more). A job that ended ``infra_error``/``timeout`` (or ``error`` with
no test results) adds one ``<error type="<status>">`` testcase named ``[job] <status>`` whose
message states the cause and whose text is the log tail; tests that did report before a timeout
are kept. A ``no_tests`` job becomes one ``<skipped type="no_tests">`` case, so an empty
suite is visible rather than missing.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from junit_xml import TestCase, TestSuite

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


def _cases_for_job(job: Mapping[str, Any]) -> tuple[list[TestCase], list[str | None], dict[str, int]]:
    """junit-xml cases, the <skipped> type each needs, and the counts (tests/failures/errors/skipped)."""
    host = job.get("host") or "unknown"
    suite = job.get("suite") or "unknown"
    prefix = f"{_host_token(host)}.{suite}."
    cases: list[TestCase] = []
    skip_types: list[str | None] = []
    n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    tail = None
    for t in job.get("tests") or ():
        tn = parse_test(t)
        classname = prefix + tn.module + (f".{tn.cls}" if tn.cls else "")
        duration = t.get("duration") or None
        case = TestCase(xml_clean(tn.name), classname=xml_clean(classname), elapsed_sec=duration,
                        file=tn.path or None)
        outcome = t.get("outcome")
        message = xml_clean(t.get("message") or "")
        skip_type = None
        if outcome == FAILED:
            if message.strip():
                case.add_failure_info(first_line(message), message, "failure")
            else:
                if tail is None:
                    tail = xml_clean((job.get("log_tail") or "")[-_TAIL_LIMIT:])
                case.add_failure_info(NO_MESSAGE, f"{t.get('nodeid')} on {host}: the result carried no "
                                      f"message.\n--- job log tail ---\n{tail or '(empty)'}", "failure")
            n["failures"] += 1
        elif outcome == ERROR:
            case.add_error_info(first_line(message) or "error (no message)",
                                message or f"{t.get('nodeid')} on {host}: error without message", "error")
            n["errors"] += 1
        elif outcome == XFAILED:
            erratum = erratum_of(t)
            text = message or (f"{erratum}: expected failure" if erratum else "expected failure")
            if erratum and not text.startswith(erratum):
                text = f"{erratum}: {text}"
            case.add_skipped_info(first_line(text, 500), message or None)
            skip_type = "xfail"
            n["skipped"] += 1
        elif outcome == SKIPPED:
            case.add_skipped_info(first_line(message, 500) or "skipped", message or None)
            skip_type = "skip"
            n["skipped"] += 1
        elif outcome == XPASSED:
            # A non-strict XPASS is a pass for JUnit; say which erratum did not show.
            erratum = erratum_of(t)
            case.stdout = f"XPASS: erratum {erratum} did not manifest" if erratum else "XPASS"
        elif outcome == HUNG:
            case.add_error_info(first_line(message) or "hung", message or None, HUNG)
            n["errors"] += 1
        elif outcome != "passed":
            case.add_error_info(f"unknown outcome {outcome!r}", message or None, "unknown_outcome")
            n["errors"] += 1
        n["tests"] += 1
        n["time"] += duration or 0.0
        cases.append(case)
        skip_types.append(skip_type)

    status = job.get("status")
    has_tests = bool(cases)
    hung = any(t.get("outcome") == HUNG for t in job.get("tests") or ())
    if hung:
        pass  # the hung test's own <error type="timeout"> already says it
    elif status in ("infra_error", "timeout") or (status in NO_VERDICT_STATUSES and not has_tests):
        case = TestCase(f"[job] {status}", classname=f"{prefix}job")
        out = xml_clean((job.get("log_tail") or "")[-_TAIL_LIMIT:]) or "(no log output)"
        case.add_error_info(xml_clean(job_cause(job)), out, str(status))
        cases.append(case)
        skip_types.append(None)
        n["tests"] += 1
        n["errors"] += 1
    elif status == "no_tests" and not has_tests:
        case = TestCase("[job] no_tests", classname=f"{prefix}job")
        case.add_skipped_info("no tests collected", xml_clean(job.get("log_tail") or "") or None)
        cases.append(case)
        skip_types.append("no_tests")
        n["tests"] += 1
        n["skipped"] += 1
    return cases, skip_types, n


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
        totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
        summaries = []
        for job, cpu in members:
            cases, skip_types, n = _cases_for_job(job)
            host = job.get("host") or "unknown"
            ts = TestSuite(xml_clean(f"{host}/{job.get('suite')}"), cases, hostname=xml_clean(host),
                           id=str(job.get("attempt") or ""),
                           timestamp=rfc3339(job.get("started")),
                           package=xml_clean(f"{_host_token(host)}.{job.get('suite')}"),
                           properties=suite_properties(run, job, cpu))
            el = ts.build_xml_doc()
            # Post-process: <skipped> type per case, exact counts on the suite.
            idx = 0
            for child in el:
                if child.tag != "testcase":
                    continue
                want = skip_types[idx]
                idx += 1
                if want:
                    sk = child.find("skipped")
                    if sk is not None:
                        sk.set("type", want)
            for key in ("tests", "failures", "errors", "skipped"):
                el.set(key, str(n[key]))
                totals[key] += n[key]
            el.set("time", f"{n['time']:.3f}")
            totals["time"] += n["time"]
            root.append(el)
            summaries.append({"host": host, "suite": job.get("suite"), **n})
        for key in ("tests", "failures", "errors", "skipped"):
            root.set(key, str(totals[key]))
        root.set("time", f"{totals['time']:.3f}")
        root.set("name", xml_clean(f"pmufarm {run.get('id', '')} {fname[:-4]}"))
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
