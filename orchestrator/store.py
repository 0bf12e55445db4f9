"""Result store: runs -> jobs (host, suite, attempt) -> test results, in SQLite (WAL).

Every write of a job's results is one transaction, so a crash never leaves half a result set.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, created TEXT NOT NULL, finished TEXT, status TEXT NOT NULL,
    suites TEXT NOT NULL, inventory TEXT, meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs(id), host TEXT NOT NULL,
    suite TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 1, status TEXT NOT NULL, task_id TEXT,
    exit_code INTEGER, facts TEXT NOT NULL DEFAULT '{}', host_entry TEXT NOT NULL DEFAULT '{}',
    queued TEXT, started TEXT, finished TEXT, log_tail TEXT NOT NULL DEFAULT '',
    UNIQUE(run_id, host, suite, attempt));
CREATE TABLE IF NOT EXISTS results (
    job_id INTEGER NOT NULL REFERENCES jobs(id), nodeid TEXT NOT NULL, suite TEXT, name TEXT,
    classname TEXT, outcome TEXT NOT NULL, duration REAL, message TEXT, erratum TEXT);
CREATE INDEX IF NOT EXISTS results_job ON results(job_id);
CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run_id);
CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, facts TEXT NOT NULL, seen TEXT NOT NULL);
"""
# Columns added after the first schema; added in place so existing stores keep their results.
HOST_COLUMNS = {"state": "TEXT NOT NULL DEFAULT 'unknown'", "infra_streak": "INTEGER NOT NULL DEFAULT 0",
                "state_reason": "TEXT NOT NULL DEFAULT ''", "state_changed": "TEXT"}
HOST_STATES = ("unknown", "good", "bad", "quarantined", "maintenance")

FINAL_JOB_STATES = {"passed", "failed", "error", "infra_error", "timeout", "no_tests"}
RESULT_KEYS = ("nodeid", "suite", "name", "classname", "outcome", "duration", "message", "erratum", "details",
               "subject")
# details: a failure's traceback (JUnit body); subject: 0 for harness tests (their pass alone is no verdict).
RESULT_COLUMNS = {"details": "TEXT", "subject": "INTEGER"}
# token: the per-job secret the agent echoes; a result without it was not produced for the job we sent.
JOB_COLUMNS = {"token": "TEXT"}


class StoreError(RuntimeError):
    """The store cannot be opened or written: one line naming the file; the CLI exits 3 (infrastructure)."""


def describe_error(path: Path, exc: BaseException) -> str:
    """One line for a SQLite/OS failure of the store, with what to do about it."""
    text = str(exc) or type(exc).__name__
    writable = os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
    if "readonly" in text or "read-only" in text or isinstance(exc, PermissionError) or not writable:
        hint = "the store is read-only: make it writable (or point --state-dir elsewhere)"
    elif "full" in text or getattr(exc, "errno", None) == 28:
        hint = "the disk is full: free space, then `orchestrator status RUN --wait` takes an unfinished run up"
    elif "not a database" in text or "malformed" in text:
        hint = "the store is corrupted: restore it from a backup or move it aside to start a new one"
    else:
        hint = "check the file and its directory"
    return f"store {path}: {text}; {hint}"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._open()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(describe_error(self.path, exc)) from None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One opener at a time creates or migrates the store: a submit starting at the same moment as another
        # would otherwise find the new file still empty (and refuse it) or add a column twice.
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._open_locked()

    def _open_locked(self) -> None:
        wal = self.path.with_name(self.path.name + "-wal")
        if self.path.exists() and self.path.stat().st_size == 0 and not (wal.exists() and wal.stat().st_size):
            # SQLite would take it for a new database and the history would be gone without a word.
            raise StoreError(f"store {self.path} is empty (0 bytes; truncated by a crash or a full disk?): "
                             "restore it from a backup, or move it aside to start a new store")
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(hosts)")}
        for col, decl in HOST_COLUMNS.items():
            if col not in have:
                self.db.execute(f"ALTER TABLE hosts ADD COLUMN {col} {decl}")
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for col, decl in JOB_COLUMNS.items():
            if col not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {col} {decl}")
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(results)")}
        for col, decl in RESULT_COLUMNS.items():
            if col not in have:
                self.db.execute(f"ALTER TABLE results ADD COLUMN {col} {decl}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # runs -------------------------------------------------------------------------------------------
    def create_run(self, run_id: str, suites: list[str], inventory: str, meta: dict[str, Any] | None = None) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO runs(id, created, status, suites, inventory, meta) VALUES (?,?,?,?,?,?)",
                       (run_id, now(), "running", json.dumps(suites), inventory, json.dumps(meta or {})))

    def finish_run(self, run_id: str, status: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE runs SET status=?, finished=? WHERE id=?", (status, now(), run_id))

    def run(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return self._run(row) if row else None

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM runs ORDER BY created DESC, id DESC LIMIT ?", (limit,))
        return [self._run(r) for r in rows]

    def latest_run_id(self) -> str | None:
        row = self.db.execute("SELECT id FROM runs ORDER BY created DESC, id DESC LIMIT 1").fetchone()
        return row["id"] if row else None

    @staticmethod
    def _run(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        d["suites"] = json.loads(d["suites"])
        d["meta"] = json.loads(d["meta"])
        return d

    # jobs -------------------------------------------------------------------------------------------
    def add_job(self, run_id: str, host: dict[str, Any], suite: str, attempt: int = 1,
                task_id: str | None = None, token: str | None = None) -> int:
        """A queued job; with ``task_id`` (chosen before sending) a crash can never leave a sent job untracked."""
        with self.tx() as db:
            cur = db.execute("INSERT INTO jobs(run_id, host, suite, attempt, status, host_entry, queued, task_id, "
                             "token) VALUES (?,?,?,?,?,?,?,?,?)",
                             (run_id, host["name"], suite, attempt, "queued", json.dumps(host), now(), task_id, token))
            return int(cur.lastrowid or 0)

    def set_task(self, job_id: int, task_id: str, token: str | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE jobs SET task_id=?, token=? WHERE id=?", (task_id, token, job_id))

    def mark_running(self, job_id: int) -> None:
        with self.tx() as db:
            db.execute("UPDATE jobs SET status='running', started=COALESCE(started, ?) WHERE id=? AND status='queued'",
                       (now(), job_id))

    def finish_job(self, job_id: int, job: dict[str, Any]) -> bool:
        """Store a job's outcome and all its results atomically; a second result set is refused."""
        status = job["status"]
        if status not in FINAL_JOB_STATES:
            raise ValueError(f"job {job_id}: unknown final status {status!r}")
        with self.tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["status"] in FINAL_JOB_STATES:
                return False
            db.execute("UPDATE jobs SET status=?, exit_code=?, facts=?, started=COALESCE(?, started), "
                       "finished=?, log_tail=? WHERE id=?",
                       (status, job.get("exit_code"), json.dumps(job.get("facts") or {}), job.get("started"),
                        job.get("finished") or now(), job.get("log_tail") or "", job_id))
            db.executemany(f"INSERT INTO results(job_id, {', '.join(RESULT_KEYS)}) VALUES (?{',?' * len(RESULT_KEYS)})",
                           [(job_id, *(t.get(k) for k in RESULT_KEYS)) for t in job.get("tests", [])])
            if job.get("facts"):
                db.execute("INSERT INTO hosts(name, facts, seen) VALUES (?,?,?) ON CONFLICT(name) DO UPDATE "
                           "SET facts=excluded.facts, seen=excluded.seen",
                           (job["host"], json.dumps(job["facts"]), now()))
            return True

    def job_row(self, job_id: int) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return dict(row) if row else {}

    def jobs(self, run_id: str, with_results: bool = True) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM jobs WHERE run_id=? ORDER BY host, suite, attempt", (run_id,)).fetchall()
        jobs = []
        for r in rows:
            d = dict(r)
            d["facts"] = json.loads(d["facts"])
            d["host_entry"] = json.loads(d["host_entry"])
            d["host_cpu"] = d["host_entry"].get("cpu")  # inventory's expectation, for hosts that never answered
            if with_results:
                d["tests"] = [dict(t) for t in self.db.execute(
                    f"SELECT {', '.join(RESULT_KEYS)} FROM results WHERE job_id=? ORDER BY rowid", (d["id"],))]
            jobs.append(d)
        return jobs

    def counts(self, run_id: str, skip_suites: tuple[str, ...] = ("health",)) -> dict[str, int]:
        """Outcome counts of a run's last attempts (health checks left out: they judge hosts, not kernels)."""
        marks = ",".join("?" * len(skip_suites)) or "''"
        rows = self.db.execute("SELECT r.outcome, COUNT(*) n FROM results r JOIN jobs j ON j.id=r.job_id "
                               f"WHERE j.run_id=? AND j.suite NOT IN ({marks}) AND j.attempt = (SELECT MAX(attempt) "
                               "FROM jobs k WHERE k.run_id=j.run_id AND k.host=j.host AND k.suite=j.suite) "
                               "GROUP BY r.outcome", (run_id, *skip_suites))
        return {r["outcome"]: r["n"] for r in rows}

    # hosts ------------------------------------------------------------------------------------------
    def record_facts(self, host: str, facts: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO hosts(name, facts, seen) VALUES (?,?,?) ON CONFLICT(name) DO UPDATE "
                       "SET facts=excluded.facts, seen=excluded.seen", (host, json.dumps(facts), now()))

    def host_facts(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: {"facts": json.loads(r["facts"]), "seen": r["seen"], "state": r["state"],
                            "infra_streak": r["infra_streak"], "state_reason": r["state_reason"],
                            "state_changed": r["state_changed"]}
                for r in self.db.execute("SELECT * FROM hosts")}

    def host_state(self, host: str) -> dict[str, Any]:
        row = self.db.execute("SELECT state, infra_streak, state_reason FROM hosts WHERE name=?", (host,)).fetchone()
        return dict(row) if row else {"state": "unknown", "infra_streak": 0, "state_reason": ""}

    def set_host_state(self, host: str, state: str, reason: str = "", infra_streak: int | None = None) -> None:
        if state not in HOST_STATES:
            raise ValueError(f"unknown host state {state!r}")
        with self.tx() as db:
            db.execute("INSERT INTO hosts(name, facts, seen) VALUES (?, '{}', ?) ON CONFLICT(name) DO NOTHING",
                       (host, now()))
            db.execute("UPDATE hosts SET state=?, state_reason=?, state_changed=?, "
                       "infra_streak=COALESCE(?, infra_streak) WHERE name=?",
                       (state, reason, now(), infra_streak, host))
