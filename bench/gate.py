"""Time to verdict of `orchestrator gate` on simulated hosts: baseline run by the gate vs baseline reused.

A toy kernel tree (git) and a one-patch series (git format-patch --cover-letter --thread --base) are
made in a temporary directory; the build command is tests/data/gate/build.sh. Each sample is a whole
gate process as CI runs it (b4 intake, worktree + git am, build, local Redis + Celery workers, pytest
on the simulated hosts, verdict, reports), timed from process start to exit:

* ``fresh``: ``--fresh-baseline``: the gate runs the baseline, then the candidate;
* ``reused``: the baseline stored by an earlier gate on the same base is reused; only the candidate runs.

The two modes alternate so machine noise hits both alike; the median of the samples is reported.

``bisect``: a five-patch series (plain ``git format-patch`` output in a directory, ``--base``) whose
third patch makes the simulated kernel ignore the event filter on Sapphire Rapids
(``pmufarm-sim.yaml``), on the same two simulated hosts, baseline reused: the gate's own
``timing.to_verdict`` (regression known, re-runs done) and ``timing.to_first_bad`` (bisection
done), and the process wall time. The bisection must name patch 3.

Prints one JSON object on stdout and one text line on stderr.
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
DATA = ROOT / "tests" / "data" / "gate"


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.org",
           "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.org"}
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


def make_series(tmp: Path) -> tuple[Path, Path]:
    repo = tmp / "linux"
    (repo / "drivers" / "kvm").mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "master")
    (repo / "drivers" / "kvm" / "pmu.c").write_text("int pmu_filter(void) { return 0; }\n")
    (repo / "pmufarm-sim.yaml").write_text("{}\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "base")
    (repo / "drivers" / "kvm" / "pmu.c").write_text("/* tidied */\nint pmu_filter(void) { return 0; }\n")
    _git(repo, "commit", "-q", "-am", "kvm: pmu: tidy")
    _git(repo, "format-patch", "-q", "--cover-letter", "--thread", "--base=HEAD~1", "-o", str(tmp / "p"), "HEAD~1")
    _git(repo, "reset", "-q", "--hard", "HEAD~1")
    mbox = tmp / "series.mbx"
    mbox.write_text("".join(p.read_text() for p in sorted((tmp / "p").glob("*.patch"))))
    return repo, mbox


FIVE = [("drivers/kvm/pmu.c", "/* renamed */\nint pmu_filter_v2(void) { return 0; }\n", "kvm: pmu: rename"),
        ("drivers/kvm/counter.c", "int pmu_counter(void) { return 0; }\n", "kvm: pmu: counter helper"),
        ("pmufarm-sim.yaml", "sapphirerapids: [filter_ignored]\n", "kvm: pmu: skip filter reprogramming on SPR"),
        ("README", "documented\n", "kvm: pmu: document"),
        ("drivers/kvm/counter.c", "int pmu_counter(void)\n{\n\treturn 0;\n}\n", "kvm: pmu: tidy")]


def make_five(tmp: Path) -> tuple[Path, Path]:
    """Toy tree at 'base' and the five patches as plain format-patch files in a directory."""
    repo, _ = make_series(tmp)
    _git(repo, "tag", "base")
    for path, text, msg in FIVE:
        (repo / path).write_text(text)
        _git(repo, "add", path)
        _git(repo, "commit", "-q", "-m", msg)
    _git(repo, "format-patch", "-q", "-o", str(tmp / "five"), "base..HEAD")
    _git(repo, "reset", "-q", "--hard", "base")
    return repo, tmp / "five"


def _gate_cmd(tmp: Path, repo: Path, inventory: str, suites: list[str], tree: str | None
              ) -> tuple[dict[str, str], list[str]]:
    """The environment (a private state dir) and the gate command line up to the series."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "PMUFARM_"))}
    env.update(FARM_STATE_DIR=str(tmp / "st"), FARM_AGENT_STATE_DIR=str(tmp / "agent"))
    if tree:
        env["PMUFARM_TREE"] = tree
    return env, [sys.executable, "-m", "orchestrator.gate", "--reports-dir", str(tmp / "reports"), "gate",
                 "--tree", str(repo), "--build-cmd", f"sh {DATA / 'build.sh'}", "--inventory", inventory,
                 *[a for s in suites for a in ("--suite", s)]]


def measure_bisect(quick: bool, inventory: str, suites: list[str], tree: str | None) -> dict:
    reps = 2 if quick else 3
    with tempfile.TemporaryDirectory(prefix="pmufarm-bench-bisect-") as t:
        tmp = Path(t)
        repo, patches = make_five(tmp)
        env, base = _gate_cmd(tmp, repo, inventory, suites, tree)
        base += ["--series", str(patches), "--base", "base"]
        xs: dict[str, list[float]] = {"wall": [], "to_verdict": [], "to_first_bad": [], "builds": []}
        for i in range(reps + 1):  # sample 0 stores the baseline; the others reuse it
            out = tmp / f"out-{i}"
            t0 = time.monotonic()
            r = subprocess.run([*base, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.monotonic() - t0
            report = json.loads((out / "gate.json").read_text()) if (out / "gate.json").exists() else {}
            bad = (report.get("bisect") or {}).get("first_bad") or {}
            if r.returncode != 1 or bad.get("index") != 3:
                raise SystemExit(f"bisect gate: exit {r.returncode}, first bad {bad.get('index')}: "
                                 f"{(r.stderr or r.stdout).strip()[-400:]}")
            if i == 0:
                continue
            xs["wall"].append(wall)
            xs["to_verdict"].append(report["timing"]["to_verdict"])
            xs["to_first_bad"].append(report["timing"]["to_first_bad"])
            xs["builds"].append(report["bisect"]["builds"])
    return {"repetitions": reps, "patches": 5, "first_bad": 3,
            **{f"{k}_s" if k != "builds" else k: round(statistics.median(v), 2) for k, v in xs.items()}}


def measure(quick: bool, inventory: str, suites: list[str], tree: str | None) -> dict:
    reps = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="pmufarm-bench-gate-") as t:
        tmp = Path(t)
        repo, mbox = make_series(tmp)
        env, base = _gate_cmd(tmp, repo, inventory, suites, tree)
        base += ["--series", str(mbox)]
        samples: dict[str, list[float]] = {"fresh": [], "reused": []}
        phases: dict[str, list[dict]] = {"fresh": [], "reused": []}
        verdicts = set()
        for i in range(reps):
            for mode in ("fresh", "reused"):
                out = tmp / f"out-{mode}-{i}"
                cmd = [*base, "--out", str(out), *(["--fresh-baseline"] if mode == "fresh" else [])]
                t0 = time.monotonic()
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                elapsed = time.monotonic() - t0
                report = json.loads((out / "gate.json").read_text()) if (out / "gate.json").exists() else {}
                if r.returncode not in (0, 1) or not report.get("compared"):
                    raise SystemExit(f"gate failed ({r.returncode}): {r.stderr.strip()[-400:]}")
                how = [b["how"] for b in report["runs"]["baseline"]]
                if (mode == "reused") != (how and all(h == "reused" for h in how)):
                    raise SystemExit(f"{mode}: baseline was {how}")
                verdicts.add(report["verdict"])
                samples[mode].append(elapsed)
                phases[mode].append(report["timing"])
    res = {"name": "gate_time_to_verdict", "inventory": inventory, "suites": suites, "repetitions": reps,
           "verdicts": sorted(verdicts)}
    for mode, xs in samples.items():
        res[f"{mode}_s"] = {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2),
                            "max": round(max(xs), 2)}
        keys = sorted({k for p in phases[mode] for k in p})
        res[f"{mode}_phases_median_s"] = {k: round(statistics.median(p.get(k, 0) for p in phases[mode]), 2)
                                          for k in keys}
    res["reuse_saves_s"] = round(res["fresh_s"]["median"] - res["reused_s"]["median"], 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 samples per mode instead of 5")
    ap.add_argument("--inventory", default=str(DATA / "sim.yaml"), help="default: 2 simulated hosts (SPR, Zen 4)")
    ap.add_argument("--suite", action="append", dest="suites", help="default: suites/filter and suites/pmi")
    ap.add_argument("--tree", help="PMUFARM_TREE for the agent (default: the installed tree)")
    args = ap.parse_args()
    suites = args.suites or ["suites/filter", "suites/pmi"]
    res = measure(args.quick, args.inventory, suites, args.tree)
    b = res["bisect"] = measure_bisect(args.quick, args.inventory, suites, args.tree)
    print(json.dumps(res))
    print(f"gate time to verdict: baseline run {res['fresh_s']['median']:.1f}s, baseline reused "
          f"{res['reused_s']['median']:.1f}s (median of {res['repetitions']}; saves {res['reuse_saves_s']:.1f}s); "
          f"5-patch series, 2 hosts: verdict {b['to_verdict_s']:.1f}s, first bad patch (3/5) "
          f"{b['to_first_bad_s']:.1f}s after {b['builds']:g} bisect builds", file=sys.stderr)


if __name__ == "__main__":
    main()
