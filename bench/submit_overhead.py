"""The orchestrator's own cost on the README's first command, side by side with the tool it wraps.

* cold ``orchestrator submit SUITE`` on the local default (no FARM_BROKER_URL: the command starts and stops
  its private redis-server and agent worker itself) against plain ``pytest SUITE``, alternated so machine
  noise hits both alike. Goal: overhead (median submit - median pytest) < 1 s on a quiet box;
* submit to first test: from the submit's start to the agent's first "test started" progress record;
* CLI start: ``orchestrator --help`` and ``agent --help`` against a bare interpreter. Goal: < +150 ms.

The state directory is warmed once (the host's first health check is not the command's everyday cost).
Prints one JSON object on stdout and a one-line summary on stderr; writes nothing else.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def _first_test_time(agent_dir: Path, since: float) -> float | None:
    times = []
    for f in agent_dir.glob("runs/*/*/*/progress.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if "current" in rec and rec["t"] >= since:
                times.append(rec["t"])
    return min(times) - since if times else None


def _timed(cmd: list[str], env: dict[str, str], check: tuple[int, ...] = (0,)) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode not in check:
        raise SystemExit(f"{' '.join(cmd[2:])} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
    return took


def measure(quick: bool = False, suite: str = "suites/isolation") -> dict[str, Any]:
    reps = 3 if quick else 10
    with tempfile.TemporaryDirectory(prefix="pmufarm-bench-") as tmp:
        tmpdir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}  # the local default
        env.update(FARM_STATE_DIR=str(tmpdir / "state"), FARM_AGENT_STATE_DIR=str(tmpdir / "agent"))
        # Exit 4 (not tested here) is what a PMU-less box answers; it is a complete run.
        ok = (0, 1, 4)
        submit_cmd = [sys.executable, "-m", "orchestrator.cli", "--reports-dir", str(tmpdir / "reports"),
                      "submit", suite]
        pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite]
        cli = {"bare": [sys.executable, "-c", "pass"],
               "orchestrator": [sys.executable, "-m", "orchestrator.cli", "--help"],
               "agent": [sys.executable, "-m", "agent.cli", "--help"]}
        _timed(submit_cmd, env, ok)  # warm: the host's first-ever health check, page cache
        submit_t, pytest_t, first_t = [], [], []
        cli_t: dict[str, list[float]] = {k: [] for k in cli}
        for _ in range(reps):
            t0 = time.time()
            submit_t.append(_timed(submit_cmd, env, ok))
            ft = _first_test_time(tmpdir / "agent", t0)
            if ft is not None:
                first_t.append(ft)
            pytest_t.append(_timed(pytest_cmd, env, (0, 1, 5)))
            for k, cmd in cli.items():
                cli_t[k].append(_timed(cmd, env))
    submit, pytest_ = statistics.median(submit_t), statistics.median(pytest_t)
    bare = statistics.median(cli_t["bare"])
    return {
        "name": "submit_overhead",
        "suite": suite,
        "repetitions": reps,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "submit_cold_s": _stats(submit_t),
        "pytest_s": _stats(pytest_t),
        "overhead_s": round(submit - pytest_, 3),
        "ratio": round(submit / pytest_, 2),
        "goal_overhead_s": 1.0,
        "submit_to_first_test_s": _stats(first_t) if first_t else None,
        "cli_start_s": {k: _stats(v) for k, v in cli_t.items()},
        "cli_over_bare_s": {k: round(statistics.median(cli_t[k]) - bare, 3) for k in ("orchestrator", "agent")},
        "goal_cli_over_bare_s": 0.150,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--suite", default="suites/isolation")
    args = ap.parse_args()
    res = measure(args.quick, args.suite)
    print(json.dumps(res))
    over = res["cli_over_bare_s"]
    first = res["submit_to_first_test_s"]
    print(f"cold submit {res['submit_cold_s']['median']:.2f}s vs pytest {res['pytest_s']['median']:.2f}s: "
          f"overhead {res['overhead_s']:.2f}s (goal < 1 s); first test after "
          f"{first['median'] if first else float('nan'):.2f}s; --help over bare python: orchestrator "
          f"+{over['orchestrator'] * 1000:.0f} ms, agent +{over['agent'] * 1000:.0f} ms (goal < 150 ms)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
