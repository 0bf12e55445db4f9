"""KCIDB JSON (schema v5, whatever minor ``kcidb_io.schema.LATEST`` is: v5.3 with kcidb-io 141).

Objects (all IDs ``pmufarm:<...>``, deterministic, so resubmitting a run updates the same objects):

* one checkout ``pmufarm:<run-id>``: origin, ``tree_name``, ``git_commit_hash`` (only if it is a
  full 40-hex sha1), ``patchset_hash`` (the gate's hash; ``""`` when a commit is known and no
  patches were applied, omitted when nothing is known), ``git_repository_url`` if https;
* one build per kernel release the hosts booted: ``pmufarm:<run-id>:kernel:<release>``,
  ``architecture`` x86_64, status PASS (the kernel booted and ran the tests; pmufarm does not
  build kernels, ``misc.built_by_pmufarm`` is false);
* one test per test result, path ``pmufarm.<suite>.<module>.<func>[.<params>]`` (``Class`` adds a
  component; every component reduced to ``[A-Za-z0-9_-]``; the module keeps paths unique and
  stable when a suite grows), plus one suite-level test ``pmufarm.<suite>`` per job that produced
  no complete verdict. ``environment.comment`` names host and CPU, ``environment.misc`` carries the
  host facts that matter (vendor, uarch, family/model/stepping, microcode, kernel, mediated,
  errata, PMU shape, simulated).

Status mapping (schema text in kcidb_io/schema/v05_03.py, ``$defs.status``):
    passed -> PASS; failed -> FAIL; error -> ERROR ("didn't complete due to a failure in its code");
    skipped -> SKIP ("not applicable"); xpassed -> PASS (the code behaved; misc notes the erratum
    that did not show);
    xfailed -> DONE. The schema's PASS means "reported the tested code as correct" and SKIP "did not
    run or complete"; an erratum xfail ran to completion but attributes a deviation to the
    hardware, i.e. it "completed and had not reported the status of the tested code" — DONE's
    definition. DONE ranks below PASS, so it never drags a summary down, and it is not a silent
    PASS (DESIGN: an erratum-bent test is "never silently passed"). ``misc.outcome`` = "xfailed",
    ``misc.erratum`` and ``comment`` carry the erratum id and message.
    Job-level: infra_error -> MISS ("didn't run due to a failure in the test harness");
    timeout -> ERROR (the suite started and did not complete; the cause - harness, test or a hung
    kernel - is unknown, so it must not read as FAIL, but it ranks above MISS); job error without
    results -> ERROR; no_tests -> SKIP.

Simulated hosts (model driver) did not run the kernel under test, so their results are left out of
KCIDB by default (``include_simulated=True`` keeps them, marked ``misc.simulated`` and "(simulated)"
in the environment comment). Jobs whose host never answered are kept (as MISS) unless their
inventory entry says they are simulated.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from .naming import (
    ERROR,
    FAILED,
    NO_VERDICT_STATUSES,
    PASSED,
    SKIPPED,
    XFAILED,
    XPASSED,
    CpuId,
    erratum_of,
    job_cpu,
    kernel_release,
    latest_attempts,
    mediated_status,
    parse_test,
    rfc3339,
)

ORIGIN = "pmufarm"
STATUS = {PASSED: "PASS", FAILED: "FAIL", ERROR: "ERROR", SKIPPED: "SKIP", XFAILED: "DONE",
          XPASSED: "PASS"}
JOB_STATUS = {"infra_error": "MISS", "timeout": "ERROR", "error": "ERROR", "no_tests": "SKIP"}
_COMPONENT = re.compile(r"[^A-Za-z0-9_-]+")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXCERPT = 16000


def schema_version() -> tuple[int, int]:
    """The installed kcidb-io's latest schema version. Importing kcidb_io (jsonschema) costs ~0.1-0.2 s, a
    tenth of a local submit: the answer is cached per installed kcidb-io version."""
    import importlib.metadata
    import os

    try:
        dist = importlib.metadata.version("kcidb-io")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pmufarm" / "kcidb-schema.json"
    if dist:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            major, minor = json.loads(cache.read_text())[dist]
            return int(major), int(minor)
    from kcidb_io.schema import LATEST

    if dist:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({dist: [LATEST.major, LATEST.minor]}))
            os.replace(tmp, cache)
    return LATEST.major, LATEST.minor


def path_component(text: str) -> str:
    return _COMPONENT.sub("_", text).strip("_") or "_"


_path_cache: dict[tuple[str, str], str] = {}


def kcidb_path(suite: str, test: Mapping[str, Any] | None) -> str:
    """KCIDB path of a test result (``None``: the suite node ``pmufarm.<suite>``)."""
    key = (suite, test.get("nodeid") or test.get("name") or "") if test is not None else (suite, "")
    hit = _path_cache.get(key)
    if hit is None:
        hit = _kcidb_path(suite, test)
        if len(_path_cache) < 200_000:
            _path_cache[key] = hit
    return hit


def _kcidb_path(suite: str, test: Mapping[str, Any] | None) -> str:
    parts = [ORIGIN, path_component(suite)]
    if test is not None:
        tn = parse_test(test)
        parts.append(path_component(tn.module))
        if tn.cls:
            parts += [path_component(c) for c in tn.cls.split(".")]
        parts.append(path_component(tn.func))
        if tn.params:
            parts.append(path_component(tn.params))
    return ".".join(parts)


def _no_nul(text: Any) -> str:
    return str(text).replace("\0", "")


def environment(job: Mapping[str, Any], cpu: CpuId) -> dict[str, Any]:
    facts = job.get("facts") or {}
    pmu = facts.get("pmu") or {}
    host = str(job.get("host") or "unknown")
    model = (f"{cpu.family:02X}-{cpu.model:02X}" if cpu.family is not None and cpu.model is not None
             else "??-??")
    step = f"-{cpu.stepping:02X}" if cpu.stepping is not None else ""
    comment = f"{host}: {cpu.vendor} {cpu.uarch_name} {model}{step}"
    if cpu.microcode:
        comment += f" ucode {cpu.microcode}"
    if cpu.errata:
        comment += f" errata {'+'.join(cpu.errata)}"
    if cpu.simulated:
        comment += " (simulated)"
    if not cpu.known:
        comment += " (host did not answer; CPU from inventory)" if cpu.vendor != "unknown" else \
            " (host did not answer)"
    misc = {"host": host, "vendor": cpu.vendor, "uarch": cpu.uarch, "family": cpu.family,
            "model": cpu.model, "stepping": cpu.stepping, "microcode": cpu.microcode,
            "kernel": kernel_release(job), "mediated_pmu": mediated_status(job),
            "simulated": cpu.simulated, "errata": list(cpu.errata),
            "pmu_version": pmu.get("version"), "gp_counters": pmu.get("gp_counters"),
            "fixed_counters": pmu.get("fixed_counters"), "perfmon_v2": pmu.get("perfmon_v2")}
    # KCIDB forbids null anywhere: drop unknowns (omitted = unknown).
    return {"comment": _no_nul(comment), "misc": {k: v for k, v in misc.items() if v is not None}}


def build_kcidb(run: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]],
                include_simulated: bool = False) -> dict[str, Any]:
    major, minor = schema_version()
    run_id = str(run.get("id") or "run")
    kernel = run.get("kernel") or {}
    checkout_id = f"{ORIGIN}:{run_id}"
    checkout: dict[str, Any] = {"id": checkout_id, "origin": ORIGIN,
                                "misc": {"run_id": run_id, "suites": list(run.get("suites") or [])}}
    if kernel.get("tree"):
        checkout["tree_name"] = _no_nul(kernel["tree"])
    commit = str(kernel.get("commit") or "").lower()
    if _SHA1.match(commit):
        checkout["git_commit_hash"] = commit
    elif commit:
        checkout["misc"]["commit"] = commit
    phash = str(kernel.get("patchset_hash") or "").lower()
    if _SHA256.match(phash):
        checkout["patchset_hash"] = phash
    elif phash:
        checkout["misc"]["patchset_hash"] = phash
    elif "git_commit_hash" in checkout:
        checkout["patchset_hash"] = ""
    url = kernel.get("url") or kernel.get("repo") or kernel.get("git_repository_url")
    if isinstance(url, str) and url.startswith("https://"):
        checkout["git_repository_url"] = url
    for key in ("branch", "git_repository_branch"):
        if kernel.get(key):
            checkout["git_repository_branch"] = _no_nul(kernel[key])
            break
    if rfc3339(run.get("created")):
        checkout["start_time"] = rfc3339(run.get("created"))

    builds: dict[str, dict[str, Any]] = {}
    tests: list[dict[str, Any]] = []
    finished: list[str] = []
    for job in latest_attempts(jobs):
        cpu = job_cpu(job)
        if cpu.simulated and not include_simulated:
            continue
        release = kernel_release(job)
        build_id = f"{ORIGIN}:{run_id}:kernel:{release}"
        if build_id not in builds:
            builds[build_id] = {"id": build_id, "origin": ORIGIN, "checkout_id": checkout_id,
                                "architecture": "x86_64", "status": "PASS",
                                "comment": _no_nul(f"kernel {release} as booted on the farm hosts"),
                                "misc": {"kernel_release": release, "built_by_pmufarm": False}}
        env = environment(job, cpu)
        host = str(job.get("host") or "unknown")
        suite = str(job.get("suite") or "unknown")
        start = rfc3339(job.get("started"))
        if rfc3339(job.get("finished")):
            finished.append(rfc3339(job.get("finished")))
        attempt = job.get("attempt")
        base_id = f"{ORIGIN}:{run_id}:{host}:"
        tlist = job.get("tests") or ()
        for t in tlist:
            outcome = t.get("outcome") or ERROR
            nodeid = str(t.get("nodeid") or t.get("name") or "unknown")
            obj: dict[str, Any] = {
                "id": _no_nul(base_id + nodeid), "origin": ORIGIN, "build_id": build_id,
                "path": kcidb_path(suite, t), "status": STATUS.get(outcome, "ERROR"),
                "environment": env,
            }
            # Host and simulated live in environment.misc; kept out of here to keep 100k results small.
            misc: dict[str, Any] = {"outcome": outcome, "nodeid": nodeid, "attempt": attempt}
            message = t.get("message") or ""
            if outcome in (XFAILED, XPASSED):
                erratum = erratum_of(t)
                if erratum:
                    misc["erratum"] = erratum
                obj["comment"] = _no_nul(
                    (f"expected failure ({erratum}): {message}" if outcome == XFAILED
                     else f"erratum {erratum} did not manifest (xpass)")[:2000])
            elif message:
                obj["comment"] = _no_nul(message.strip().split("\n", 1)[0][:2000])
            if message and outcome in (FAILED, ERROR):
                obj["log_excerpt"] = _no_nul(message[-_EXCERPT:])
            if start:
                obj["start_time"] = start
            if t.get("duration") is not None:
                obj["duration"] = float(t["duration"])
            obj["misc"] = {k: v for k, v in misc.items() if v is not None}
            tests.append(obj)
        status = job.get("status")
        if status in ("infra_error", "timeout") or (status in NO_VERDICT_STATUSES and not tlist) or \
                (status == "no_tests" and not tlist):
            obj = {"id": _no_nul(f"{base_id}{suite}:job"), "origin": ORIGIN, "build_id": build_id,
                   "path": kcidb_path(suite, None), "status": JOB_STATUS.get(str(status), "ERROR"),
                   "environment": env,
                   "comment": _no_nul(f"job {status} on {host}: no complete verdict for suite {suite}"),
                   "misc": {k: v for k, v in {"job_status": status, "exit_code": job.get("exit_code"),
                                              "host": host, "attempt": attempt,
                                              "simulated": cpu.simulated}.items() if v is not None}}
            tail = job.get("log_tail")
            if tail:
                obj["log_excerpt"] = _no_nul(str(tail)[-_EXCERPT:])
            if start:
                obj["start_time"] = start
            tests.append(obj)
    if finished:
        checkout["origin_tests_finish_time"] = max(finished, key=datetime.fromisoformat)
    return {"version": {"major": major, "minor": minor}, "checkouts": [checkout],
            "builds": list(builds.values()), "tests": tests}


def validate_kcidb(data: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless data is valid KCIDB (the installed kcidb_io)."""
    from kcidb_io.schema import LATEST
    LATEST.validate(data)
