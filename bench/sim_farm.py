"""Dispatch and aggregation for N simulated hosts running the isolation suite (default N = 1000).

The whole `orchestrator submit` process is timed on the local default: private Redis, one shared
worker for the simulated hosts (2 prefork processes on this 2-core box), one job per host, the store,
and every report (JUnit per CPU model, matrix, KCIDB, summary). Hosts are cycled over the
microarchitectures of inventory/sim.yaml and marked health-checked beforehand, as in a farm's steady
state. Peak RSS is the largest single process (orchestrator, worker, or a suite run), from
RUSAGE_CHILDREN. Goal (issue 5): <= 60 s and <= 1 GiB for 1,000 hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.store import Store  # noqa: E402


def make_inventory(path: Path, n: int) -> list[str]:
    base = yaml.safe_load((ROOT / "inventory" / "sim.yaml").read_text())["hosts"]
    hosts = []
    for i in range(n):
        proto = base[i % len(base)]
        hosts.append({"name": f"sim{i:04d}", "address": "local", "driver": "model",
                      "model": {"uarch": proto["model"]["uarch"]}, "labels": {"simulated": "true"}})
    path.write_text(yaml.safe_dump({"hosts": hosts}))
    return [h["name"] for h in hosts]


def measure(n: int = 1000, suite: str = "suites/isolation") -> dict:
    with tempfile.TemporaryDirectory(prefix="pmufarm-simfarm-") as tmp:
        tmpdir = Path(tmp)
        inv = tmpdir / "farm.yaml"
        names = make_inventory(inv, n)
        state = tmpdir / "st"
        store = Store(state / "pmufarm.sqlite")
        for name in names:
            store.set_host_state(name, "good", "bench: steady state", 0)
        store.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
        env.update(FARM_STATE_DIR=str(state), FARM_AGENT_STATE_DIR=str(tmpdir / "agent"))
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--reports-dir", str(tmpdir / "reports"),
                            "submit", suite, "--inventory", str(inv), "--expires", "3600"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.monotonic() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if r.returncode not in (0, 1):
            raise SystemExit(f"submit failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}")
        st = Store(state / "pmufarm.sqlite")
        run_id = st.latest_run_id()
        jobs = st.jobs(run_id, with_results=False) if run_id else []
        results = sum(st.counts(run_id).values()) if run_id else 0
        junit_files = len(list((tmpdir / "reports" / str(run_id) / "junit").glob("*.xml")))
    return {"name": "sim_farm", "hosts": n, "suite": suite, "wall_s": wall, "per_host_ms": 1000 * wall / n,
            "peak_rss_mib": peak_kib / 1024, "jobs": len(jobs), "results": results, "junit_files": junit_files,
            "exit_code": r.returncode, "goal": {"wall_s": 60, "peak_rss_mib": 1024}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="50 hosts")
    args = ap.parse_args()
    res = measure(50 if args.quick else args.hosts)
    print(json.dumps(res))
    print(f"{res['hosts']} simulated hosts: {res['wall_s']:.1f}s wall ({res['per_host_ms']:.0f} ms/host), "
          f"peak RSS {res['peak_rss_mib']:.0f} MiB, {res['results']} results (goal <= 60 s, <= 1 GiB)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
