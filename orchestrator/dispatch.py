"""Dispatch jobs to per-host queues and collect them into the store, with progress."""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from agent.celery_app import RUN_SUITE, host_queue
from orchestrator.inventory import Host
from orchestrator.store import FINAL_JOB_STATES, Store


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


@dataclass
class Pending:
    job_id: int
    host: Host
    suite: str
    attempt: int
    result: AsyncResult
    queued_at: float
    started_at: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    status: str = "queued"


def enqueue(app: Celery, store: Store, run_id: str, hosts: list[Host], suites: list[str], timeout: float,
            expires: float, only: dict[tuple[str, str], list[str]] | None = None) -> list[Pending]:
    """One job per (host, suite); ``only[(host, suite)]`` restricts a job to chosen test node ids."""
    pending = []
    for host in hosts:
        for suite in suites:
            selected = (only or {}).get((host.name, suite))
            if only is not None and not selected:
                continue
            job_id = store.add_job(run_id, host.entry(), suite)
            res = app.send_task(RUN_SUITE, kwargs={"host": host.entry(), "suite": suite, "run_id": run_id,
                                                   "attempt": 1, "timeout": timeout, "only": selected},
                                queue=host_queue(host.name), expires=expires)
            store.set_task(job_id, res.id)
            pending.append(Pending(job_id, host, suite, 1, res, time.monotonic()))
    return pending


def _infra(p: Pending, why: str) -> dict[str, Any]:
    return {"host": p.host.name, "suite": p.suite, "status": "infra_error", "exit_code": None, "facts": {},
            "tests": [], "log_tail": why}


def poll_once(store: Store, pending: list[Pending], timeout: float, expires: float) -> list[Pending]:
    """Advance every job one step; returns the jobs that changed (for progress output)."""
    changed = []
    for p in pending:
        if p.status in FINAL_JOB_STATES:
            continue
        state = p.result.state
        job: dict[str, Any] | None = None
        if state == "SUCCESS":
            job = p.result.result
        elif state == "FAILURE":
            job = {**_infra(p, f"agent task failed: {p.result.result!r}"), "status": "error"}
        elif state == "REVOKED":
            job = _infra(p, f"job expired: no agent took it within {expires:g}s (host {p.host.name} offline?)")
        elif state in ("STARTED", "PROGRESS"):
            if p.started_at is None:
                p.started_at = time.monotonic()
                store.mark_running(p.job_id)
                p.status = "running"
                changed.append(p)
            info = p.result.info if state == "PROGRESS" and isinstance(p.result.info, dict) else {}
            if info and info != p.progress:
                p.progress = info
                changed.append(p)
            if time.monotonic() - p.started_at > timeout + 120:
                job = {**_infra(p, f"no result {timeout + 120:g}s after the job started (agent lost?)"),
                       "status": "timeout"}
        elif time.monotonic() - p.queued_at > expires:
            p.result.revoke()
            job = _infra(p, f"job expired: no agent took it within {expires:g}s (host {p.host.name} offline?)")
        if job is not None:
            if not isinstance(job, dict) or job.get("status") not in FINAL_JOB_STATES:
                job = {**_infra(p, f"agent returned an unusable result: {str(job)[:200]}"), "status": "error"}
            store.finish_job(p.job_id, job)
            p.status = job["status"]
            p.progress = {"tests": job.get("tests", []), "log_tail": job.get("log_tail", "")}
            changed.append(p)
            p.result.forget()
    return changed


def outcome_counts(tests: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return counts


def describe(p: Pending) -> str:
    if p.status == "queued":
        return "queued"
    if p.status == "running":
        total = p.progress.get("total")
        done = p.progress.get("done", 0)
        cur = (p.progress.get("current") or "").split("::")[-1]
        return f"running {done}/{total if total is not None else '?'}" + (f"  {cur}" if cur else "")
    counts = outcome_counts(p.progress.get("tests", []))
    detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if p.status in ("infra_error", "timeout", "error") and not counts:
        detail = (p.progress.get("log_tail") or "").strip().splitlines()[0][:120] if p.progress.get("log_tail") else ""
    return f"{p.status}" + (f" ({detail})" if detail else "")


def wait(store: Store, pending: list[Pending], timeout: float, expires: float, interval: float = 0.2,
         tty: bool | None = None) -> None:
    tty = sys.stdout.isatty() if tty is None else tty
    if tty:
        _wait_rich(store, pending, timeout, expires, interval)
        return
    for p in pending:
        _line(f"{p.host.name} {p.suite}: queued")
    while any(p.status not in FINAL_JOB_STATES for p in pending):
        for p in poll_once(store, pending, timeout, expires):
            _line(f"{p.host.name} {p.suite}: {describe(p)}")
        time.sleep(interval)


def _line(text: str) -> None:
    print(f"{datetime.now().strftime('%H:%M:%S')} {text}", flush=True)


def _wait_rich(store: Store, pending: list[Pending], timeout: float, expires: float, interval: float) -> None:
    from rich.live import Live
    from rich.table import Table

    def table() -> Table:
        t = Table(box=None, pad_edge=False)
        for col in ("host", "suite", "state"):
            t.add_column(col)
        for p in pending:
            t.add_row(p.host.name, p.suite, describe(p))
        return t

    with Live(table(), refresh_per_second=4, transient=False) as live:
        while any(p.status not in FINAL_JOB_STATES for p in pending):
            if poll_once(store, pending, timeout, expires):
                live.update(table())
            time.sleep(interval)
        live.update(table())
