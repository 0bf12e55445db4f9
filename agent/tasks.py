"""Agent-side Celery tasks: probe the host's facts, run one suite in a pytest subprocess."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import shared_task

from agent import heartbeat
from agent.celery_app import PROBE_FACTS, RUN_SUITE
from agent.suites import SuiteRefused, resolve_suite, tree_root  # noqa: F401 - re-exported

log = logging.getLogger("pmufarm.agent")

PYTEST_STATUS = {0: "passed", 1: "failed", 5: "no_tests"}
# Built-in pytest plugins a simulated host's suite never uses; dropping them cuts a run by a third,
# which is what lets a shared worker serve hundreds of simulated hosts. Real hosts keep them all.
SIM_SKIP_PLUGINS = ("doctest", "pastebin", "legacypath", "recwarn", "stepwise", "setuponly", "setupplan",
                    "debugging", "logging", "warnings", "unraisableexception", "threadexception")
LOG_TAIL = 4000
PR_SET_PDEATHSIG = 1


def deployed_revision() -> str | None:
    """The revision `orchestrator deploy` installed (None for a developer checkout)."""
    rev = os.environ.get("PMUFARM_REVISION")
    if rev:
        return rev
    marker = tree_root() / "REVISION"
    return marker.read_text().strip() if marker.exists() else None


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _unsafe_path_field(run_id: Any, host_name: Any, attempt: Any) -> str | None:
    """Why a message field that becomes a path component is unsafe (separators, "..", odd types), or None."""
    for what, value in (("run id", run_id), ("host name", host_name)):
        if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):  # no "/", no leading "." (so no "..")
            return f"{what} {value!r} is not a plain name (letters, digits, '.', '_', '-')"
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt <= 1000:
        return f"attempt {attempt!r} is not a whole number from 1 to 1000"
    return None


def host_facts(host: dict[str, Any]) -> dict[str, Any]:
    """Facts are probed on the agent, never taken from the inventory."""
    if host.get("driver", "kvm") == "model":
        from agent.drivers.model import simulated_facts

        return simulated_facts(host)
    if host.get("driver") == "emulated":
        from agent.drivers.emulated import emulated_facts

        return emulated_facts(host)
    from agent.facts import collect_facts

    return collect_facts()


def agent_state_dir() -> Path:
    base = os.environ.get("FARM_AGENT_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME", os.path.expanduser("~/.local/state")), "pmufarm-agent")
    return Path(base)


def _die_with_parent() -> None:
    """A suite must not outlive a killed agent: it would hold the PMU and write results nobody reads."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _ProgressTail(threading.Thread):
    """Forwards the progress plugin's JSON lines as Celery task state."""

    def __init__(self, path: Path, report: Any) -> None:
        super().__init__(daemon=True)
        self.path, self.report, self.stop = path, report, threading.Event()
        self.state: dict[str, Any] = {"done": 0, "total": None, "current": None}

    def run(self) -> None:
        offset = 0
        while not self.stop.wait(0.25):
            offset = self._read(offset)
        self._read(offset)

    def _read(self, offset: int) -> int:
        try:
            with open(self.path, encoding="utf-8") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except FileNotFoundError:
            return offset
        lines = chunk.split("\n")
        consumed = len(chunk) - len(lines[-1])
        changed = False
        for line in lines[:-1]:
            if line.strip():
                rec = json.loads(line)  # finished tests' rows stay in the file (read back after a timeout)
                self.state.update({k: rec[k] for k in ("done", "total", "current") if k in rec})
                changed = True
        if changed:
            self.report(dict(self.state))
        return offset + consumed


def _warm_for_fork() -> None:
    """Import what every suite run needs once, and freeze it out of the children's garbage collections."""
    import importlib

    from _pytest.config import default_plugins

    for name in ("pytest", "agent.plugin", "agent.progress_plugin", "agent.drivers.model",
                 *(f"_pytest.{p}" for p in default_plugins)):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    gc.freeze()


class _ForkedPytest:
    """``pytest.main`` in a forked child: crash-isolated like a subprocess, without its start-up cost."""

    def __init__(self, args: list[str], env: dict[str, str], logf: Any) -> None:
        _warm_for_fork()
        logf.flush()
        self.pid = os.fork()
        if self.pid == 0:  # child: never returns
            code = 70
            try:
                os.setsid()
                _die_with_parent()
                os.chdir(tree_root())
                os.environ.clear()
                os.environ.update(env)
                os.dup2(logf.fileno(), 1)
                os.dup2(logf.fileno(), 2)
                code = int(pytest_main(args))
            finally:
                os._exit(code)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child exits (a pidfd wakes us at once), or raise TimeoutExpired."""
        fd = os.pidfd_open(self.pid)
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        if not ready:
            raise subprocess.TimeoutExpired("pytest", timeout or 0)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def pytest_main(args: list[str]) -> int:
    import pytest

    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    return int(pytest.main(args))


def run_suite_job(host: dict[str, Any], suite: str, run_id: str, attempt: int = 1, timeout: float = 3600,
                  report: Any = None, only: list[str] | None = None,
                  stopped: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run one suite for one host; always returns a job dict (contracts §5), never raises for test outcomes.

    ``stopped()`` is polled about once a second: true when the orchestrator gave this attempt up.
    """
    started = _now()
    job: dict[str, Any] = {"run_id": run_id, "host": host.get("name"), "suite": suite, "attempt": attempt,
                           "status": "error", "exit_code": None, "facts": {}, "tests": [],
                           "started": started, "finished": None, "log_tail": "",
                           "revision": deployed_revision()}
    bad = _unsafe_path_field(run_id, host.get("name"), attempt)
    if bad:  # these name directories under the agent's state dir: a forged "../" must not walk out of it
        log.warning("refused task: %s", bad)
        job.update(status="infra_error", log_tail=f"refused: {bad}", finished=_now())
        return job
    try:
        name, suite_dir = resolve_suite(suite)
    except SuiteRefused as exc:
        log.warning("refused task for host %s: %s", host.get("name"), exc)
        job.update(log_tail=f"refused: {exc}", finished=_now())
        return job
    job["suite"] = name
    targets = [str(suite_dir)]
    if only:
        # Re-runs of chosen tests (flake guard): node ids must stay inside this suite.
        foreign = [n for n in only if not n.startswith(f"suites/{name}/") or ".." in n]
        if foreign:
            job.update(log_tail=f"refused: test {foreign[0]!r} is not in suites/{name}", finished=_now())
            return job
        targets = list(only)
    try:
        facts = host_facts(host)
    except Exception as exc:  # a host whose facts cannot be read is an infrastructure problem
        job.update(status="infra_error", log_tail=f"probing facts failed: {exc}", finished=_now())
        return job
    job["facts"] = facts
    out = agent_state_dir() / "runs" / run_id / str(host.get("name")) / f"{name}.{attempt}"
    out.mkdir(parents=True, exist_ok=True)
    hostfile, results, junit = out / "host.json", out / "results.json", out / "junit.xml"
    progress = out / "progress.jsonl"
    hostfile.write_text(json.dumps({"host": host, "facts": facts}))
    for stale in (results, junit, progress):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider", "-p", "agent.progress_plugin",
           "--pmufarm-host", str(hostfile), "--pmufarm-results", str(results), f"--junitxml={junit}",
           "-o", f"junit_suite_name={host.get('name')}.{name}", "-q", "-rN", "--color=no",
           f"--rootdir={tree_root()}"]  # node ids are suites/<name>/..., whatever ini sits above the tree
    # Only the project's plugins: a farm host's stray pytest plugins must not change a suite (nor slow it).
    env = dict(os.environ, PMUFARM_PROGRESS_FILE=str(progress), PYTHONUNBUFFERED="1",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    simulated = host.get("driver", "kvm") == "model"
    with tempfile.TemporaryFile(mode="w+") as logf:
        # Simulated hosts own no hardware: a fork of this warm process skips interpreter start-up and imports.
        # --tb=native: pytest's own traceback style parses the source of every frame of every xfail.
        trimmed = [a for name in SIM_SKIP_PLUGINS for a in ("-p", f"no:{name}")] + ["--tb=native"]
        proc = _ForkedPytest(cmd[3:] + trimmed, env, logf) if simulated else subprocess.Popen(
            cmd, cwd=tree_root(), stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_die_with_parent)
        tail = _ProgressTail(progress, report) if report else None
        if tail:
            tail.start()
        gave_up = False
        try:
            rc, gave_up = _wait_or_stop(proc, timeout, stopped)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        finally:
            if tail:
                tail.stop.set()
                tail.join(timeout=2)
        logf.seek(0)
        output = logf.read()
    job["exit_code"] = rc
    job["log_tail"] = output[-LOG_TAIL:]
    if results.exists():
        data = json.loads(results.read_text())
        job["tests"] = data.get("tests", [])
    if junit.exists():
        job["junit_path"] = str(junit)  # the agent's own copy; the orchestrator renders its reports
    if gave_up:
        job["status"] = "infra_error"
        job["log_tail"] = "stopped: the orchestrator gave this attempt up; suite killed\n" + job["log_tail"]
    elif rc is None:
        job["status"] = "timeout"
        # pytest was killed before writing its results: keep what the progress stream saw finish.
        from agent.progress_plugin import read_stream

        finished, hung = read_stream(progress)
        job["tests"] = job["tests"] or finished
        if hung:  # outcome "timeout": named in every report, counted as infrastructure, never as a failure
            from agent.plugin import _names

            classname, test_name = _names(hung)
            job["tests"].append({"nodeid": hung, "suite": name, "name": test_name, "classname": classname,
                                 "outcome": "timeout", "duration": None, "erratum": None,
                                 "message": f"hung: still running when --timeout ({timeout:g}s) killed the suite"})
        why = f"hard timeout after {timeout:g}s; suite killed" + (f" while running {hung}" if hung else "")
        job["log_tail"] = why + "\n" + job["log_tail"]
    elif rc in PYTEST_STATUS and (results.exists() or rc == 5):
        job["status"] = PYTEST_STATUS[rc]
    else:
        why = f"killed by signal {-rc}" if rc < 0 else f"pytest exit code {rc}"
        job["status"] = "error"
        job["log_tail"] = f"suite process failed: {why}\n" + job["log_tail"]
    job["finished"] = _now()
    return job


def _wait_or_stop(proc: Any, timeout: float, stopped: Callable[[], bool] | None) -> tuple[int, bool]:
    """(exit code, stopped): wait for the suite, killing its process group when ``stopped()`` says so.

    Raises TimeoutExpired after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired("pytest", timeout)
        try:
            return proc.wait(timeout=min(left, 1.0) if stopped else left), False
        except subprocess.TimeoutExpired:
            if stopped is not None and time.monotonic() < deadline and stopped():
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait(), True


@shared_task(name=RUN_SUITE, bind=True)
def run_suite(self: Any, host: dict[str, Any], suite: str, run_id: str, attempt: int = 1,
              timeout: float = 3600, only: list[str] | None = None, token: str | None = None) -> dict[str, Any]:
    # The worker's pid ties this job to one life of the agent: a restarted agent has another.
    # since_bts: the broker's clock at the start; the orchestrator counts liveness from it (never wall clocks).
    broker = self.app.conf.broker_url
    ident = {"host": host.get("name"), "suite": suite, "node": self.request.hostname, "worker_pid": os.getppid(),
             "since": heartbeat.agent_clock(), "since_bts": heartbeat.broker_now(broker)}

    def stopped() -> bool:
        return bool(task_id) and heartbeat.stop_requested(broker, task_id)

    # The progress thread has no task context (Celery's request stack is thread-local): pass the id.
    task_id = self.request.id

    def report(state: dict[str, Any]) -> None:
        self.update_state(task_id=task_id, state="PROGRESS", meta={**ident, **state})

    if stopped():  # given up while queued (expired, or judged lost): the orchestrator no longer waits for it
        return {"run_id": run_id, "host": host.get("name"), "suite": suite, "attempt": attempt,
                "status": "infra_error", "tests": [], "log_tail": "stopped: given up before it started",
                "token": token}
    report({"done": 0, "total": None, "current": None})

    log.info("run %s: host %s suite %s attempt %d", run_id, host.get("name"), suite, attempt)
    t0 = time.monotonic()
    _busy(broker, host.get("name"), {"run_id": run_id, "suite": suite, "attempt": attempt,
                                     "node": self.request.hostname})
    try:
        job = run_suite_job(host, suite, run_id, attempt, timeout, report, only, stopped)
    except Exception as exc:  # noqa: BLE001 - the agent broke (disk full, state dir), not the kernel under test
        log.exception("run %s: host %s suite %s: agent task failed", run_id, host.get("name"), suite)
        job = {"run_id": run_id, "host": host.get("name"), "suite": suite, "attempt": attempt,
               "status": "infra_error", "exit_code": None, "facts": {}, "tests": [], "started": None,
               "finished": _now(), "log_tail": f"agent task failed: {type(exc).__name__}: {exc}",
               "revision": deployed_revision()}
    finally:
        _busy(broker, host.get("name"), None)
    log.info("run %s: host %s suite %s -> %s in %.1fs", run_id, host.get("name"), suite, job["status"],
             time.monotonic() - t0)
    # Outcome first: Flower and `celery events` show a finished task's result cut to its first ~1 kB.
    counts: dict[str, int] = {}
    for t in job.get("tests") or ():
        counts[t.get("outcome")] = counts.get(t.get("outcome"), 0) + 1
    # token echoed: the orchestrator refuses a result that does not carry the one it sent with the job.
    return {"host": job.get("host"), "suite": job.get("suite"), "status": job.get("status"), "counts": counts, **job,
            "token": token}


def _busy(broker: str, host: Any, job: dict[str, Any] | None) -> None:
    try:
        heartbeat.set_busy(broker, str(host), job)
    except Exception as exc:  # liveness bookkeeping must never fail a suite
        log.warning("busy state for %s: %s", host, exc)


@shared_task(name=PROBE_FACTS)
def probe_facts(host: dict[str, Any]) -> dict[str, Any]:
    return host_facts(host)
