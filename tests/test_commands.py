"""The everyday commands end to end (issue 18): live progress, partial results of a hung suite,
concurrent local runs, the not-tested verdict. Real redis-server, real Celery workers, real pytest."""

from __future__ import annotations

import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def _one_host(tmp_path: Path, name: str = "solo") -> Path:
    inv = tmp_path / f"{name}.yaml"
    inv.write_text(f"- {{name: {name}, address: local}}\n")
    return inv


def _db(farm_env: dict[str, str], sql: str) -> list[tuple]:
    with sqlite3.connect(Path(farm_env["FARM_STATE_DIR"]) / "pmufarm.sqlite") as db:
        return db.execute(sql).fetchall()


class Lines:
    """A child's output, line by line, readable with a deadline (no blocking read in the test)."""

    def __init__(self, stream) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, *needles: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if all(n in line for n in needles):
                return line
        raise AssertionError(f"no line with {needles} in:\n{''.join(self.seen)}")

    def rest(self) -> str:
        while (line := self.q.get(timeout=30)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def _submit(tmp_path: Path, farm_env: dict[str, str], *args: str, env: dict[str, str] | None = None,
            **popen: object) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")} | farm_env | (env or {})
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "--reports-dir", str(tmp_path / "r"),
                             "submit", *args], cwd=ROOT, env=full, text=True, **popen)


def test_progress_in_a_pipe_and_hung_suite_keeps_finished_tests(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """Plain lines in a pipe show done/total and the running test mid-run; --timeout then kills the hung
    test: the finished test is kept, the hung one is named (store, JUnit, summary), exit 3 (infra)."""
    gate = tmp_path / "gate"  # never created: test_waits_for_gate hangs
    # Long enough for a loaded box to start pytest and finish test_first; the hang itself is certain.
    proc = _submit(tmp_path, farm_env, "suites/steps", "--inventory", str(_one_host(tmp_path)), "--timeout", "12",
                   env={"PMUFARM_TEST_GATE": str(gate)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = Lines(proc.stdout)
    out.wait_for("solo steps: running 1/3", "test_waits_for_gate")
    assert proc.poll() is None, "progress must be seen while the suite runs"
    text = out.rest()
    assert proc.wait(timeout=60) == 3, text
    assert "ValueError" not in (Path(farm_env["FARM_STATE_DIR"]) / "logs" / "worker-solo.log").read_text()
    rows = _db(farm_env, "SELECT r.name, r.outcome, r.message FROM results r JOIN jobs j ON j.id=r.job_id "
                         "WHERE j.suite='steps' ORDER BY r.rowid")
    assert [r[:2] for r in rows] == [("test_first", "passed"), ("test_waits_for_gate", "timeout")]
    assert "--timeout (12s)" in rows[1][2]
    assert _db(farm_env, "SELECT status FROM jobs WHERE suite='steps'") == [("timeout",)]
    run_id = _db(farm_env, "SELECT id FROM runs")[0][0]
    junit = "".join(p.read_text() for p in (tmp_path / "r" / run_id / "junit").glob("*.xml"))
    assert 'name="test_waits_for_gate"' in junit and 'type="timeout"' in junit and 'name="test_first"' in junit
    xsd = ROOT.parent / "shared" / "reference" / "junit" / "JUnit.xsd"
    if xsd.exists():  # the partial file is as valid as a complete one
        from lxml import etree

        schema = etree.XMLSchema(etree.parse(str(xsd)))
        for path in (tmp_path / "r" / run_id / "junit").glob("*.xml"):
            assert schema.validate(etree.parse(str(path))), schema.error_log
    summary = (tmp_path / "r" / run_id / "summary.md").read_text()
    assert "test_waits_for_gate" in summary and "hung" in summary
    assert "while running suites/steps/test_steps.py::test_waits_for_gate" in text


def test_progress_on_a_tty_uses_rich(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """On a terminal the live table shows the same done/total and test name; the gate opens, all pass."""
    import pty

    gate = tmp_path / "gate"
    master, slave = pty.openpty()
    proc = _submit(tmp_path, farm_env, "suites/steps", "--inventory", str(_one_host(tmp_path)),
                   env={"PMUFARM_TEST_GATE": str(gate), "COLUMNS": "160", "TERM": "xterm"},
                   stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    buf = b""
    deadline = time.monotonic() + 90
    try:
        while b"running 1/3" not in buf or b"test_waits_for_gate" not in buf:
            assert time.monotonic() < deadline and proc.poll() is None, buf.decode(errors="replace")
            import select

            if select.select([master], [], [], 0.5)[0]:
                buf += os.read(master, 65536)
        gate.touch()
        while proc.poll() is None:
            assert time.monotonic() < deadline, buf.decode(errors="replace")
            if select.select([master], [], [], 0.5)[0]:
                try:
                    buf += os.read(master, 65536)
                except OSError:
                    break
        proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = buf.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "\x1b[" in text, "a TTY gets rich's live display"
    assert "3 passed" in text


def test_only_harness_ran_is_not_tested_exit_4(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """Every subject test skipped for a missing fact: console, summary, JUnit and exit code say NOT TESTED."""
    r = run_cli("--reports-dir", str(tmp_path / "r"), "submit", "suites/untested", "--inventory",
                str(_one_host(tmp_path)), env=farm_env)
    assert r.returncode == 4, r.stdout + r.stderr
    # The reason is the mediated verdict's when this host lacks it, else the skip reason.
    assert "NOT TESTED" in r.stdout and "solo untested: not tested here: " in r.stdout, r.stdout
    assert "mediated vPMU" in r.stdout or "requires vendor=nosuchvendor" in r.stdout, r.stdout
    run_id = _db(farm_env, "SELECT id FROM runs")[0][0]
    summary = (tmp_path / "r" / run_id / "summary.md").read_text()
    assert summary.startswith(f"# pmufarm run {run_id}: NOT TESTED")
    junit = "".join(p.read_text() for p in (tmp_path / "r" / run_id / "junit").glob("*.xml"))
    assert '<property name="tested" value="false"' in junit and "not_tested_reason" in junit
    # --json on the commands that print tables.
    import json

    st = run_cli("status", "--json", env=farm_env)
    assert st.returncode == 4, st.stderr
    jobs = {j["suite"]: j for j in json.loads(st.stdout)["jobs"]}
    assert jobs["untested"]["not_tested"] and jobs["untested"]["counts"] == {"passed": 1, "skipped": 1}
    listed = json.loads(run_cli("runs", "--json", env=farm_env).stdout)
    assert [r["id"] for r in listed] == [run_id] and listed[0]["counts"]["skipped"] == 1


def test_two_local_submits_at_once_both_finish(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """Same state directory, same host: each submit starts its own private Redis and worker."""
    inv = _one_host(tmp_path)
    procs = [_submit(tmp_path / str(i), farm_env, "suites/smoke", "--inventory", str(inv),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert _db(farm_env, "SELECT status FROM runs") == [("done",), ("done",)], outs
    assert _db(farm_env, "SELECT COUNT(*) FROM jobs WHERE suite='smoke' AND status='passed'") == [(2,)]
    assert not list((Path(farm_env["FARM_STATE_DIR"]) / "farms").iterdir()), "private brokers left behind"


def test_cli_help_lists_lazy_commands_with_their_own_help() -> None:
    """`orchestrator --help` shows gate/deploy/broker-acl without importing them; the text is theirs."""
    import click

    from orchestrator.cli import LazyGroup, main

    ctx = click.Context(main)
    for name, (_, _, short) in LazyGroup.lazy.items():
        assert main.get_command(ctx, name).get_short_help_str(500) == short, name
    for prog in ("orchestrator.cli", "agent.cli"):
        r = subprocess.run([sys.executable, "-m", prog, "--version"], capture_output=True, text=True, cwd="/")
        assert r.returncode == 0 and "(pmufarm) " in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", "--help"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and "gate" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()}
    assert not imported & {"orchestrator.gate", "orchestrator.deploy", "orchestrator.broker", "pydantic"}, \
        "--help imported a subcommand's heavy modules"


def test_submit_from_another_directory_uses_the_installed_tree(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """No inventory/ in the current directory: the default inventory/local.yaml comes from the installed tree."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli("--reports-dir", str(tmp_path / "r"), "submit", "suites/smoke", env=farm_env, cwd=elsewhere)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "inventory not found" not in r.stderr and "local smoke: passed" in r.stdout


def test_celery_tools_inspect_ping_and_task_events(tmp_path: Path, farm_env: dict[str, str]) -> None:
    """A farm broker and an agent started with -E: `celery -A agent.celery_app inspect ping` answers, and the
    event stream shows a job from the orchestrator's task-sent to task-succeeded with its outcome counts."""
    from agent.celery_app import make_app
    from orchestrator.localfarm import RedisServer, Worker, wait_for_workers

    server = RedisServer(tmp_path / "broker").start()
    worker = Worker(["solo"], server.url, tmp_path / "logs", env=farm_env, events=True)
    events: list[dict] = []
    try:
        worker.start()
        app = make_app(server.url)
        wait_for_workers(app, [worker])
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")} | farm_env | {
            "FARM_BROKER_URL": server.url}
        # -d: the reply of the one named worker ends the wait (no full --timeout on a healthy farm).
        ping = subprocess.run([sys.executable, "-m", "celery", "-A", "agent.celery_app", "inspect", "ping",
                               "-d", worker.node, "--timeout", "20"], capture_output=True, text=True, env=env,
                              cwd="/", timeout=60)
        assert ping.returncode == 0 and "pong" in ping.stdout and worker.node in ping.stdout, ping.stdout + ping.stderr

        conn = app.connection()
        receiver = app.events.Receiver(conn, handlers={"*": events.append})
        listener = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False),
                                    daemon=True)
        listener.start()
        time.sleep(0.5)  # the receiver's queue is bound before anything is sent
        r = run_cli("--reports-dir", str(tmp_path / "r"), "submit", "suites/smoke", "--inventory",
                    str(_one_host(tmp_path)), env={**farm_env, "FARM_BROKER_URL": server.url})
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(e["type"] == "task-succeeded" for e in events) < 2:
            time.sleep(0.1)
        receiver.should_stop = True
        listener.join(timeout=10)  # it checks should_stop every second; the broker must outlive it
        conn.release()
    finally:
        worker.kill()
        server.stop()
    kinds = {e["type"] for e in events}
    assert {"task-sent", "task-received", "task-started", "task-succeeded"} <= kinds, kinds
    done = [e["result"] for e in events if e["type"] == "task-succeeded"]
    # The outcome leads the result, within the part Flower shows.
    assert any("'status': 'passed', 'counts': {" in r[:200] for r in done), done


def test_make_setup_uses_a_venv_for_an_externally_managed_python(tmp_path: Path) -> None:
    """Stock Debian Python refuses pip (PEP 668): `make setup` plans a .venv for it, and this Python as is."""
    import sysconfig

    debian = Path("/usr/bin/python3")
    probe = "import os, sys, sysconfig; print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), " \
            "'EXTERNALLY-MANAGED')))"
    if not debian.exists() or subprocess.run([str(debian), "-c", probe], capture_output=True,
                                             text=True).stdout.strip() != "True":
        pytest.skip("no externally-managed /usr/bin/python3 on this machine (stock Debian Python)")
    plan = subprocess.run(["make", "-n", "setup", f"BASE_PYTHON={debian}", f"VENV={tmp_path / 'venv'}"],
                          cwd=ROOT, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                          if k != "PYTHON"})
    assert plan.returncode == 0, plan.stderr
    assert f"{debian} -m venv" in plan.stdout and f"{tmp_path / 'venv'}/bin/python -m pip install" in plan.stdout
    here = subprocess.run(["make", "-n", "setup", f"BASE_PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != "PYTHON"})
    managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
    if sys.prefix != sys.base_prefix or not managed:  # the Python running the tests is used as it is
        assert f"{sys.executable} -m pip install" in here.stdout, here.stdout
