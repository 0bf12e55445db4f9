"""Reports: stored results -> the files users consume (reports/<run-id>/).

``write_reports(run, jobs, out_dir)`` writes:

* ``junit/<vendor>-<uarch>-<ff>-<mm>[-sim][+<errata>].xml`` - one per CPU model and errata set,
  one testsuite per host and suite (see ``junit.py`` and ``naming.py``);
* ``matrix.md``, ``matrix.html``, ``matrix.json`` (``matrix.csv`` on demand) - see ``matrix.py``;
* ``kcidb.json`` - KCIDB v5 (see ``kcidb.py``);
* ``summary.md`` - one screen (see ``summary.py``).

Inputs are the run dict and job dicts of docs/contracts.md §5. Only the last attempt of each
(run, host, suite) counts everywhere.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .junit import write_junit
from .kcidb import build_kcidb, validate_kcidb
from .matrix import Matrix, build_matrix, render_matrix
from .naming import baseline_from_jobs, junit_filename, latest_attempts, result_key
from .summary import render_summary, verdict

__all__ = [
    "Matrix", "baseline_from_jobs", "build_kcidb", "build_matrix", "junit_filename",
    "render_matrix", "render_summary", "result_key", "validate_kcidb", "verdict", "write_reports",
]


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_reports(run: Mapping[str, Any], jobs: Iterable[Mapping[str, Any]], out_dir: Path,
                  baseline: Mapping[str, str] | None = None,
                  matrix_formats: Iterable[str] = ("md", "html", "json"),
                  kcidb_include_simulated: bool = False,
                  validate: bool = False) -> dict[str, Path]:
    """Write every report of one run into ``out_dir``; return {relative path: absolute path}.

    ``baseline``: result_key(host, nodeid) -> outcome of a reference run (``baseline_from_jobs``);
    new failures are listed first in the summary. ``validate`` checks kcidb.json against the
    installed kcidb_io schema (slow for very large runs, hence off by default).
    """
    # Aggregation allocates millions of small, acyclic objects (elements, dicts); the cyclic GC
    # would rescan them over and over (~40% of the time at 100k results). Reference counting
    # frees everything; the collector is restored on the way out.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _write_reports(run, jobs, Path(out_dir), baseline, tuple(matrix_formats),
                              kcidb_include_simulated, validate)
    finally:
        if gc_was_enabled:
            gc.enable()


def _write_reports(run, jobs, out_dir: Path, baseline, matrix_formats, kcidb_include_simulated,
                   validate) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = latest_attempts(jobs)
    written: dict[str, Path] = {}

    written.update(write_junit(run, jobs, out_dir / "junit"))

    matrix = build_matrix(jobs)
    matrix.title = f"pmufarm compatibility matrix: run {run.get('id', '?')}"
    for fmt in matrix_formats:
        written[f"matrix.{fmt}"] = _write(out_dir / f"matrix.{fmt}", render_matrix(matrix, fmt))

    data = build_kcidb(run, jobs, include_simulated=kcidb_include_simulated)
    if validate:
        validate_kcidb(data)
    written["kcidb.json"] = _write(out_dir / "kcidb.json", json.dumps(data, separators=(",", ":")))

    links = {k: k for k in written}
    written["summary.md"] = _write(out_dir / "summary.md",
                                   render_summary(run, jobs, links=links, baseline=baseline))
    return written
