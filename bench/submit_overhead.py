"""`orchestrator submit` against plain `pytest` on the same suite, and time from submit to first test.

The broker and the worker are started once, before timing (the ratio excludes the Redis start, as the
goal asks); each sample is then a whole `orchestrator submit` process against a whole `pytest` process,
alternated so machine noise hits both alike. Goal: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.celery_app import make_app  # noqa: E402
from orchestrator.localfarm import RedisServer, Worker, wait_for_workers  # noqa: E402


def _first_test_time(agent_dir: Path, since: float) -> float | None:
    times = []
    for f in agent_dir.glob("runs/*/local/*/progress.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if "current" in rec and rec["t"] >= since:
                times.append(rec["t"])
    return min(times) - since if times else None


def measure(quick: bool = False, suite: str = "suites/isolation") -> dict:
    reps = 3 if quick else 10
    with tempfile.TemporaryDirectory(prefix="pmufarm-bench-") as tmp:
        tmpdir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
        env.update(FARM_STATE_DIR=str(tmpdir / "state"), FARM_AGENT_STATE_DIR=str(tmpdir / "agent"))
        server = RedisServer(tmpdir).start()
        worker = Worker(["local"], server.url, tmpdir / "logs",
                        env={"FARM_AGENT_STATE_DIR": env["FARM_AGENT_STATE_DIR"]})
        worker.start()
        try:
            wait_for_workers(make_app(server.url), [worker])
            env["FARM_BROKER_URL"] = server.url
            submit_cmd = [sys.executable, "-m", "orchestrator.cli", "--reports-dir", str(tmpdir / "reports"),
                          "submit", suite]
            pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite]
            submit_t, pytest_t, bare_t, first_t = [], [], [], []
            # The agent runs suites with PYTEST_DISABLE_PLUGIN_AUTOLOAD=1; time plain pytest both ways.
            bare_env = dict(env, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
            subprocess.run(submit_cmd, cwd=ROOT, env=env, capture_output=True, check=False)  # warm caches
            for _ in range(reps):
                t0 = time.time()
                r = subprocess.run(submit_cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                submit_t.append(time.time() - t0)
                if r.returncode not in (0, 1):
                    raise SystemExit(f"submit failed ({r.returncode}): {r.stderr.strip()[-300:]}")
                ft = _first_test_time(tmpdir / "agent", t0)
                if ft is not None:
                    first_t.append(ft)
                t0 = time.time()
                subprocess.run(pytest_cmd, cwd=ROOT, env=env, capture_output=True)
                pytest_t.append(time.time() - t0)
                t0 = time.time()
                subprocess.run(pytest_cmd, cwd=ROOT, env=bare_env, capture_output=True)
                bare_t.append(time.time() - t0)
        finally:
            worker.stop()
            server.stop()
    ratio = statistics.median(submit_t) / statistics.median(pytest_t)
    return {
        "name": "submit_vs_pytest",
        "suite": suite,
        "repetitions": reps,
        "submit_s": {"median": statistics.median(submit_t), "min": min(submit_t), "max": max(submit_t)},
        "pytest_s": {"median": statistics.median(pytest_t), "min": min(pytest_t), "max": max(pytest_t)},
        "pytest_no_autoload_s": {"median": statistics.median(bare_t), "min": min(bare_t), "max": max(bare_t)},
        "ratio": ratio,
        "ratio_same_plugins": statistics.median(submit_t) / statistics.median(bare_t),
        "goal_ratio": 1.10,
        "submit_to_first_test_s": {"median": statistics.median(first_t), "min": min(first_t),
                                   "max": max(first_t)} if first_t else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--suite", default="suites/isolation")
    args = ap.parse_args()
    res = measure(args.quick, args.suite)
    print(json.dumps(res))
    print(f"submit {res['submit_s']['median']:.2f}s vs pytest {res['pytest_s']['median']:.2f}s: "
          f"ratio {res['ratio']:.2f} (goal <= 1.10; {res['ratio_same_plugins']:.2f} against pytest with "
          f"plugin autoload off, as the agent runs it); first test after "
          f"{res['submit_to_first_test_s']['median'] if res['submit_to_first_test_s'] else float('nan'):.2f}s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
