"""The store survives (issue 19, point 4): a 0-byte, corrupted or read-only store and a disk that fills
mid-run give one line and exit 3, never a traceback and never silent loss, and leave the run resumable.

Real SQLite files, a real full tmpfs and a real read-only bind mount (both need root: skipped otherwise,
naming why), a real redis-server and agent worker for the mid-run cases.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.localfarm import RedisServer, free_port
from orchestrator.store import Store
from tests.conftest import ROOT, TREE, run_cli
from tests.test_resilience import busy, db, inventory, mark_good, start_worker, submit_bg, wait_for


def one_line_exit_3(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 3, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount ({' '.join(args)}): needs root: {r.stderr.strip()}")


def test_zero_byte_store_is_refused_not_wiped(tmp_path: Path) -> None:
    store = tmp_path / "st" / "pmufarm.sqlite"
    store.parent.mkdir()
    store.write_bytes(b"")
    r = run_cli("--state-dir", str(store.parent), "runs")
    one_line_exit_3(r, "is empty (0 bytes")
    assert store.stat().st_size == 0  # left as found: no fresh schema silently written over it


def test_corrupted_store_is_one_line(tmp_path: Path) -> None:
    store = tmp_path / "st" / "pmufarm.sqlite"
    store.parent.mkdir()
    store.write_bytes(b"definitely not SQLite " * 500)
    for args in (["runs"], ["status"], ["submit", "suites/smoke"]):
        one_line_exit_3(run_cli("--state-dir", str(store.parent), *args, env={"PMUFARM_TREE": str(TREE)}),
                        "corrupted")


def test_read_only_store_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "st"
    Store(state / "pmufarm.sqlite").close()
    mount("--bind", str(state), str(state))
    try:
        mount("-o", "remount,ro,bind", str(state))
        one_line_exit_3(run_cli("--state-dir", str(state), "runs"), "read-only")
    finally:
        subprocess.run(["umount", str(state)], check=False)


def test_status_exit_codes_follow_submit(tmp_path: Path) -> None:
    """An interrupted run or one of infrastructure errors is not a pass: `status` exits 3 (it used to be 0)."""
    state = tmp_path / "st"
    store = Store(state / "pmufarm.sqlite")
    for run_id, run_status, job_status in (("r-int", "interrupted", "infra_error"), ("r-infra", "done", "infra_error"),
                                           ("r-pass", "done", "passed"), ("r-fail", "interrupted", "failed")):
        store.create_run(run_id, ["smoke"], "inv")
        job = store.add_job(run_id, {"name": "h"}, "smoke")
        tests = [{"nodeid": "t", "outcome": "failed" if job_status == "failed" else "passed"}]
        store.finish_job(job, {"host": "h", "suite": "smoke", "status": job_status,
                               "tests": [] if job_status == "infra_error" else tests})
        store.finish_run(run_id, run_status)
    store.close()
    codes = {r: run_cli("--state-dir", str(state), "status", r).returncode
             for r in ("r-int", "r-infra", "r-pass", "r-fail")}
    assert codes == {"r-int": 3, "r-infra": 3, "r-pass": 0, "r-fail": 1}


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    server = RedisServer(tmp_path / "broker", port=free_port(), extra=["--appendonly", "yes"]).start()
    env = {"FARM_STATE_DIR": str(tmp_path / "st"), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent"),
           "PMUFARM_TREE": str(TREE), "FARM_BROKER_URL": server.url, "FARM_HEARTBEAT_INTERVAL": "1",
           "PMUFARM_TEST_MARKER": str(tmp_path / "executions.txt")}
    yield server, env
    server.stop()


def test_job_saved_without_task_id_is_sent_on_resume(tmp_path: Path, farm: tuple[RedisServer, dict[str, str]]
                                                     ) -> None:
    """An orchestrator that died between saving a job and naming its task (older stores): `status --wait`
    sends it and the run completes, instead of crashing on a job with no task id."""
    server, env = farm
    mark_good(env, ["solo"])
    store = Store(Path(env["FARM_STATE_DIR"]) / "pmufarm.sqlite")
    store.create_run("r-orphan", ["smoke"], "inv")
    store.add_job("r-orphan", {"name": "solo", "address": "local"}, "smoke")  # no task id, never sent
    store.close()
    worker = start_worker(env, ["solo"], tmp_path / "logs")
    try:
        st = run_cli("--reports-dir", str(tmp_path / "r"), "status", "r-orphan", "--wait", env=env, timeout=120)
    finally:
        worker.stop()
    assert st.returncode == 0 and "Traceback" not in st.stderr, st.stdout + st.stderr
    assert db(env, "SELECT suite, status FROM jobs") == [("smoke", "passed")]
    assert db(env, "SELECT status FROM runs") == [("done",)]


def test_disk_full_mid_run_keeps_the_result_resumable(tmp_path: Path, farm: tuple[RedisServer, dict[str, str]]
                                                      ) -> None:
    """The store's disk fills while a suite runs: one line, exit 3, run left 'running'; once space is back,
    `status RUN --wait` stores the finished result (it stayed in the broker) exactly once."""
    server, env = farm
    state = Path(env["FARM_STATE_DIR"])
    state.mkdir()
    mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state))
    try:
        env |= {"PMUFARM_TEST_SLEEP": "4"}
        mark_good(env, ["solo"])
        worker = start_worker(env, ["solo"], tmp_path / "logs")
        proc = submit_bg(env, "--reports-dir", str(tmp_path / "r"), "submit", "suites/slow", "--inventory",
                         str(inventory(tmp_path, ["solo"])))
        filler = state / "filler"
        try:
            wait_for(lambda: busy(server), 60, "the suite to start", proc)
            wait_for(lambda: db(env, "SELECT status FROM jobs") == [("running",)], 30, "the job marked running", proc)
            with open(filler, "wb", buffering=0) as fh, pytest.raises(OSError) as full:
                while True:
                    fh.write(b"\0" * 65536)
            assert full.value.errno == errno.ENOSPC
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 3, out
            assert "Traceback" not in out and "disk is full" in out, out
            filler.unlink()
            assert db(env, "SELECT status FROM runs") == [("running",)]
            run_id = db(env, "SELECT id FROM runs")[0][0]
            st = run_cli("--reports-dir", str(tmp_path / "r"), "status", run_id, "--wait", env=env, timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            worker.stop()
        assert st.returncode == 0, st.stdout + st.stderr
        assert db(env, "SELECT status FROM jobs") == [("passed",)]
        assert db(env, "SELECT COUNT(*) FROM results") == [(1,)]
        assert len(Path(env["PMUFARM_TEST_MARKER"]).read_text().split()) == 1  # resumed, not run again
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)



def test_unwritable_reports_dir_is_one_line_results_kept(tmp_path: Path) -> None:
    """Reports cannot be written (a file where their directory should be): one line, exit 3, results stored."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    inv = tmp_path / "one.yaml"
    inv.write_text("- {name: solo, address: local}\n")
    env = {"FARM_STATE_DIR": str(tmp_path / "st"), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent"),
           "PMUFARM_TREE": str(TREE)}
    mark_good(env, ["solo"])
    r = run_cli("--reports-dir", str(blocker / "reports"), "submit", "suites/smoke", "--inventory", str(inv), env=env)
    one_line_exit_3(r, "cannot write reports")
    assert db(env, "SELECT status FROM jobs") == [("passed",)]
    assert db(env, "SELECT COUNT(*) FROM results")[0][0] > 0


def test_malformed_numeric_settings_refused(tmp_path: Path) -> None:
    for name, value in (("FARM_MAX_ATTEMPTS", "0"), ("FARM_HEARTBEAT_INTERVAL", "soon"),
                        ("FARM_QUARANTINE_AFTER", "-1")):
        r = run_cli("--state-dir", str(tmp_path / "st"), "submit", "suites/smoke", "--inventory",
                    str(ROOT / "inventory" / "sim.yaml"), env={"PMUFARM_TREE": str(TREE), name: value})
        assert r.returncode == 2 and name in r.stderr and "Traceback" not in r.stderr, r.stderr
