"""Execute one run end to end: broker (farm or local default) -> dispatch -> wait -> store -> reports.

Shared by `orchestrator submit` and `orchestrator gate`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic (the inventory) costs ~0.1 s to import: not for `orchestrator --help`
    from orchestrator.inventory import Host
    from orchestrator.store import Store

EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_INFRA = 0, 1, 2, 3
# Nothing of the suites' subject ran (every such test skipped for a missing fact): not a pass.
EXIT_NOT_TESTED = 4
HEALTH_TIMEOUT = 300.0  # seconds for a host's health check (suites/health: a few VM self-tests)


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


# Numeric settings from the environment: (name, integer?, minimum). Checked before a run exists, so a typo
# is exit 2 naming the variable, never a traceback mid-run nor lost jobs charged to the hosts.
ENV_NUMBERS = (("FARM_HEARTBEAT_INTERVAL", False, 0.1), ("FARM_MAX_ATTEMPTS", True, 1),
               ("FARM_QUARANTINE_AFTER", True, 1), ("FARM_TASK_TIME_LIMIT", True, 61),
               ("FARM_VISIBILITY_TIMEOUT", True, 1))


def check_environment() -> None:
    """Raise RunError(EXIT_INPUT) for a malformed or out-of-range numeric FARM_* setting."""
    import math

    for name, integer, minimum in ENV_NUMBERS:
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= minimum):
            kind = "a whole number" if integer else "a number"
            raise RunError(EXIT_INPUT, f"{name}={raw!r}: must be {kind} >= {minimum:g}")


def job_exit_code(jobs: list[dict[str, Any]]) -> int:
    """Test failures win over infrastructure errors: they are findings; infra errors are 'unknown'.

    Only the last attempt of each (host, suite) counts: a retried infra error that then ran is settled.
    """
    from orchestrator.reports.naming import latest_attempts

    jobs = list(latest_attempts(jobs))
    statuses = {j["status"] for j in jobs}
    outcomes = {t["outcome"] for j in jobs for t in j.get("tests", [])}
    if statuses & {"failed", "error"} or outcomes & {"failed", "error", "xpassed"}:
        return EXIT_FAIL
    if not jobs or statuses & {"infra_error", "timeout", "queued", "running"}:
        return EXIT_INFRA
    from orchestrator.reports.naming import not_tested_reason

    if all(not_tested_reason(j) for j in jobs):
        return EXIT_NOT_TESTED
    return EXIT_OK


def client_app(broker: str) -> Any:
    """The orchestrator's side of the Celery app: it gives up on a dead broker quickly (its polling loop
    retries on its own), where agents keep retrying to store a finished suite's result."""
    from agent.celery_app import make_app

    app = make_app(broker)
    app.conf.result_backend_transport_options = {
        **(app.conf.result_backend_transport_options or {}),
        "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}}
    return app


def execute_run(store: Store, state_dir: Path, hosts: list[Host], suites: list[str], inventory: str,
                opts: RunOptions, echo: Any = print) -> str:
    """Dispatch ``suites`` to ``hosts`` and wait (unless no_wait); returns the run id.

    With no FARM_BROKER_URL a private Redis and local workers are started and stopped around the run.
    Raises RunError for input/infrastructure problems; KeyboardInterrupt marks the run interrupted.
    """
    from orchestrator import health
    from orchestrator.localfarm import LocalFarm, LocalFarmError, wait_for_workers

    check_environment()
    broker = os.environ.get("FARM_BROKER_URL")
    if opts.no_wait and not broker:
        raise RunError(EXIT_INPUT, "--no-wait needs a farm broker (FARM_BROKER_URL): the local default stops its "
                                   "private Redis when the run ends")
    remote = [h.name for h in hosts if h.driver == "kvm" and h.address != "local"]
    if remote and not broker:
        raise RunError(EXIT_INPUT, f"host {remote[0]!r} is remote: set FARM_BROKER_URL to the farm broker and start "
                                   "its agent (agent worker --host NAME)")
    hosts, refused = health.split_usable(store, hosts)
    for h, why in refused:
        echo(f"host {h.name} is out of service ({why}); `orchestrator hosts --release {h.name}` returns it")
    if not hosts:
        raise RunError(EXIT_INFRA, "no host in service among the selected ones")
    farm = None
    interrupted = False
    if not broker:
        # emulated hosts run the real harness (real VMs): one worker each, like kvm hosts
        farm = LocalFarm(state_dir, [h.name for h in hosts if h.driver in ("kvm", "emulated")],
                         [h.name for h in hosts if h.driver == "model"])
        try:
            farm.__enter__()  # stops what it started if it fails; no run exists yet
        except LocalFarmError as exc:
            raise RunError(EXIT_INFRA, str(exc)) from None
        broker = farm.redis.url
    try:
        # Celery and kombu load here, while the local worker boots: a fifth of a second off a local submit.
        from orchestrator import dispatch
    except BaseException:
        if farm:
            farm.close(cold=True)
        raise
    run_id = dispatch.new_run_id()
    try:
        app = client_app(broker)
        broker_check = farm.broker_problem if farm else None
        if not farm:
            from orchestrator.broker import mask, persistence_problem

            if why := persistence_problem(broker):
                echo(f"warning: farm broker {mask(broker)} {why}")
        if farm:
            wait_for_workers(app, farm.workers)
        store.create_run(run_id, suites, inventory, opts.meta)
        unchecked = [h for h in hosts if health.needs_health_check(store, h)]
        if unchecked and not opts.no_wait:
            echo(f"health check first on {', '.join(h.name for h in unchecked)}")
            # The health check's own limit, not the suite's --timeout: a short --timeout on a loaded box
            # must not fail the health check and leave the host out (tests use --timeout 3).
            checker = dispatch.Dispatcher(app, store, run_id, HEALTH_TIMEOUT, opts.expires, broker_check)
            checker.enqueue(unchecked, [health.HEALTH_SUITE])
            checker.wait(tty=opts.tty)
            failed = [h for h in unchecked if store.host_state(h.name)["state"] != "good"]
            for h in failed:
                echo(f"host {h.name} left out: {store.host_state(h.name)['state_reason'] or 'health check failed'}")
            hosts = [h for h in hosts if h not in failed]
        echo(f"run {run_id}: {len(suites)} suite(s) on {len(hosts)} host(s)")
        runner = dispatch.Dispatcher(app, store, run_id, opts.timeout, opts.expires, broker_check)
        runner.enqueue(hosts, suites, opts.only)
        if opts.no_wait:
            return run_id
        runner.wait(tty=opts.tty)
        store.finish_run(run_id, "done")
    except (LocalFarmError, dispatch.BrokerLost) as exc:
        if store.run(run_id):
            store.finish_run(run_id, "infra_error")
        kept = f"run {run_id}: " if isinstance(exc, dispatch.BrokerLost) else ""
        raise RunError(EXIT_INFRA, kept + str(exc) + ("; results stored before it are kept" if kept else "")) from None
    except KeyboardInterrupt:
        interrupted = True
        if store.run(run_id):
            store.finish_run(run_id, "interrupted")
        raise
    finally:
        if farm:
            # kombu pools are process-global and keyed by URL; the next local farm reuses the socket path.
            # Reset them while Redis still answers, or closing them retries against a dead socket.
            from kombu import pools

            pools.reset()
            farm.close(cold=interrupted)
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
    from orchestrator.health import HEALTH_SUITE

    # Health checks decide host states; they are not results of the suites asked for.
    jobs = [j for j in store.jobs(run_id) if j["suite"] != HEALTH_SUITE or HEALTH_SUITE in run["suites"]]
    kwargs = {"baseline": baseline} if baseline is not None else {}
    return write_reports(report_run(run), jobs, reports_dir / run_id, **kwargs), jobs


def resume_run(store: Store, run_id: str, wait: bool, opts: RunOptions | None = None, echo: Any = print) -> bool:
    """Pick a run up again from the store (after an orchestrator restart); returns whether it is done.

    Needs the farm broker: the local default's private Redis died with the process that started it,
    so its unfinished jobs can only be marked lost.
    """
    from celery.result import AsyncResult

    from orchestrator import dispatch
    from orchestrator.inventory import Host
    from orchestrator.store import FINAL_JOB_STATES

    run = store.run(run_id)
    if run is None:
        raise RunError(EXIT_INPUT, f"no run {run_id!r} in {store.path}")
    open_jobs = [j for j in store.jobs(run_id, with_results=False) if j["status"] not in FINAL_JOB_STATES]
    if not open_jobs:
        if run["status"] == "running":
            store.finish_run(run_id, "done")
        return True
    broker = os.environ.get("FARM_BROKER_URL")
    if not broker:
        for j in open_jobs:
            store.finish_job(j["id"], {"host": j["host"], "suite": j["suite"], "status": "infra_error",
                                       "tests": [], "log_tail": "orchestrator stopped before the job finished "
                                       "(local default: its private broker is gone)"})
        store.finish_run(run_id, "interrupted")
        return True
    opts = opts or RunOptions()
    app = client_app(broker)
    d = dispatch.Dispatcher(app, store, run_id, opts.timeout, opts.expires)
    for j in open_jobs:
        host = Host.model_validate(j["host_entry"])
        if not j["task_id"]:
            # Saved by an older orchestrator that died before naming the task: it never ran under a known id.
            d.send(host, j["suite"], j["attempt"], job_id=j["id"])
            continue
        # Unknown queue age after a restart: the expiry window starts again now.
        p = dispatch.Pending(j["id"], host, j["suite"], j["attempt"],
                             AsyncResult(j["task_id"], app=app), time.monotonic(), token=j.get("token"))
        if j["status"] == "running":
            p.status, p.started_at = "running", p.queued_at
        d.pending.append(p)
    echo(f"run {run_id}: resuming {len(open_jobs)} open job(s)")
    if wait:
        d.wait(tty=opts.tty)
    else:
        d.poll_once()
    if d.done():
        store.finish_run(run_id, "done")
        return True
    return False
