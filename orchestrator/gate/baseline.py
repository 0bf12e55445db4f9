"""Baselines: which stored results count as "the base kernel on this kind of CPU", and finding them.

A candidate result is only ever compared with a baseline result for the same **host class** and the
same test. Host class (``host_class``) = what the agent probed, never the inventory:
``<vendor>-<uarch>-<family>-<model>`` (hex), ``-sim`` for simulated hosts, ``+<errata ids>`` (a
microcode/stepping with other errata bends other tests) and, for simulated hosts, ``!<faults>``: the
host's *own* injected faults (inventory), not the ones the kernel under test maps to, which are
recorded per run in ``meta.gate.kernel_faults``. Two hosts of one class are interchangeable.

A stored job is a reusable baseline for (class, suite) when its run

* finished (``status == done``), has ``meta.role == "baseline"`` and ``meta.base`` == the base sha;
* was built with the same build command (``meta.gate.build``, sha256 of the command line);
* ran the same suite code (``meta.gate.suites_digest[suite]``: sha256 over the suite's files and
  ``suites/conftest.py`` in the orchestrator's tree; a changed test invalidates the baseline);

and the job itself completed (not ``infra_error``/``timeout``). The newest such job wins. Classes
without one get a fresh baseline run (only on the hosts that need it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.store import Store

INFRA = {"infra_error", "timeout"}
RUN_SCAN_LIMIT = 500


def host_class(facts: dict[str, Any], kernel_faults: Iterable[str] = ()) -> str | None:
    cpu = facts.get("cpu") or {}
    if not cpu.get("vendor"):
        return None

    def hx(v: Any) -> str:
        return f"{v:02x}" if isinstance(v, int) else "unknown"

    key = f"{cpu.get('vendor')}-{cpu.get('uarch') or 'unknown'}-{hx(cpu.get('family'))}-{hx(cpu.get('model'))}"
    if facts.get("simulated"):
        key += "-sim"
    errata = sorted({str(e.get("id")) for e in facts.get("errata") or [] if isinstance(e, dict)})
    if errata:
        key += "+" + "+".join(errata)
    own = sorted(set(facts.get("faults") or []) - set(kernel_faults))
    if own:
        key += "!" + ",".join(own)
    return key


def job_class(job: dict[str, Any], run_meta: dict[str, Any]) -> str | None:
    kfaults = ((run_meta.get("gate") or {}).get("kernel_faults") or {}).get(job["host"], [])
    return host_class(job.get("facts") or {}, kfaults)


def build_digest(cmd: str) -> str:
    return hashlib.sha256(cmd.encode()).hexdigest()[:16]


def suites_digest(suites: list[str], root: Path) -> dict[str, str]:
    """sha256 per suite over its files (relative path + content) and the suites' conftest.py."""
    out = {}
    conftest = root / "suites" / "conftest.py"
    for s in suites:
        h = hashlib.sha256()
        files = [conftest] if conftest.exists() else []
        files += sorted(p for p in (root / "suites" / s).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"))
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
        out[s] = h.hexdigest()[:16]
    return out


def find_baselines(store: Store, base_sha: str, build: str, digests: dict[str, str],
                   exclude_runs: Iterable[str] = ()) -> dict[tuple[str, str], dict[str, Any]]:
    """(class, suite) -> the newest reusable baseline job, with ``run_id`` and ``run_meta`` added."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    skip = set(exclude_runs)
    for run in store.runs(RUN_SCAN_LIMIT):
        meta = run.get("meta") or {}
        gate = meta.get("gate") or {}
        if (run["status"] != "done" or run["id"] in skip or meta.get("role") != "baseline"
                or meta.get("base") != base_sha or gate.get("build") != build):
            continue
        run_digests = gate.get("suites_digest") or {}
        for job in _latest(store.jobs(run["id"])):
            suite = job["suite"]
            if job["status"] in INFRA or digests.get(suite) is None or run_digests.get(suite) != digests[suite]:
                continue
            cls = job_class(job, meta)
            if cls is None or (cls, suite) in found:
                continue
            found[(cls, suite)] = {**job, "run_meta": meta}
    return found


def _latest(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for j in jobs:
        k = (j["host"], j["suite"])
        if k not in best or j["attempt"] >= best[k]["attempt"]:
            best[k] = j
    return list(best.values())
