"""The real harness on the emulated PMU: wall time per probe, and a whole suite through the farm.

    python bench/emulated.py [--runs N] [--layout L ...] [--probe P ...] [--no-submit] [--out FILE]

Per probe: the median (and min/max) wall time of ``vpmu run PROBE`` (release build) over ``--runs``
runs with the emulated PMU of each layout; every run must answer ``ok`` (or the host-side probes'
``unsupported``). Then, unless ``--no-submit``: the wall time of ``orchestrator submit suites/counters
--inventory inventory/emulated.yaml`` (a private local farm: redis, one worker per host).
Prints one JSON object (also written to ``--out`` when given), then one line of text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.drivers.emulated import HOST_SIDE_PROBES, LAYOUTS  # noqa: E402
from agent.drivers.kvm import DEFAULT_BINARY, build_harness  # noqa: E402
from agent.protocol import PROBES  # noqa: E402


def time_probe(binary: Path, layout: str, probe: str, runs: int) -> dict[str, float | str]:
    env = {**os.environ, "PMUFARM_EPMU": layout, "PMUFARM_EPMU_FAULTS": "", "PMUFARM_EPMU_ERRATA": ""}
    times, status = [], ""
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        proc = subprocess.run([str(binary), "run", probe], capture_output=True, text=True, check=False, env=env,
                              timeout=600)
        times.append((time.perf_counter_ns() - t0) / 1e6)
        status = json.loads(proc.stdout)["status"]
        if status == "error" or (status == "unsupported" and probe not in HOST_SIDE_PROBES
                                 and "has no" not in proc.stdout):
            raise SystemExit(f"{layout} {probe}: {proc.stdout.strip()[:300]}")
    return {"status": status, "median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2)}


def time_submit() -> dict[str, float | int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", "suites/counters", "--inventory",
                           "inventory/emulated.yaml"], cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=1800)
    return {"wall_s": round(time.perf_counter() - t0, 2), "exit": proc.returncode,
            "summary": (proc.stdout.strip().splitlines() or [""])[-2][:200]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layout", action="append", choices=list(LAYOUTS))
    ap.add_argument("--probe", action="append", choices=list(PROBES))
    ap.add_argument("--no-submit", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    binary = DEFAULT_BINARY if DEFAULT_BINARY.exists() else build_harness()
    layouts = a.layout or ["intel", "amd"]
    result: dict[str, object] = {"runs": a.runs, "probes": {}}
    for layout in layouts:
        result["probes"][layout] = {p: time_probe(binary, layout, p, a.runs) for p in a.probe or PROBES}  # type: ignore[index]
    if not a.no_submit:
        result["submit_counters"] = time_submit()
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    per = [v["median_ms"] for lay in result["probes"].values() for v in lay.values()]  # type: ignore[union-attr]
    line = f"emulated PMU: median probe {statistics.median(per):.1f} ms (max {max(per):.1f} ms) over {len(per)} probes"
    if "submit_counters" in result:
        line += f"; submit suites/counters on inventory/emulated.yaml: {result['submit_counters']['wall_s']} s"  # type: ignore[index]
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
