"""The KVM PMU selftests' cost: unpack Debian's tree, build cold, build cached, run.

In a throw-away cache directory (``PMUFARM_CACHE_DIR``), so "cold" really is: ``apt-get download``
of linux-source-6.12 and unpacking only what the build reads (agent/upstream.py), ``make headers``
plus the PMU selftest targets, then the same build again (make finds nothing to do), then one run of
each program (on a host without a KVM PMU each skips at its first TEST_REQUIRE).

    python bench/kselftest_build.py [--tree DIR] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import ktap, upstream  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=None, help="an existing kernel tree instead of fetching Debian's")
    ap.add_argument("--json-only", action="store_true")
    ns = ap.parse_args(argv)
    doc: dict = {"bench": "kselftest_build", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="pmufarm-bench-") as cache:
        os.environ["PMUFARM_CACHE_DIR"] = cache
        try:
            t0 = time.monotonic()
            tree = Path(ns.tree) if ns.tree else upstream.fetch_linux_source()
            doc["fetch_unpack_s"] = None if ns.tree else round(time.monotonic() - t0, 2)
            doc["tree"] = str(tree)
            cold = upstream.build_pmu_selftests(tree)
            cached = upstream.build_pmu_selftests(tree)
        except upstream.UpstreamError as exc:
            print(json.dumps({**doc, "error": str(exc)}, indent=1))
            return 1
        doc.update(build_cold_s=round(cold.seconds, 2), build_cached_s=round(cached.seconds, 2),
                   programs=sorted(cold.programs), absent=cold.absent, runs={})
        for name, binary in cold.programs.items():
            run = upstream.run_program(binary)
            doc["runs"][name] = {"s": round(run.seconds, 3), "rc": run.returncode,
                                 "results": [(r.name, r.outcome, r.message.splitlines()[0] if r.message else "")
                                             for r in ktap.program_results(name, run.stdout, run.returncode,
                                                                           run.stderr, run.timed_out)]}
    print(json.dumps(doc, indent=1))
    if not ns.json_only:
        fetch = f"fetch+unpack {doc['fetch_unpack_s']:.1f}s, " if doc.get("fetch_unpack_s") is not None else ""
        print(f"{fetch}build cold {doc['build_cold_s']:.1f}s, cached {doc['build_cached_s']:.2f}s "
              f"({len(doc['programs'])} programs on {doc['cpus']} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
