"""A tiny pytest plugin that streams progress as JSON lines to ``PMUFARM_PROGRESS_FILE``.

The agent task tails the file and forwards it to the orchestrator as Celery task state, so a
developer sees "12/40 tests, now: test_x" per host while the suite runs in its own process. Each
finished test's result row (the pmufarm plugin's, contracts §5) goes into the stream too, so a suite
killed by ``--timeout`` keeps the tests that finished and names the one that was running.

Why not pytest-reportlog: it writes each TestReport as it is made (flushed, so it would survive the
kill), but it has no item count and no start-of-test record: a test hanging in setup would show as the
previous one, and "done of total" could not be shown. The rows it would give are also not the
plugin's erratum-aware outcomes. So the stream stays this small plugin.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

_state: dict[str, Any] = {"done": 0, "fh": None, "config": None}


def _emit(record: dict[str, Any]) -> None:
    fh = _state["fh"]
    if fh is not None:
        fh.write(json.dumps({**record, "t": time.time()}, default=str) + "\n")
        fh.flush()


def _row(nodeid: str) -> dict[str, Any] | None:
    """The pmufarm plugin's result row for a finished test (None when that plugin is not active)."""
    config = _state["config"]
    try:
        from agent.plugin import _STATE

        row = config.stash[_STATE].rows.get(nodeid) if config is not None and _STATE in config.stash else None
    except ImportError:
        return None
    return asdict(row) if row is not None else None


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get("PMUFARM_PROGRESS_FILE")
    _state.update(done=0, config=config)
    if path:
        _state["fh"] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives for the session


def pytest_collection_finish(session: pytest.Session) -> None:
    _emit({"total": len(session.items)})


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _emit({"current": nodeid, "done": _state["done"]})


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _state["done"] += 1
    _emit({"done": _state["done"], "finished": nodeid, "row": _row(nodeid)})


def pytest_unconfigure(config: pytest.Config) -> None:
    if _state["fh"] is not None:
        _state["fh"].close()
        _state["fh"] = None
    _state["config"] = None


def read_stream(path: os.PathLike[str] | str) -> tuple[list[dict[str, Any]], str | None]:
    """The finished tests' rows and the test still running (None if none) from a progress file.

    Used by the agent when it had to kill a suite: pytest never wrote its results file.
    """
    rows: dict[str, dict[str, Any]] = {}
    current: str | None = None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return [], None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the last line may be cut by the kill
        if "current" in rec:
            current = rec["current"]
        if "finished" in rec:
            if rec.get("row"):
                rows[rec["finished"]] = rec["row"]
            if rec["finished"] == current:
                current = None
    return list(rows.values()), current
