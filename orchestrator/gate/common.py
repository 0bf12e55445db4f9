"""Shared by the gate modules: the one exception that ends a gate with a verdict and an exit code."""

from __future__ import annotations

EXIT_PASS, EXIT_REGRESSION, EXIT_INPUT, EXIT_INCONCLUSIVE = 0, 1, 2, 3


class GateError(RuntimeError):
    """Stops the gate before a verdict on test results: ``code`` is the exit code, ``verdict`` the word
    CI sees (``input-error``, ``apply-failed``, ``build-failed``, ``inconclusive``), ``detail`` an
    optional multi-line excerpt (git am output, build log tail) for gate.md."""

    def __init__(self, code: int, verdict: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code, self.verdict, self.detail = code, verdict, detail
