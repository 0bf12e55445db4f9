"""Dispatch jobs to per-host queues and collect them into the store, with progress.

A job ends in the store exactly once (``Store.finish_job`` refuses a second result set). A job whose
agent dies mid-suite (its pool process lost, or its host's heartbeat stale for two intervals) is
recorded as ``infra_error`` and sent again with attempt+1, up to ``FARM_MAX_ATTEMPTS``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

from agent.celery_app import RUN_SUITE, host_queue
from agent.heartbeat import broker_time, read_state, redis_from_url, request_stop
from agent.heartbeat import interval as heartbeat_interval
from orchestrator import health
from orchestrator.inventory import Host
from orchestrator.store import FINAL_JOB_STATES, Store


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def max_attempts() -> int:
    return int(os.environ.get("FARM_MAX_ATTEMPTS", "2"))


@dataclass
class Pending:
    job_id: int
    host: Host
    suite: str
    attempt: int
    result: AsyncResult
    queued_at: float
    only: list[str] | None = None
    started_at: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    status: str = "queued"
    token: str | None = None  # echoed by the agent in its result: binds the result to this job
    broker_run: str | None = None  # the broker's INFO run_id when the job was queued: it changes on every restart


class BrokerLost(RuntimeError):
    """A broker that cannot come back (the local default's private Redis died): the run ends here."""


class Dispatcher:
    def __init__(self, app: Celery, store: Store, run_id: str, timeout: float, expires: float,
                 broker_check: Callable[[], str | None] | None = None) -> None:
        self.app, self.store, self.run_id = app, store, run_id
        self.timeout, self.expires = timeout, expires
        # Local default: says why the private broker is gone. A farm broker may restart: the loop waits.
        self.broker_check = broker_check
        self.pending: list[Pending] = []
        self._redis: redis.Redis | None = None
        self._liveness: dict[str, dict[str, Any]] = {}
        self._liveness_at = 0.0
        self._broker_now: float | None = None  # Redis TIME at the last liveness read
        self._broker_up_since = float("inf")
        self._uptime_known = False  # INFO answered: _broker_up_since is the server's real start

    # sending ----------------------------------------------------------------------------------------
    def send(self, host: Host, suite: str, attempt: int = 1, only: list[str] | None = None,
             job_id: int | None = None) -> Pending:
        # The task id is stored before the message leaves: an orchestrator dying in between leaves a job
        # `status --wait` can follow (or send), never one whose task nobody can name.
        task_id, token = uuid(), secrets.token_hex(16)
        if job_id is None:
            job_id = self.store.add_job(self.run_id, host.entry(), suite, attempt, task_id, token)
        else:
            self.store.set_task(job_id, task_id, token)
        res = self.app.send_task(RUN_SUITE, kwargs={"host": host.entry(), "suite": suite, "run_id": self.run_id,
                                                    "attempt": attempt, "timeout": self.timeout, "only": only,
                                                    "token": token},
                                 queue=host_queue(host.name), expires=self.expires, task_id=task_id)
        p = Pending(job_id, host, suite, attempt, res, time.monotonic(), only, token=token,
                    broker_run=self._broker_run_id())
        self.pending.append(p)
        return p

    def enqueue(self, hosts: list[Host], suites: list[str],
                only: dict[tuple[str, str], list[str]] | None = None) -> list[Pending]:
        """One job per (host, suite); ``only[(host, suite)]`` restricts a job to chosen test node ids."""
        sent = []
        for host in hosts:
            for suite in suites:
                selected = (only or {}).get((host.name, suite))
                if only is not None and not selected:
                    continue
                sent.append(self.send(host, suite, 1, selected))
        return sent

    # watching ---------------------------------------------------------------------------------------
    def liveness(self) -> dict[str, dict[str, Any]]:
        """Heartbeats and the broker's clock, at most once a second; {} when the broker cannot be read."""
        if time.monotonic() - self._liveness_at < 1.0:
            return self._liveness
        self._liveness_at = time.monotonic()
        try:
            if self._redis is None:
                self._redis = redis_from_url(self.app.conf.broker_url)
            self._liveness = read_state(self._redis)
            # Read after the beats: every beat in the snapshot is at most this old by the broker's clock.
            self._broker_now = broker_time(self._redis)
        except redis.RedisError:
            self._liveness, self._broker_now = {}, None
            self._broker_up_since = float("inf")  # judged again once it answers
            return self._liveness
        try:
            # The server's own uptime also covers restarts this loop never saw failing.
            up_since = self._broker_now - float(self._redis.info("server")["uptime_in_seconds"])
            self._uptime_known = True
        except redis.RedisError:
            # The farm ACL may deny INFO: count from when this loop first saw the broker answer.
            up_since = self._broker_now if self._broker_up_since == float("inf") else self._broker_up_since
        self._broker_up_since = up_since
        return self._liveness

    @staticmethod
    def _limit(hb: dict[str, Any] | None) -> float:
        # Two missed beats, plus slack for a loaded machine's scheduling of the beating thread.
        return 2 * float((hb or {}).get("interval") or heartbeat_interval()) + 2.0

    def _job_clock(self, p: Pending) -> tuple[float, float] | None:
        """(broker time now, broker time of the last sign of life of the worker running ``p``), or None.

        Only the job's own worker speaks for it: its beats, or the job's start itself. A beat from another
        life of the agent (the one that died before this job began) says nothing about this job
        (a restarted agent beats once and starts its next job within milliseconds).
        """
        hb = (self.liveness().get(p.host.name) or {}).get("heartbeat")
        now = self._broker_now
        if now is None:
            return None
        since = p.progress.get("since_bts")
        if since is None and p.started_at is not None:
            since = now - (self._liveness_at - p.started_at)  # first seen running, moved to the broker's clock
        if since is None:
            return None
        last = float(since)
        if hb and hb.get("bts") is not None and hb.get("pid") == p.progress.get("worker_pid"):
            last = max(last, float(hb["bts"]))
        return now, last

    def _stale(self, p: Pending) -> float | None:
        """Seconds since the last sign of life of the job's worker when that exceeds the limit, else None."""
        clock = self._job_clock(p)
        if clock is None:
            return None
        now, last = clock
        limit = self._limit((self.liveness().get(p.host.name) or {}).get("heartbeat"))
        # After a broker outage the agents need a moment to beat again; don't blame them for it.
        if now - self._broker_up_since < limit:
            return None
        age = now - last
        return age if age > limit else None

    def _restarted(self, p: Pending) -> str | None:
        """The agent that started this job is gone but its host beats again: a new life of the agent."""
        started_by, since = p.progress.get("worker_pid"), p.progress.get("since_bts")
        hb = (self.liveness().get(p.host.name) or {}).get("heartbeat")
        if not started_by or since is None or not hb or hb.get("pid") == started_by or hb.get("bts") is None:
            return None
        if float(hb["bts"]) <= float(since):
            return None  # a beat from before this job began: the new agent has not beaten yet
        if self._broker_now is None or self._broker_now - float(hb["bts"]) > self._limit(hb):
            return None  # not beating at all: _stale() speaks for that
        return (f"agent on {p.host.name} restarted mid-suite (worker pid {started_by} gone, now {hb.get('pid')}); "
                "agent lost mid-suite")

    def _states(self, open_jobs: list[Pending]) -> dict[str, tuple[str, Any]]:
        """task id -> (state, info) for many jobs in a few MGETs; {} where the backend is not Redis.

        One GET per job per poll would cost a thousand round trips a tick on a big farm.
        """
        backend = self.app.backend
        if not open_jobs or not hasattr(backend, "client") or not hasattr(backend, "get_key_for_task"):
            return {}
        out: dict[str, tuple[str, Any]] = {}
        for i in range(0, len(open_jobs), 500):
            chunk = open_jobs[i:i + 500]
            values = backend.client.mget([backend.get_key_for_task(p.result.id) for p in chunk])
            for p, raw in zip(chunk, values, strict=True):
                meta = backend.decode_result(raw) if raw else {"status": "PENDING", "result": None}
                out[p.result.id] = (meta["status"], meta.get("result"))
        return out

    def _check_broker(self) -> None:
        """Within a tick of the private broker dying: open jobs become infra_error with the cause (results
        already stored stay), and BrokerLost ends the wait instead of a silent hang until the timeouts."""
        why = self.broker_check() if self.broker_check else None
        if not why:
            return
        for p in self.pending:
            if p.status not in FINAL_JOB_STATES:
                # Not the host's fault: no health record, nothing counts toward quarantine.
                self.store.finish_job(p.job_id, {**self._infra(p, f"{why}; job lost with it"), "status": "infra_error"})
                p.status = "infra_error"
        for p in self.pending:
            p.result.backend = None  # AsyncResult.__del__ would unsubscribe through the dead broker, noisily
        raise BrokerLost(why)

    def poll_once(self) -> list[Pending]:
        """Advance every job one step; returns the jobs that changed (for progress output)."""
        self._check_broker()
        changed = []
        open_jobs = [p for p in self.pending if p.status not in FINAL_JOB_STATES]
        try:
            states = self._states(open_jobs)
        except (redis.RedisError, OSError, ConnectionError):
            return changed  # broker restarting: look again next round
        for p in open_jobs:
            try:
                step = self._step(p, states.get(p.result.id))
            except (redis.RedisError, OSError, ConnectionError):
                continue  # broker restarting: the job is still where it was; look again next round
            if step:
                changed.append(p)
        return changed

    def _step(self, p: Pending, known: tuple[str, Any] | None = None) -> bool:
        state, info = known if known else (p.result.state, None)
        if known and state in ("SUCCESS", "FAILURE", "REVOKED"):
            state = p.result.state  # final: let Celery rebuild the result or the exception
        job: dict[str, Any] | None = None
        retry = False
        if state == "SUCCESS":
            job = p.result.result
            if p.token and (not isinstance(job, dict) or not secrets.compare_digest(str(job.get("token")), p.token)):
                # Anyone with broker access can write a result key; only the agent that got the job knows this.
                why = (f"result refused: it does not carry the token sent with job {p.job_id} "
                       f"({p.host.name} {p.suite} attempt {p.attempt}); forged or from another job")
                print(f"orchestrator: {why}", file=sys.stderr, flush=True)
                job = self._infra(p, why)
        elif state == "FAILURE":
            err = p.result.result
            lost = type(err).__name__ in ("WorkerLostError", "TimeLimitExceeded")
            kind = "timeout" if type(err).__name__ == "TimeLimitExceeded" else "infra_error"
            # An exception outside the suite (the agent's disk, its state dir, a bug) is never a kernel verdict.
            job = self._infra(p, f"agent task failed: {type(err).__name__}: {err}", kind if lost else "infra_error")
            retry = lost and kind == "infra_error"
        elif state == "REVOKED":
            job = self._infra(p, f"job expired: no agent took it within {self.expires:g}s "
                                 f"(host {p.host.name} offline?)")
        elif state in ("STARTED", "PROGRESS"):
            changed = False
            if p.started_at is None:
                p.started_at = time.monotonic()
                self.store.mark_running(p.job_id)
                p.status = "running"
                changed = True
            if not known:
                info = p.result.info
            info = info if state == "PROGRESS" and isinstance(info, dict) else {}
            if info and info != p.progress:
                p.progress = info
                changed = True
            stale = self._stale(p)
            restarted = self._restarted(p)
            if restarted:
                job = self._infra(p, restarted)
                retry = True
            elif stale is not None:
                job = self._infra(p, f"host {p.host.name} stopped heartbeating ({stale:.0f}s since the last "
                                     "heartbeat); agent lost mid-suite")
                retry = True
            elif time.monotonic() - p.started_at > self.timeout + 120:
                job = self._infra(p, f"no result {self.timeout + 120:g}s after the job started", "timeout")
                self._stop(p)
            if job is None:
                return changed
        elif time.monotonic() - p.queued_at > self.expires:
            self._stop(p)
            if self._broker_restarted_since(p):
                job = self._infra(p, "job lost: the broker restarted after it was queued and did not keep its "
                                     "queue (no append-only file?); not counted against the host")
                self._finish(p, job, False, charge=False)
                return True
            job = self._infra(p, f"job expired: no agent took it within {self.expires:g}s "
                                 f"(host {p.host.name} offline?)")
        else:
            return False
        self._finish(p, job, retry)
        return True

    def _broker_run_id(self) -> str | None:
        """The server's run_id (new at every start), or None where INFO is refused or the broker is down."""
        try:
            if self._redis is None:
                self._redis = redis_from_url(self.app.conf.broker_url)
            return str(self._redis.info("server")["run_id"])
        except (redis.RedisError, KeyError):
            return None

    def _broker_restarted_since(self, p: Pending) -> bool:
        """Did the broker (re)start after ``p`` was queued? Exact by the server's run_id; where INFO was refused
        at queue time, by its uptime (whole seconds) as this loop last read it."""
        if p.broker_run is not None:
            now_run = self._broker_run_id()
            return now_run is not None and now_run != p.broker_run
        self.liveness()
        if not self._uptime_known or self._broker_now is None:
            return False
        return self._broker_up_since > self._broker_now - (self._liveness_at - p.queued_at)

    def _infra(self, p: Pending, why: str, status: str = "infra_error") -> dict[str, Any]:
        return {"host": p.host.name, "suite": p.suite, "status": status, "exit_code": None, "facts": {},
                "tests": [], "log_tail": why}

    def _finish(self, p: Pending, job: Any, retry: bool, charge: bool = True) -> None:
        if not isinstance(job, dict) or job.get("status") not in FINAL_JOB_STATES:
            job = self._infra(p, f"agent returned an unusable result: {str(job)[:200]}")
        stored = self.store.finish_job(p.job_id, job)
        p.status = job["status"]
        p.progress = {"tests": job.get("tests", []), "log_tail": job.get("log_tail", "")}
        if stored and charge and p.suite == health.HEALTH_SUITE:
            health.record_health(self.store, p.host.name, job)
        elif stored and charge:
            health.record_job(self.store, p.host.name, job)
        with contextlib.suppress(redis.RedisError):
            p.result.forget()
        if retry:
            self._stop(p)
            if p.attempt < max_attempts():
                self.send(p.host, p.suite, p.attempt + 1, p.only)

    def _stop(self, p: Pending) -> None:
        """Give an attempt up for good: the agent's task polls this key and kills its suite (or does not start
        it), so a job judged lost never runs beside its retry. Not Celery's revoke: agents refuse remote control
        (agent/cli.py), and a broadcast reaches only the workers up at that moment."""
        try:
            if self._redis is None:
                self._redis = redis_from_url(self.app.conf.broker_url)
            request_stop(self._redis, p.result.id)
        except redis.RedisError:
            pass  # broker away: the agent's result will be refused by finish_job's exactly-once rule

    def _interval(self, base: float) -> float:
        """Poll fast for a few jobs, slower for a big farm: a tick costs work per open job."""
        open_jobs = sum(p.status not in FINAL_JOB_STATES for p in self.pending)
        return min(1.0, max(base, open_jobs * 0.0005))

    def done(self) -> bool:
        return all(p.status in FINAL_JOB_STATES for p in self.pending)

    def wait(self, interval: float = 0.05, tty: bool | None = None) -> None:
        tty = sys.stdout.isatty() if tty is None else tty
        if tty:
            self._wait_rich(interval)
            return
        shown: dict[int, str] = {}
        for p in self.pending:
            _line(f"{p.host.name} {p.suite}: queued")
            shown[p.job_id] = "queued"
        while not self.done():
            for p in self.poll_once():
                text = describe(p)
                if shown.get(p.job_id) != text:  # one line per visible change, not per heartbeat of progress
                    shown[p.job_id] = text
                    _line(f"{p.host.name} {p.suite}" + (f" (attempt {p.attempt})" if p.attempt > 1 else "")
                          + f": {text}")
            time.sleep(self._interval(interval))

    def _wait_rich(self, interval: float) -> None:
        from rich.live import Live
        from rich.table import Table

        def table() -> Table:
            t = Table(box=None, pad_edge=False)
            for col in ("host", "suite", "try", "state"):
                t.add_column(col)
            for p in self.pending:
                t.add_row(p.host.name, p.suite, str(p.attempt), describe(p))
            return t

        with Live(table(), refresh_per_second=4, transient=False) as live:
            while not self.done():
                if self.poll_once():
                    live.update(table())
                time.sleep(self._interval(interval))
            live.update(table())


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
        if total is None:  # pytest has not finished collecting: no count to show yet
            return "running (collecting tests)"
        return f"running {done}/{total}" + (f"  {cur}" if cur else "")
    counts = outcome_counts(p.progress.get("tests", []))
    detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    tail = (p.progress.get("log_tail") or "").strip()
    if p.status in ("infra_error", "timeout", "error") and not counts and tail:
        detail = tail.splitlines()[0][:120]
    from orchestrator.reports.naming import NOT_TESTED, not_tested_reason

    untested = not_tested_reason({"status": p.status, "tests": p.progress.get("tests", [])})
    return (NOT_TESTED if untested else f"{p.status}") + (f" ({detail})" if detail else "")


def _line(text: str) -> None:
    print(f"{datetime.now().strftime('%H:%M:%S')} {text}", flush=True)
