"""The ``kvm`` driver: runs the native harness (``agent/native/build/vpmu``) on this host.

Every probe is one subprocess: ``vpmu run PROBE k=v ...`` prints one JSON object (agent/protocol.py).
The binary decides ``unsupported`` itself from the host's facts, so the same answer comes out whether
the driver or a human runs it. ``PMUFARM_VPMU`` may name an alternate binary (e.g. the ASan build).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

from agent.protocol import STATUS_BY_EXIT, ProbeResult

NATIVE_DIR = Path(__file__).resolve().parents[1] / "native"
DEFAULT_BINARY = NATIVE_DIR / "build" / "vpmu"
ENV_BINARY = "PMUFARM_VPMU"
DEFAULT_TIMEOUT_S = 600.0
_build_lock = threading.Lock()


class HarnessBuildError(RuntimeError):
    """``make -C agent/native`` failed; the message is one line."""


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def build_harness(native_dir: Path = NATIVE_DIR) -> Path:
    """Build ``agent/native/build/vpmu`` with make; raise HarnessBuildError with one line on failure."""
    binary = native_dir / "build" / "vpmu"
    with _build_lock:
        if binary.exists():
            return binary
        try:
            proc = subprocess.run(["make", "-C", str(native_dir)], capture_output=True, text=True,
                                  timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HarnessBuildError(f"make -C {native_dir} failed: {exc}") from None
        if proc.returncode != 0 or not binary.exists():
            why = _one_line(proc.stderr or proc.stdout) or f"exit status {proc.returncode}"
            raise HarnessBuildError(f"make -C {native_dir} failed: {why}")
    return binary


def _format_param(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class KvmDriver:
    """Answers the probe catalogue with real KVM VMs on this host."""

    name = "kvm"
    simulated = False

    def __init__(self, facts: dict[str, Any] | None = None, binary: str | os.PathLike[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.facts = facts or {}
        self.timeout = timeout
        override = binary or os.environ.get(ENV_BINARY)
        self._binary: Path | None = Path(override) if override else None

    @property
    def binary(self) -> Path:
        """The harness binary, built on first use when it is the default one and missing."""
        if self._binary is None:
            self._binary = DEFAULT_BINARY if DEFAULT_BINARY.exists() else build_harness()
        return self._binary

    def _exec(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def run(self, probe: str, **params: Any) -> ProbeResult:
        args = ["run", probe, *(f"{k}={_format_param(v)}" for k, v in params.items())]
        try:
            proc = self._exec(args, self.timeout)
        except subprocess.TimeoutExpired:
            return ProbeResult(probe, "error", f"vpmu run {probe} timed out after {self.timeout:g} s")
        except OSError as exc:
            return ProbeResult(probe, "error", f"cannot run {self.binary}: {exc.strerror or exc}")
        return self._parse(probe, proc)

    def _parse(self, probe: str, proc: subprocess.CompletedProcess[str]) -> ProbeResult:
        if proc.returncode < 0:
            tail = _one_line(proc.stderr)
            return ProbeResult(probe, "error", f"vpmu run {probe} killed by signal {-proc.returncode}"
                               + (f": {tail}" if tail else ""))
        try:
            result = ProbeResult.from_json(proc.stdout)
        except (ValueError, TypeError) as exc:   # json.JSONDecodeError is a ValueError
            tail = _one_line(proc.stderr) or _one_line(proc.stdout) or "no output"
            return ProbeResult(probe, "error", f"vpmu run {probe} (exit {proc.returncode}) printed no "
                               f"valid result ({exc}): {tail}")
        expected = STATUS_BY_EXIT.get(proc.returncode)
        if expected != result.status:
            return ProbeResult(probe, "error", f"vpmu run {probe}: exit status {proc.returncode} does not "
                               f"match status {result.status!r}: {result.reason}",
                               result.observations, result.elapsed_ns)
        return result

    def list(self) -> list[str]:
        proc = self._exec(["list"], 60)
        if proc.returncode != 0:
            raise RuntimeError(f"vpmu list failed (exit {proc.returncode}): {_one_line(proc.stderr)}")
        return list(json.loads(proc.stdout)["probes"])

    def caps(self) -> dict[str, Any]:
        """``vpmu caps``: the harness's own view of this host (JSON object)."""
        proc = self._exec(["caps"], 60)
        if proc.returncode != 0:
            raise RuntimeError(f"vpmu caps failed (exit {proc.returncode}): {_one_line(proc.stderr)}")
        data: dict[str, Any] = json.loads(proc.stdout)
        return data
