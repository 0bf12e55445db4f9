"""Farm robustness with real parts: a real redis-server (AOF on, as a farm broker should run), real agent
workers that the test kills, stops and restarts, and the real `orchestrator` CLI in farm mode.

Nothing is mocked: workers die by SIGKILL, wedge by SIGSTOP, and Redis really restarts.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orchestrator.localfarm import RedisServer, Worker, free_port
from orchestrator.store import Store
from tests.conftest import ROOT, TREE, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "broker", port=free_port(), extra=["--appendonly", "yes"]).start()
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path: Path, broker: RedisServer) -> dict[str, str]:
    return {"FARM_STATE_DIR": str(tmp_path / "st"), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent"),
            "PMUFARM_TREE": str(TREE), "FARM_BROKER_URL": broker.url, "FARM_HEARTBEAT_INTERVAL": "1",
            "PMUFARM_TEST_MARKER": str(tmp_path / "executions.txt")}


def inventory(tmp_path: Path, names: list[str]) -> Path:
    inv = tmp_path / "farm.yaml"
    inv.write_text("hosts:\n" + "".join(f"  - {{name: {n}, address: local}}\n" for n in names))
    return inv


def mark_good(env: dict[str, str], names: list[str]) -> None:
    """Skip the first-job health check: these tests are about what happens after it."""
    store = Store(Path(env["FARM_STATE_DIR"]) / "pmufarm.sqlite")
    for n in names:
        store.set_host_state(n, "good", "checked by the test", 0)
    store.close()


def start_worker(env: dict[str, str], names: list[str], log_dir: Path) -> Worker:
    worker_env = {k: v for k, v in env.items() if k != "FARM_BROKER_URL"}
    return Worker(names, env["FARM_BROKER_URL"], log_dir, env=worker_env, publish_facts=False).start()


def submit_bg(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")} | env
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def busy(broker: RedisServer) -> dict[str, dict]:
    try:
        return {k.decode(): json.loads(v) for k, v in broker.client().hgetall("pmufarm:busy").items()}
    except redis.RedisError:
        return {}


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen[str] | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"orchestrator exited ({proc.returncode}) while waiting for {what}:\n{proc.stdout.read()}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def db(env: dict[str, str], sql: str) -> list[tuple]:
    with sqlite3.connect(Path(env["FARM_STATE_DIR"]) / "pmufarm.sqlite") as conn:
        return conn.execute(sql).fetchall()


def test_worker_sigkill_mid_suite_ten_times(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    """Ten jobs, each one's first attempt killed mid-suite: 0 results lost, 0 duplicated."""
    names = [f"h{i}" for i in range(10)]
    env |= {"FARM_MAX_ATTEMPTS": "3", "FARM_QUARANTINE_AFTER": "100", "PMUFARM_TEST_SLEEP": "2.5"}
    mark_good(env, names)
    worker = start_worker(env, names, tmp_path / "logs")
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "--inventory",
                     str(inventory(tmp_path, names)), "--expires", "120")
    killed: set[str] = set()
    try:
        while len(killed) < 10:
            job = wait_for(lambda: [h for h, b in busy(broker).items() if b["attempt"] == 1 and h not in killed],
                           60, f"kill #{len(killed) + 1}", proc)[0]
            time.sleep(0.8)  # inside the suite's sleep
            os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()
            killed.add(job)
            worker = start_worker(env, names, tmp_path / "logs")
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        worker.stop()
    assert proc.returncode == 0, out
    assert len(killed) == 10
    rows = db(env, "SELECT host, attempt, status, (SELECT COUNT(*) FROM results r WHERE r.job_id=j.id) "
                   "FROM jobs j WHERE suite='slow' ORDER BY host, attempt")
    for name in names:
        mine = [r for r in rows if r[0] == name]
        finals = [r for r in mine if r[2] == "passed"]
        assert len(finals) == 1 and finals[0][3] == 1, mine  # exactly one result set landed
        assert all(r[2] == "infra_error" and r[3] == 0 for r in mine if r[2] != "passed"), mine
        assert mine[0][1] == 1 and mine[0][2] == "infra_error", mine  # the killed attempt
    assert db(env, "SELECT COUNT(*) FROM results") == [(10,)]


def test_redis_restart_mid_run(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    env |= {"PMUFARM_TEST_SLEEP": "4"}
    mark_good(env, ["solo"])
    worker = start_worker(env, ["solo"], tmp_path / "logs")
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "--inventory",
                     str(inventory(tmp_path, ["solo"])))
    try:
        wait_for(lambda: busy(broker), 60, "the suite to start", proc)
        broker.stop()  # SIGTERM: Redis syncs its append-only file and exits
        time.sleep(1)
        broker.start()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        worker.stop()
    assert proc.returncode == 0, out
    assert db(env, "SELECT status, log_tail FROM jobs WHERE suite='slow'")[0][0] == "passed", out
    assert db(env, "SELECT COUNT(*) FROM results") == [(1,)]


def test_wedged_host_is_quarantined(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    """SIGSTOP the worker mid-suite: heartbeats stop, the job is infra_error (never a failure), the retry
    finds no agent, and two infrastructure errors in a row quarantine the host."""
    env |= {"PMUFARM_TEST_SLEEP": "20", "FARM_QUARANTINE_AFTER": "2", "FARM_MAX_ATTEMPTS": "2"}
    mark_good(env, ["wedge"])
    inv = inventory(tmp_path, ["wedge"])
    worker = start_worker(env, ["wedge"], tmp_path / "logs")
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "--inventory", str(inv),
                     "--expires", "3")
    try:
        wait_for(lambda: busy(broker), 60, "the suite to start", proc)
        stopped_at = time.monotonic()
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 3, out  # infrastructure, not a test failure
        statuses = db(env, "SELECT attempt, status FROM jobs WHERE suite='slow' ORDER BY attempt")
        assert statuses == [(1, "infra_error"), (2, "infra_error")], statuses
        log_tail = db(env, "SELECT log_tail FROM jobs WHERE attempt=1")[0][0]
        assert "stopped heartbeating" in log_tail
        assert time.monotonic() - stopped_at < 2 * 1 + 3 + 3 + 10  # detection within 2 intervals, plus expiry
        rows = json.loads(run_cli("hosts", "--inventory", str(inv), "--json", env=env).stdout)
        assert rows[0]["state"] == "quarantined" and "2 infrastructure errors" in rows[0]["state_reason"]
        again = run_cli("submit", "suites/slow", "--inventory", str(inv), env=env)
        assert again.returncode == 3 and "out of service" in again.stdout + again.stderr
        released = run_cli("hosts", "--inventory", str(inv), "--release", "wedge", env=env)
        assert released.returncode == 0
        rows = json.loads(run_cli("hosts", "--inventory", str(inv), "--json", env=env).stdout)
        assert rows[0]["state"] != "quarantined"
    finally:
        if proc.poll() is None:
            proc.kill()
        os.killpg(worker.proc.pid, signal.SIGCONT)
        worker.stop()


def test_orchestrator_restart_picks_run_up(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    env |= {"PMUFARM_TEST_SLEEP": "3"}
    mark_good(env, ["solo"])
    worker = start_worker(env, ["solo"], tmp_path / "logs")
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "suites/smoke",
                     "--inventory", str(inventory(tmp_path, ["solo"])))
    try:
        wait_for(lambda: busy(broker), 60, "the suite to start", proc)
        proc.kill()  # the orchestrator dies mid-run; the agent carries on
        proc.wait()
        run_id = db(env, "SELECT id FROM runs")[0][0]
        assert db(env, "SELECT status FROM runs") == [("running",)]
        st = run_cli("--reports-dir", str(tmp_path / "r"), "status", run_id, "--wait", env=env, timeout=120)
    finally:
        worker.stop()
    assert st.returncode == 0, st.stdout + st.stderr
    assert db(env, "SELECT status FROM runs") == [("done",)]
    assert sorted(db(env, "SELECT suite, status FROM jobs")) == [("slow", "passed"), ("smoke", "passed")]
    assert (tmp_path / "r" / run_id / "summary.md").exists()


# ---- liveness judged right (issue 19): only the job's own worker speaks for it, on the broker's clock.
# The clock skew is faked at one boundary we control: FARM_TEST_CLOCK_SKEW shifts the agent's wall clock
# (agent.heartbeat.agent_clock), because two machines with skewed clocks cannot exist in CI.

def _executions(env: dict[str, str]) -> int:
    marker = Path(env["PMUFARM_TEST_MARKER"])
    return len(marker.read_text().split()) if marker.exists() else 0


def test_agent_clock_behind_by_15s_is_not_lost(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    """The agent's clock 15 s behind the orchestrator's: its live job must not look 15 s stale."""
    env |= {"PMUFARM_TEST_SLEEP": "4", "FARM_MAX_ATTEMPTS": "1"}
    mark_good(env, ["skewed"])
    worker = start_worker(env | {"FARM_TEST_CLOCK_SKEW": "-15"}, ["skewed"], tmp_path / "logs")
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "--inventory",
                     str(inventory(tmp_path, ["skewed"])))
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        worker.stop()
    assert proc.returncode == 0, out
    assert db(env, "SELECT attempt, status FROM jobs WHERE suite='slow'") == [(1, "passed")], out
    assert _executions(env) == 1


def test_agent_clock_ahead_by_15s_wedge_is_seen(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    """The agent's clock 15 s ahead: a wedged (SIGSTOPped) agent must still be found out, within the limit."""
    env |= {"PMUFARM_TEST_SLEEP": "30", "FARM_MAX_ATTEMPTS": "1", "FARM_QUARANTINE_AFTER": "100"}
    mark_good(env, ["ahead"])
    worker = start_worker(env | {"FARM_TEST_CLOCK_SKEW": "15"}, ["ahead"], tmp_path / "logs")
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "--inventory",
                     str(inventory(tmp_path, ["ahead"])))
    try:
        wait_for(lambda: busy(broker), 60, "the suite to start", proc)
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        # The limit is 2 intervals + 2 s (4 s here); before the fix the 15 s skew added 15 s to it.
        assert time.monotonic() - stopped_at < 13, out
    finally:
        if proc.poll() is None:
            proc.kill()
        os.killpg(worker.proc.pid, signal.SIGCONT)
        worker.stop()
    assert proc.returncode == 3, out
    (status, tail), = db(env, "SELECT status, log_tail FROM jobs WHERE suite='slow'")
    assert status == "infra_error" and "stopped heartbeating" in tail, out


def test_agent_back_after_25s_runs_its_next_job(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    """Farm interval (10 s); the agent dies mid-suite and comes back 25 s later (a reboot, a slow restart).

    The killed attempt is infra_error; the jobs the new agent runs must pass, not be judged by the dead
    agent's last beat.
    """
    env |= {"FARM_HEARTBEAT_INTERVAL": "10", "PMUFARM_TEST_SLEEP": "3", "FARM_MAX_ATTEMPTS": "2",
            "FARM_QUARANTINE_AFTER": "100"}
    mark_good(env, ["reboot", "other"])
    worker = start_worker(env, ["reboot"], tmp_path / "logs")
    # A farm has other hosts busy meanwhile; their jobs keep the orchestrator reading heartbeats every second.
    other = start_worker(env | {"PMUFARM_TEST_SLEEP": "20"}, ["other"], tmp_path / "logs")
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "suites/slow2",
                     "--inventory", str(inventory(tmp_path, ["reboot", "other"])), "--expires", "300")
    try:
        wait_for(lambda: "reboot" in busy(broker), 60, "the first suite to start", proc)
        time.sleep(0.5)
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
        time.sleep(25)
        worker = start_worker(env, ["reboot"], tmp_path / "logs")
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        worker.stop()
        other.stop()
    rows = db(env, "SELECT host, suite, attempt, status FROM jobs ORDER BY id")
    assert proc.returncode == 0, (rows, out)
    finals = sorted((h, s, st) for h, s, _, st in rows if st != "infra_error")
    assert finals == [(h, s, "passed") for h in ("other", "reboot") for s in ("slow", "slow2")], (rows, out)
    assert [r[3] for r in rows].count("infra_error") == 1, rows  # only the killed attempt


def test_given_up_attempt_stops_on_the_agent(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    """Only the worker's main process wedges (no beats), its pool process runs on: once the orchestrator
    gives the attempt up, the agent kills the suite instead of running it beside a retry."""
    env |= {"PMUFARM_TEST_SLEEP": "60", "FARM_MAX_ATTEMPTS": "1", "FARM_QUARANTINE_AFTER": "100"}
    mark_good(env, ["half"])
    worker = start_worker(env, ["half"], tmp_path / "logs")
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "--inventory",
                     str(inventory(tmp_path, ["half"])))
    try:
        wait_for(lambda: _executions(env), 60, "the suite to start", proc)
        suite_pid = int(Path(env["PMUFARM_TEST_MARKER"]).read_text().split()[0])
        os.kill(worker.proc.pid, signal.SIGSTOP)  # the main process only: heartbeats stop
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 3, out

        def gone() -> bool:
            try:
                return Path(f"/proc/{suite_pid}/stat").read_text().split()[2] == "Z"
            except FileNotFoundError:
                return True
        wait_for(gone, 20, "the given-up suite to be killed")  # well before its 60 s sleep ends
    finally:
        if proc.poll() is None:
            proc.kill()
        os.kill(worker.proc.pid, signal.SIGCONT)
        worker.stop()


def test_wedge_seen_under_the_farm_acl(tmp_path: Path) -> None:
    """A farm broker with the ACL (`farm` user, -@dangerous): INFO is denied, liveness must still work."""
    from orchestrator.broker import SecuredRedisServer

    server = SecuredRedisServer(tmp_path / "acl", bind=["127.0.0.1"], port=free_port()).start()
    env = {"FARM_STATE_DIR": str(tmp_path / "st"), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent"),
           "PMUFARM_TREE": str(TREE), "FARM_BROKER_URL": server.url, "FARM_HEARTBEAT_INTERVAL": "1",
           "PMUFARM_TEST_MARKER": str(tmp_path / "executions.txt"), "PMUFARM_TEST_SLEEP": "60",
           "FARM_MAX_ATTEMPTS": "1", "FARM_QUARANTINE_AFTER": "100"}
    mark_good(env, ["acl"])
    worker = start_worker(env, ["acl"], tmp_path / "logs")
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "--inventory",
                     str(inventory(tmp_path, ["acl"])))
    try:
        wait_for(lambda: Path(env["PMUFARM_TEST_MARKER"]).exists(), 60, "the suite to start", proc)
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        out, _ = proc.communicate(timeout=40)  # before the fix: no verdict until the 60 s suite ends
    finally:
        if proc.poll() is None:
            proc.kill()
        os.killpg(worker.proc.pid, signal.SIGCONT)
        worker.stop()
        server.stop()
    assert proc.returncode == 3, out
    assert "stopped heartbeating" in db(env, "SELECT log_tail FROM jobs WHERE suite='slow'")[0][0], out


def test_forged_result_is_refused(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    """Anyone holding the broker password can write a task's result key. A passing result set written for a
    queued job by someone other than the agent that got the job is refused and logged, never stored as a pass."""
    from agent.celery_app import make_app

    mark_good(env, ["victim"])
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/smoke", "--inventory",
                     str(inventory(tmp_path, ["victim"])), "--expires", "60")  # no agent: the job stays queued
    try:
        task_id = wait_for(lambda: (db(env, "SELECT task_id FROM jobs WHERE suite='smoke'") or [(None,)])[0][0],
                           60, "the job to be queued", proc)
        forger = make_app(env["FARM_BROKER_URL"])
        forged = {"host": "victim", "suite": "smoke", "status": "passed", "exit_code": 0, "facts": {},
                  "tests": [{"nodeid": "suites/smoke/test_x.py::test_ok", "outcome": "passed"}], "log_tail": ""}
        forger.backend.store_result(task_id, forged, "SUCCESS")
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, out
    assert "result refused" in out, out
    (status, tail), = db(env, "SELECT status, log_tail FROM jobs WHERE suite='smoke'")
    assert status == "infra_error" and "does not carry the token" in tail
    assert db(env, "SELECT COUNT(*) FROM results") == [(0,)]


def test_remote_control_refused_unless_enabled(tmp_path: Path, broker: RedisServer, env: dict[str, str]) -> None:
    """A broker-password holder broadcasts `shutdown` and `add_consumer`: the agent ignores both (it answers
    ping/active_queues only), unless FARM_REMOTE_CONTROL=1 on the agent enables remote control."""
    from agent.celery_app import make_app

    app = make_app(env["FARM_BROKER_URL"])
    worker = start_worker(env, ["ctl"], tmp_path / "logs")
    try:
        wait_for(lambda: app.control.ping(destination=[worker.node], timeout=0.5), 60, "the worker to answer ping")
        app.control.add_consumer("host.elsewhere", destination=[worker.node])
        app.control.shutdown(destination=[worker.node])
        time.sleep(3)
        assert worker.alive(), "a remote shutdown stopped the agent"
        queues = app.control.inspect(destination=[worker.node], timeout=2).active_queues() or {}
        assert [q["name"] for q in queues.get(worker.node, [])] == ["host.ctl"], queues
    finally:
        worker.stop()
    enabled = start_worker(env | {"FARM_REMOTE_CONTROL": "1"}, ["ctl"], tmp_path / "logs")
    try:
        wait_for(lambda: app.control.ping(destination=[enabled.node], timeout=0.5), 60, "the worker to answer ping")
        app.control.shutdown(destination=[enabled.node])
        wait_for(lambda: not enabled.alive(), 30, "the enabled worker to obey shutdown")
    finally:
        enabled.stop()


def test_volatile_broker_restart_is_not_blamed_on_the_host(tmp_path: Path) -> None:
    """A farm broker without AOF: submit warns; a restart drops the queued job, which then expires. That is
    the broker's loss, said so, and not counted against the (healthy) host."""
    server = RedisServer(tmp_path / "volatile", port=free_port()).start()  # --appendonly no, --save ""
    env = {"FARM_STATE_DIR": str(tmp_path / "st"), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent"),
           "PMUFARM_TREE": str(TREE), "FARM_BROKER_URL": server.url, "FARM_HEARTBEAT_INTERVAL": "1"}
    mark_good(env, ["steady"])
    proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/smoke", "--inventory",
                     str(inventory(tmp_path, ["steady"])), "--expires", "6")  # its agent is not up yet
    try:
        # The message itself in the queue (the task id is stored a moment before it is sent).
        wait_for(lambda: server.client().llen("host.steady"), 60, "the job to be queued", proc)
        server.stop()
        server.start()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert "no append-only file" in out, out
    assert proc.returncode == 3, out
    (tail,), = db(env, "SELECT log_tail FROM jobs WHERE suite='smoke'")
    assert "broker restarted after it was queued" in tail and "offline?" not in tail, tail
    assert db(env, "SELECT state, infra_streak FROM hosts WHERE name='steady'") == [("good", 0)]


def test_per_host_broker_users_see_only_their_queue(tmp_path: Path) -> None:
    """`broker-acl --inventory` gives each remote host its own broker user: its agent runs its jobs (and answers
    ping) but cannot read another host's queue, bindings or in-flight messages (where the job tokens are)."""
    from agent.celery_app import make_app
    from agent.heartbeat import redis_from_url

    inv = tmp_path / "farm.yaml"
    inv.write_text("- {name: alpha, address: 192.0.2.1}\n- {name: beta, address: 192.0.2.2}\n")
    port = free_port()
    acl, url_file = tmp_path / "users.acl", tmp_path / "farm.url"
    made = run_cli("broker-acl", "--acl-file", str(acl), "--url-file", str(url_file), "--host", "127.0.0.1",
                   "--port", str(port), "--inventory", str(inv))
    assert made.returncode == 0, made.stderr
    farm_url, alpha_url = url_file.read_text().strip(), (tmp_path / "agents" / "alpha.url").read_text().strip()

    class AclServer(RedisServer):
        def client(self) -> redis.Redis:
            return redis_from_url(farm_url)  # `default` is off: the readiness ping needs the farm user

    server = AclServer(tmp_path / "b", port=port, extra=["--aclfile", str(acl)]).start()
    env = {"FARM_STATE_DIR": str(tmp_path / "st"), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent"),
           "PMUFARM_TREE": str(TREE), "FARM_BROKER_URL": farm_url, "FARM_HEARTBEAT_INTERVAL": "1"}
    mark_good(env, ["alpha"])
    worker = Worker(["alpha"], alpha_url, tmp_path / "logs", env={k: v for k, v in env.items()
                                                                  if k != "FARM_BROKER_URL"}, publish_facts=False)
    worker.start()
    app = make_app(farm_url)
    try:
        wait_for(lambda: app.control.ping(destination=[worker.node], timeout=0.5), 60, "alpha's agent to answer")
        r = run_cli("--reports-dir", str(tmp_path / "r"), "submit", "suites/smoke", "--inventory", str(inv),
                    "--hosts", "alpha", env=env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        alpha = redis_from_url(alpha_url)
        for attempt in (lambda: alpha.lrange("host.beta", 0, -1), lambda: alpha.hgetall("unacked.beta"),
                        lambda: alpha.hgetall("unacked"), lambda: alpha.sadd("_kombu.binding.host.beta", "x"),
                        lambda: alpha.rpush("host.beta", "x")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
    finally:
        worker.stop()
        server.stop()
