"""Shared fixtures: real servers on loopback or unix sockets, started and stopped by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREE = Path(__file__).resolve().parent / "data" / "tree"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``orchestrator`` exactly as a user would (a subprocess, real exit code)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)


@pytest.fixture
def farm_env(tmp_path: Path) -> dict[str, str]:
    """A private state dir; the farm's own test tree so smoke suites are 'installed' suites."""
    state = tmp_path / "st"
    return {"FARM_STATE_DIR": str(state), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent"),
            "PMUFARM_TREE": str(TREE)}
