"""Execute one run end to end: broker (farm or local default) -> dispatch -> wait -> store -> reports.

Shared by `orchestrator submit` and `orchestrator gate`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.inventory import Host
from orchestrator.store import Store

EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_INFRA = 0, 1, 2, 3


class RunError(RuntimeError):
    """An input or infrastructure problem that stops a run before results exist; ``code`` is the exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RunOptions:
    timeout: float = 1800.0
    expires: float = 600.0
    no_wait: bool = False
    tty: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    only: dict[tuple[str, str], list[str]] | None = None  # (host, suite) -> test node ids to (re-)run


def job_exit_code(jobs: list[dict[str, Any]]) -> int:
    """Test failures win over infrastructure errors: they are findings; infra errors are 'unknown'."""
    statuses = {j["status"] for j in jobs}
    outcomes = {t["outcome"] for j in jobs for t in j.get("tests", [])}
    if statuses & {"failed", "error"} or outcomes & {"failed", "error", "xpassed"}:
        return EXIT_FAIL
    if not jobs or statuses & {"infra_error", "timeout", "queued", "running"}:
        return EXIT_INFRA
    return EXIT_OK


def execute_run(store: Store, state_dir: Path, hosts: list[Host], suites: list[str], inventory: str,
                opts: RunOptions, echo: Any = print) -> str:
    """Dispatch ``suites`` to ``hosts`` and wait (unless no_wait); returns the run id.

    With no FARM_BROKER_URL a private Redis and local workers are started and stopped around the run.
    Raises RunError for input/infrastructure problems; KeyboardInterrupt marks the run interrupted.
    """
    from agent.celery_app import make_app
    from orchestrator import dispatch
    from orchestrator.localfarm import LocalFarm, LocalFarmError, wait_for_workers

    broker = os.environ.get("FARM_BROKER_URL")
    if opts.no_wait and not broker:
        raise RunError(EXIT_INPUT, "--no-wait needs a farm broker (FARM_BROKER_URL): the local default stops its "
                                   "private Redis when the run ends")
    remote = [h.name for h in hosts if h.driver == "kvm" and h.address != "local"]
    if remote and not broker:
        raise RunError(EXIT_INPUT, f"host {remote[0]!r} is remote: set FARM_BROKER_URL to the farm broker and start "
                                   "its agent (agent worker --host NAME)")
    run_id = dispatch.new_run_id()
    farm = None
    try:
        if not broker:
            farm = LocalFarm(state_dir, [h.name for h in hosts if h.driver == "kvm"],
                             [h.name for h in hosts if h.driver == "model"])
            farm.__enter__()
            broker = farm.redis.url
        app = make_app(broker)
        if farm:
            wait_for_workers(app, farm.workers)
        store.create_run(run_id, suites, inventory, opts.meta)
        echo(f"run {run_id}: {len(suites)} suite(s) on {len(hosts)} host(s)")
        pending = dispatch.enqueue(app, store, run_id, hosts, suites, opts.timeout, opts.expires, opts.only)
        if opts.no_wait:
            return run_id
        dispatch.wait(store, pending, opts.timeout, opts.expires, tty=opts.tty)
        store.finish_run(run_id, "done")
    except LocalFarmError as exc:
        if store.run(run_id):
            store.finish_run(run_id, "infra_error")
        raise RunError(EXIT_INFRA, str(exc)) from None
    except KeyboardInterrupt:
        if store.run(run_id):
            store.finish_run(run_id, "interrupted")
        raise
    finally:
        if farm:
            farm.close()
    return run_id


def report_run(run: dict[str, Any]) -> dict[str, Any]:
    meta = run.get("meta") or {}
    return {"id": run["id"], "created": run["created"], "suites": run["suites"], "origin": "pmufarm",
            "kernel": meta.get("kernel", {"tree": None, "commit": None, "patchset_hash": None})}


def write_run_reports(store: Store, run_id: str, reports_dir: Path, baseline: dict[str, str] | None = None
                      ) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    from orchestrator.reports import write_reports

    run = store.run(run_id)
    if run is None:
        raise RunError(EXIT_INPUT, f"no run {run_id!r} in {store.path}")
    jobs = store.jobs(run_id)
    kwargs = {"baseline": baseline} if baseline is not None else {}
    return write_reports(report_run(run), jobs, reports_dir / run_id, **kwargs), jobs
