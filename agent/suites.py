"""Which suites an agent may run: only ``suites/<name>`` of its installed tree.

A module of its own (no Celery, no Redis) so the orchestrator can check a submit's suites before it has
imported the farm's machinery; agent.tasks re-exports these names.
"""

from __future__ import annotations

import os
from pathlib import Path


def tree_root() -> Path:
    """The agent's installed tree (holds suites/); PMUFARM_TREE overrides it for deployed copies."""
    return Path(os.environ.get("PMUFARM_TREE") or Path(__file__).resolve().parent.parent)


class SuiteRefused(ValueError):
    pass


def resolve_suite(suite: str, root: Path | None = None) -> tuple[str, Path]:
    """Map ``suites/<name>`` or ``<name>`` to a directory under the tree's suites/, or refuse."""
    suites_dir = (root or tree_root()) / "suites"
    name = suite.strip().rstrip("/")
    name = name[len("suites/"):] if name.startswith("suites/") else name
    if not name or "/" in name or name.startswith(".") or "\\" in name:
        raise SuiteRefused(f"suite {suite!r}: only suites/<name> from the agent's tree may run")
    path = (suites_dir / name).resolve()
    if path.parent != suites_dir.resolve() or not path.is_dir():
        known = sorted(p.name for p in suites_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        raise SuiteRefused(f"suite {suite!r}: no such suite under suites/ (known: {', '.join(known)})")
    return name, path
