"""Build the kernel in a worktree with the configured command; a failure is a verdict, not a crash.

``--build-cmd`` (default ``make -j$(nproc) bzImage modules``) runs under ``bash -c`` in the worktree,
in its own process group, with ``--build-timeout``; its whole output goes to
``<out>/build-<role>.log`` and a failure (non-zero exit, or the timeout, which kills the group) ends
the gate with ``build-failed`` (exit 2) and the log tail. The command sees
``PMUFARM_GATE_ROLE=baseline|candidate`` and ``PMUFARM_GATE_WORKTREE``.

Simulated kernels: a built tree may carry ``pmufarm-sim.yaml`` (read after the build, so the build
may generate it): ``{<uarch glob>: [fault ids]}``, e.g. ``{sapphirerapids: [filter_ignored]}`` or
``{"*": [pmi_lost]}``. It says which injected faults (``inventory/faults.yaml``) this kernel would
exhibit on which microarchitecture; see ``provision.py`` for how it reaches the simulated hosts.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.gate.common import GateError

DEFAULT_BUILD_CMD = "make -j$(nproc) bzImage modules"
SIM_FILE = "pmufarm-sim.yaml"
LOG_TAIL_LINES = 30


@dataclass
class Build:
    role: str
    worktree: Path
    commit: str
    cmd: str
    duration: float
    log: Path
    sim_faults: dict[str, list[str]] | None

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "commit": self.commit, "cmd": self.cmd, "duration": round(self.duration, 2),
                "log": str(self.log), "sim_faults": self.sim_faults}


def run_build(worktree: Path, role: str, commit: str, cmd: str, timeout: float, log_dir: Path) -> Build:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"build-{role}.log"
    env = dict(os.environ, PMUFARM_GATE_ROLE=role, PMUFARM_GATE_WORKTREE=str(worktree))
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        fh.write(f"$ {cmd}    # in {worktree} ({role}, {commit[:12]})\n".encode())
        fh.flush()
        proc = subprocess.Popen(["bash", "-c", cmd], cwd=worktree, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    duration = time.monotonic() - t0
    if rc != 0:
        why = f"timed out after {timeout:g}s" if rc is None else f"exit {rc}"
        raise GateError(2, "build-failed", f"{role} build failed ({why}): {cmd}; log {log}", detail=tail(log))
    return Build(role, worktree, commit, cmd, duration, log, load_sim_map(worktree))


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def load_sim_map(worktree: Path) -> dict[str, list[str]] | None:
    """The built tree's ``pmufarm-sim.yaml``, validated against the model driver's faults; None if absent."""
    from agent.drivers.model import FAULTS

    path = worktree / SIM_FILE
    if not path.exists():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise GateError(2, "build-failed", f"{SIM_FILE} in the built tree: YAML error: "
                                           f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GateError(2, "build-failed", f"{SIM_FILE}: expected a mapping {{uarch glob: [fault ids]}}")
    out: dict[str, list[str]] = {}
    for key, faults in data.items():
        faults = [] if faults is None else faults
        if not isinstance(faults, list) or not all(isinstance(f, str) for f in faults):
            raise GateError(2, "build-failed", f"{SIM_FILE}: {key!r}: expected a list of fault ids")
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise GateError(2, "build-failed", f"{SIM_FILE}: {key!r}: unknown fault {unknown[0]!r} "
                                               f"(known: {', '.join(sorted(FAULTS))})")
        out[str(key)] = list(faults)
    return out


def faults_for(sim_map: dict[str, list[str]] | None, uarch: str) -> list[str]:
    """Faults a simulated kernel exhibits on ``uarch``: the union over every matching glob."""
    found: set[str] = set()
    for pattern, faults in (sim_map or {}).items():
        if fnmatch.fnmatchcase(uarch, pattern):
            found.update(faults)
    return sorted(found)
