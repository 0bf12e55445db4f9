"""One command for every performance figure: runs each benchmark and records machine details.

Results go where asked: ``--out DIR`` (default ``$FARM_STATE_DIR/bench`` or ~/.local/state/pmufarm/bench),
never into tracked files unless ``--publish`` (``make bench``) says so: then bench/results/latest.json and
latest.md are written and the README's performance section is regenerated. With ``--only``, the named
benchmarks replace their rows in the previous results and the rest are kept, each row with its own date.

Each benchmark repeats itself and reports median and spread; ratios are measured within one
benchmark run (both sides alternated on the same machine state). `--quick` is a smoke run (< 1 min):
fewer repetitions and smaller sizes, and the gate benchmark is left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name -> (script, full args, quick args or None to skip in --quick, what it measures)
BENCHES: dict[str, tuple[str, list[str], list[str] | None, str]] = {
    "probe_latency": ("probe_latency", [], ["--quick"], "harness `vpmu run selftest` (1000 exits), whole process"),
    "probe_latency_1": ("probe_latency", ["--iterations", "1"], ["--quick", "--iterations", "1"],
                        "the same with one iteration: VM set-up and teardown alone"),
    "guest_boot": ("guest_boot", [], ["--quick"], "Linux guest boot-to-result (QEMU) vs harness probe"),
    "submit_overhead": ("submit_overhead", [], ["--quick"], "cold `orchestrator submit suites/isolation` (private "
                        "Redis + worker started and stopped inside) vs plain `pytest`; `--help` start-up"),
    "aggregate": ("aggregate", [], ["--quick"], "write_reports over 100k results (quick: 10k)"),
    "sim_farm": ("sim_farm", ["--hosts", "1000"], ["--hosts", "10"], "dispatch + aggregation, N simulated hosts"),
    "gate": ("gate", [], None, "gate time-to-verdict on simulated hosts"),
    "emulated": ("emulated", ["--runs", "5"], ["--runs", "1", "--no-submit"], "the real harness on the emulated PMU: "
                 "median time per probe; `submit suites/counters --inventory inventory/emulated.yaml`"),
    "kselftest_build": ("kselftest_build", [], None, "KVM PMU selftests: fetch + unpack Debian's tree, cold and "
                        "cached build, one run"),
}


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    load = os.getloadavg()
    return {"host": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
            "cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                 * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg_at_start": [round(x, 2) for x in load]}


def first_json(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    return None


def run_one(name: str, script: str, args: list[str], timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "ok": False, "error": f"timed out after {timeout:g}s"}
    data = first_json(r.stdout)
    summary = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode != 0 or data is None:
        return {"name": name, "ok": False, "error": f"exit {r.returncode}: {summary[:300]}",
                "seconds": time.monotonic() - t0}
    return {"name": name, "ok": True, "args": args, "seconds": round(time.monotonic() - t0, 2),
            "summary": summary, "data": data}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Measured {report['when']} on {m['cpu']} ({m['cores']} cores, {m['mem_gib']} GiB), "
             f"kernel {m['kernel']}, load average {m['loadavg_at_start'][0]} at start"
             + (" (quick run: smaller sizes)" if report["quick"] else "") + ". `make bench` regenerates this.",
             "", "| benchmark | what | result |", "|---|---|---|"]
    for name, (_, _, _, what) in BENCHES.items():
        res = report["results"].get(name)
        if res is None:
            text = "not run (full run only)"
        elif not res["ok"]:
            text = f"failed: {res['error']}"
        else:
            text = res["summary"].replace("|", "/")
            if res.get("when") and res["when"] != report["when"]:
                load = f", load {res['loadavg']}" if res.get("loadavg") is not None else ""
                text += f" (measured {res['when'][:16]}{load})"
        lines.append(f"| {name} | {what} | {text} |")
    return "\n".join(lines) + "\n"


def update_readme(md: str) -> None:
    text = README.read_text()
    block = f"{BEGIN}\n{md}{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Performance\n" + block + "\n"
    README.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    ap.add_argument("--only", nargs="*", choices=list(BENCHES), help="run only these")
    ap.add_argument("--out", type=Path, default=None, help="directory for latest.json/latest.md")
    ap.add_argument("--publish", action="store_true",
                    help="write bench/results/ (tracked) and regenerate the README's performance section")
    args = ap.parse_args()
    state = Path(os.environ.get("FARM_STATE_DIR") or Path.home() / ".local" / "state" / "pmufarm")
    out = ROOT / "bench" / "results" if args.publish else (args.out or state / "bench")
    report: dict[str, Any] = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
                              "machine": machine(), "results": {}}
    if args.only and (out / "latest.json").exists():
        with contextlib.suppress(ValueError, KeyError):
            previous = json.loads((out / "latest.json").read_text())
            for name, res in previous["results"].items():
                res.setdefault("when", previous.get("when"))
                report["results"][name] = res
    for name, (script, full, quick, _) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        bench_args = quick if args.quick else full
        if bench_args is None:
            continue
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        res = run_one(name, script, bench_args, timeout=120 if args.quick else 1800)
        res["when"] = datetime.now(UTC).isoformat(timespec="seconds")
        res["loadavg"] = round(os.getloadavg()[0], 2)
        report["results"][name] = res
        print(f"  {res.get('summary') if res['ok'] else 'FAILED: ' + res['error']}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "latest.md").write_text(md)
    if args.publish:
        update_readme(md)
    print(f"results: {out}", file=sys.stderr)
    print(md)
    return 0 if all(r["ok"] for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
