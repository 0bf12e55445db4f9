"""Guest boot-to-result time (perfload image and perf image) next to the native harness's probe time.

Each sample boots the guest image (agent/guestimage.py: busybox initramfs + perfload, QEMU with KVM
where it runs a Linux guest, TCG otherwise) and stops the clock when the workload's JSON has come
back over the serial console (``result_s``); ``ready_s`` is QEMU start -> init, ``total_s`` QEMU
start -> QEMU gone. The native harness time is a whole ``agent/native/build/vpmu run selftest``
process (a minimal KVM VM), when that binary is built. One warm-up boot first (it builds and caches
the initramfs and the PVH vmlinux and settles the KVM/TCG choice), then the median of N.

    python bench/guest_boot.py [--quick] [--runs N] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import guestimage  # noqa: E402

VPMU = ROOT / "agent" / "native" / "build" / "vpmu"


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def bench_guest(runs: int) -> dict:
    kernel = guestimage.find_kernel()
    initrd = guestimage.build_initramfs()
    args = ["--mode", "count,enum", "--iterations", "100000", "--runs", "3"]
    warm = guestimage.run_guest(kernel=kernel, initrd=initrd, args=args)
    if warm.error:
        return {"error": f"warm-up boot failed: {warm.error}", "console_tail": warm.console_tail(10)}
    samples = []
    for _ in range(runs):
        run = guestimage.run_guest(kernel=kernel, initrd=initrd, accel=warm.accel, args=args)
        if run.error:
            return {"error": f"boot failed: {run.error}", "console_tail": run.console_tail(10)}
        samples.append(run)
    result = [r.result_s for r in samples]
    return {
        "accel": warm.accel, "accel_reason": warm.accel_reason, "kernel": str(kernel), "boot": warm.boot,
        "runs": runs, "result_s_median": _median(result), "result_s_min": round(min(result), 3),
        "result_s_max": round(max(result), 3), "ready_s_median": _median([r.boot_s for r in samples]),
        "total_s_median": _median([r.total_s for r in samples]),
        "result_s": [round(x, 3) for x in result],
    }


def bench_perf_guest(runs: int, accel: str) -> dict:
    """The perf image (Debian perf + its libraries, uncompressed cpio) booted to its result: perf
    stat and perf record over perfload's spin phase, without ``perf test`` (its cost is the tests')."""
    kernel = guestimage.find_kernel()
    initrd = guestimage.build_initramfs(with_perf=True)
    samples = []
    for _ in range(runs):
        run = guestimage.run_guest(kernel=kernel, initrd=initrd, accel=accel, timeout=300, memory_mb=512,
                                   extra_cmdline="pmufarm_perf_test=0")
        if run.error:
            return {"error": f"perf image boot failed: {run.error}", "console_tail": run.console_tail(10)}
        samples.append(run)
    result = [r.result_s for r in samples]
    return {"accel": accel, "initrd_mb": round(initrd.stat().st_size / 2**20, 1), "runs": runs,
            "result_s_median": _median(result), "ready_s_median": _median([r.boot_s for r in samples]),
            "result_s": [round(x, 3) for x in result]}


def bench_native(runs: int) -> dict:
    if not VPMU.is_file():
        return {"missing": f"{VPMU.relative_to(ROOT)} is not built (make -C agent/native)"}
    times, statuses = [], []
    for _ in range(runs + 1):
        t0 = time.monotonic()
        r = subprocess.run([str(VPMU), "run", "selftest"], capture_output=True, text=True, timeout=120)
        times.append(time.monotonic() - t0)
        statuses.append(r.returncode)
    times = times[1:]  # first run warms the page cache
    try:
        status = json.loads(r.stdout).get("status")
    except ValueError:
        status = None
    return {"runs": runs, "probe_s_median": _median(times), "probe_s": [round(x, 4) for x in times],
            "exit_codes": sorted(set(statuses)), "last_status": status}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 runs instead of 7")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--json-only", action="store_true")
    ns = ap.parse_args(argv)
    runs = ns.runs or (3 if ns.quick else 7)
    try:
        guest = bench_guest(runs)
    except guestimage.GuestImageError as exc:
        guest = {"missing": exc.missing, "error": str(exc)}
    native = bench_native(runs)
    try:
        perf = bench_perf_guest(runs, guest.get("accel", "tcg")) if "accel" in guest else {"error": "no guest"}
    except guestimage.GuestImageError as exc:
        perf = {"missing": exc.missing, "error": str(exc)}
    doc = {"bench": "guest_boot", "runs": runs, "guest": guest, "perf_guest": perf, "native_selftest": native}
    print(json.dumps(doc, indent=1))
    if not ns.json_only:
        g = (f"guest boot-to-result {guest['result_s_median']:.2f}s median ({guest['accel']}, "
             f"ready {guest['ready_s_median']:.2f}s, min {guest['result_s_min']:.2f}s, n={runs})"
             if "result_s_median" in guest else f"guest: {guest.get('error')}")
        n = (f"native vpmu run selftest {native['probe_s_median'] * 1000:.1f}ms median"
             if native.get("probe_s_median") is not None else f"native: {native.get('missing')}")
        ratio = ""
        if "result_s_median" in guest and native.get("probe_s_median"):
            ratio = f"; guest/native {guest['result_s_median'] / native['probe_s_median']:.0f}x"
        p = (f"perf image (perf stat + 2x perf record) {perf['result_s_median']:.2f}s median "
             f"(ready {perf['ready_s_median']:.2f}s, initrd {perf['initrd_mb']} MB)"
             if "result_s_median" in perf else f"perf image: {perf.get('error')}")
        print(f"{g}; {p}; {n}{ratio}")
    return 0 if "error" not in guest else 1


if __name__ == "__main__":
    sys.exit(main())
