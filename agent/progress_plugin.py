"""A tiny pytest plugin that streams progress as JSON lines to ``PMUFARM_PROGRESS_FILE``.

The agent task tails the file and forwards it to the orchestrator as Celery task state, so a
developer sees "12/40 tests, now: test_x" per host while the suite runs in its own process.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

_state: dict[str, Any] = {"done": 0, "fh": None}


def _emit(record: dict[str, Any]) -> None:
    fh = _state["fh"]
    if fh is not None:
        fh.write(json.dumps({**record, "t": time.time()}) + "\n")
        fh.flush()


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get("PMUFARM_PROGRESS_FILE")
    if path:
        _state["fh"] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives for the session


def pytest_collection_finish(session: pytest.Session) -> None:
    _emit({"total": len(session.items)})


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _emit({"current": nodeid, "done": _state["done"]})


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _state["done"] += 1
    _emit({"done": _state["done"]})


def pytest_unconfigure(config: pytest.Config) -> None:
    if _state["fh"] is not None:
        _state["fh"].close()
        _state["fh"] = None
