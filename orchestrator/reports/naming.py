"""Shared vocabulary of the reports layer: outcomes, CPU identity of a job, names and keys.

Everything that more than one report needs (which CPU a job ran on, how a report file is named,
how a test is keyed across runs, which attempt of a job counts) lives here, so the JUnit files,
the matrix, KCIDB and the summary can never disagree about it.

File naming (``junit_filename``)
    ``<vendor>-<uarch>-<FF>-<MM>[-sim][+<ERRATUM>[+<ERRATUM>...]].xml``, with family and model as
    two-digit lower-case hex, the same form as the kernel's microcode file names
    (``/lib/firmware/intel-ucode/06-8f-08``), e.g. ``intel-sapphirerapids-06-8f+SPR4.xml``,
    ``amd-zen4-19-11-sim.xml``. Simulated hosts (``facts["simulated"]``) never share a file with
    real ones: the ``-sim`` marker comes right after the CPU model, before the errata. Errata ids
    are sorted. A job whose host never answered (no facts) uses the job's inventory fallback
    ``host_cpu`` when present, else it lands in ``unknown.xml``.
    Every component is reduced to ``[A-Za-z0-9_.-]`` so the name is safe on any file system.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

# Test outcomes (contracts §5) and job statuses.
PASSED, FAILED, SKIPPED, XFAILED, XPASSED, ERROR = (
    "passed", "failed", "skipped", "xfailed", "xpassed", "error")
OUTCOMES = (PASSED, FAILED, SKIPPED, XFAILED, XPASSED, ERROR)
# The test that was running when --timeout killed its suite (agent/tasks.py): named in every report,
# counted with the job's timeout as infrastructure, never as a kernel failure.
HUNG = "timeout"
INFRA_STATUSES = ("infra_error", "timeout")
# Job statuses that mean "the suite did not produce a verdict" when no test came back.
NO_VERDICT_STATUSES = ("infra_error", "timeout", "error")

# Worst-first order used wherever several results collapse into one (matrix cells, columns):
# error > failed > xpassed > xfailed > passed > skipped.
#  - error before failed: the test could not judge at all, the more urgent thing to look at;
#  - xpassed before xfailed: an erratum that no longer shows is a stale errata entry (news),
#    an xfail is the documented, expected deviation;
#  - skipped last: "not applicable here" must never hide a result that did run.
# Job-level infra outcomes ("infra_error", "timeout") only appear in the matrix's job rows and
# rank above everything there.
WORST_FIRST = ("infra_error", "timeout", ERROR, FAILED, XPASSED, XFAILED, PASSED, SKIPPED)
SEVERITY = {o: len(WORST_FIRST) - i for i, o in enumerate(WORST_FIRST)}

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_ERRATUM_PREFIX = re.compile(r"^\s*([A-Z][A-Za-z0-9_-]{1,31}):")
# Characters XML 1.0 forbids (everything below 0x20 but tab/newline/CR, surrogates, FFFE/FFFF).
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def safe(text: Any, default: str = "unknown") -> str:
    """Reduce to a filesystem- and URL-safe token."""
    out = _UNSAFE.sub("_", str(text)).strip("._") if text not in (None, "") else ""
    return out or default


def xml_clean(text: Any) -> str:
    """Text with the characters XML 1.0 cannot carry removed (serial consoles emit them)."""
    if text is None:
        return ""
    text = str(text)
    return _XML_ILLEGAL.sub("", text) if _XML_ILLEGAL.search(text) else text


def hex2(value: int | None) -> str:
    return "xx" if value is None else f"{int(value):02x}"


def cpuid_label(family: int | None, model: int | None, upper: bool = True) -> str:
    """``06-8F`` style label (family-model in hex)."""
    label = f"{hex2(family)}-{hex2(model)}"
    return label.upper() if upper else label


@dataclass(frozen=True)
class CpuId:
    """Who a job ran on, as far as reports care. ``known`` is False when the host never answered."""

    vendor: str
    uarch: str
    uarch_name: str
    family: int | None
    model: int | None
    stepping: int | None
    microcode: str | None
    simulated: bool
    errata: tuple[str, ...]
    known: bool = True

    @property
    def column_key(self) -> str:
        """Matrix column: one per microarchitecture, simulated kept apart from real."""
        return f"{self.vendor}-{self.uarch}" + ("-sim" if self.simulated else "")

    @property
    def label(self) -> str:
        name = self.uarch_name or self.uarch
        return name + (" (sim)" if self.simulated else "")


def job_cpu(job: Mapping[str, Any]) -> CpuId:
    """The CPU identity of a job, from its facts (contracts §2) or the inventory fallback."""
    facts = job.get("facts") or {}
    cpu = facts.get("cpu") or {}
    known = bool(cpu)
    simulated = bool(facts.get("simulated"))
    if not cpu:
        fallback = job.get("host_cpu")
        if isinstance(fallback, Mapping):
            cpu = fallback
            simulated = bool(fallback.get("simulated") or job.get("driver") == "model")
        elif isinstance(fallback, str) and fallback:
            cpu = {"uarch": fallback}
        simulated = simulated or job.get("driver") == "model"
    errata = tuple(sorted({str(e.get("id") if isinstance(e, Mapping) else e)
                          for e in (facts.get("errata") or []) if e}))
    uarch = cpu.get("uarch") or "unknown"
    return CpuId(
        vendor=str(cpu.get("vendor") or "unknown"),
        uarch=str(uarch),
        uarch_name=str(cpu.get("uarch_name") or (uarch if uarch != "unknown" else "Unknown (no facts)")),
        family=cpu.get("family"),
        model=cpu.get("model"),
        stepping=cpu.get("stepping"),
        microcode=cpu.get("microcode"),
        simulated=simulated,
        errata=errata,
        known=known,
    )


_VENDOR_ORDER = {"intel": 0, "amd": 1}
_MICROARCH_TABLE = Path(__file__).resolve().parents[2] / "inventory" / "microarch.yaml"


_TABLE_ID = re.compile(r"^- id:\s*([A-Za-z0-9_.-]+)", re.M)


@lru_cache(maxsize=1)
def _generation_rank() -> dict[str, int]:
    """uarch id -> its position in inventory/microarch.yaml, which lists each vendor's parts oldest first.

    Only the order of the top-level ``- id:`` lines is needed: a regex reads it in a millisecond, where
    parsing the whole table with PyYAML costs a quarter of a second on every report."""
    try:
        ids = _TABLE_ID.findall(_MICROARCH_TABLE.read_text())
    except OSError:
        return {}
    return {uarch: i for i, uarch in enumerate(ids)}


def cpu_order(cpu: CpuId) -> tuple:
    """One order for every report's columns (matrix, summary): vendor (Intel, AMD, others), generation as
    the microarchitecture table lists it, family/model for parts the table lacks, real before simulated,
    hosts that never answered last."""
    rank = _generation_rank().get(cpu.uarch, len(_generation_rank()))
    return (cpu.vendor == "unknown", _VENDOR_ORDER.get(cpu.vendor, 9), cpu.vendor, rank, cpu.family or 0,
            cpu.model or 0, cpu.uarch, cpu.simulated)


def junit_filename(cpu: CpuId) -> str:
    """File name of the JUnit report that a host with this CPU identity goes into."""
    if cpu.vendor == "unknown" and cpu.uarch == "unknown" and cpu.family is None:
        base = "unknown"
    else:
        base = f"{safe(cpu.vendor)}-{safe(cpu.uarch)}-{cpuid_label(cpu.family, cpu.model, upper=False)}"
    if cpu.simulated:
        base += "-sim"
    if cpu.errata:
        base += "+" + "+".join(safe(e) for e in cpu.errata)
    return base + ".xml"


def latest_attempts(jobs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Keep only the last attempt of each (run, host, suite): a retried job counts once."""
    best: dict[tuple, Mapping[str, Any]] = {}
    for job in jobs:
        key = (job.get("run_id"), job.get("host"), job.get("suite"))
        cur = best.get(key)
        if cur is None or (job.get("attempt") or 0) >= (cur.get("attempt") or 0):
            best[key] = job
    return list(best.values())


@dataclass(frozen=True)
class TestName:
    """A pytest node id taken apart: ``suites/iso/test_x.py::TestC::test_y[p-1]``."""

    path: str        # suites/iso/test_x.py
    module: str      # test_x
    cls: str         # TestC or ""
    func: str        # test_y
    params: str      # p-1 or ""

    @property
    def name(self) -> str:
        """The pytest test name (function plus parameters), as JUnit shows it."""
        return f"{self.func}[{self.params}]" if self.params else self.func

    @property
    def short(self) -> str:
        """Display name within a suite: ``test_x::TestC::test_y[p-1]``."""
        parts = [self.module] + ([self.cls] if self.cls else []) + [self.name]
        return "::".join(parts)


_name_cache: dict[str, TestName] = {}


def split_nodeid(nodeid: str, fallback_name: str = "") -> TestName:
    hit = _name_cache.get(nodeid)
    if hit is not None:
        return hit
    base, params = nodeid, ""
    br = nodeid.find("[")
    if br >= 0 and nodeid.endswith("]"):
        base, params = nodeid[:br], nodeid[br + 1:-1]
    parts = base.split("::")
    path = parts[0]
    module = path.rsplit("/", 1)[-1]
    if module.endswith(".py"):
        module = module[:-3]
    names = parts[1:]
    func = names[-1] if names else (fallback_name or module)
    cls = ".".join(names[:-1]) if len(names) > 1 else ""
    result = TestName(path=path, module=module or "unknown", cls=cls, func=func, params=params)
    if len(_name_cache) < 200_000:
        _name_cache[nodeid] = result
    return result


def parse_test(test: Mapping[str, Any]) -> TestName:
    nodeid = test.get("nodeid") or test.get("name") or "unknown"
    return split_nodeid(nodeid, test.get("name") or "")


def result_key(host: str, nodeid: str) -> str:
    """Key of one test on one host across runs (the ``baseline`` mapping uses it)."""
    return f"{host}|{nodeid}"


def baseline_from_jobs(jobs: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """A ``baseline`` mapping (result_key -> outcome) from a previous run's jobs."""
    out: dict[str, str] = {}
    for job in latest_attempts(jobs):
        for t in job.get("tests") or ():
            out[result_key(job.get("host", ""), t.get("nodeid", ""))] = t.get("outcome", "")
    return out


def erratum_of(test: Mapping[str, Any]) -> str:
    """The erratum id of an xfail: the result's ``erratum`` or the ``"SRF7: ..."`` message prefix."""
    if test.get("erratum"):
        return str(test["erratum"])
    m = _ERRATUM_PREFIX.match(test.get("message") or "")
    return m.group(1) if m else ""


def first_line(text: str | None, limit: int = 200) -> str:
    if not text:
        return ""
    line = text.strip().split("\n", 1)[0].strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def job_cause(job: Mapping[str, Any]) -> str:
    """One line saying why a job produced no (complete) verdict."""
    status = job.get("status") or "unknown"
    tail = (job.get("log_tail") or "").strip()
    last = first_line(tail.rsplit("\n", 1)[-1] if tail else "", 300)
    exit_code = job.get("exit_code")
    code = f" (exit code {exit_code})" if exit_code not in (None, "") else ""
    return f"{status}{code}: {last}" if last else f"{status}{code}: no log output"


def rfc3339(value: Any) -> str | None:
    """An RFC 3339 timestamp with a zone (naive values are taken as UTC), or None."""
    if value in (None, ""):
        return None
    try:
        if isinstance(value, int | float):
            dt = datetime.fromtimestamp(value, UTC)
        elif isinstance(value, datetime):
            dt = value
        else:
            dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat()


def kernel_release(job: Mapping[str, Any]) -> str:
    return str(((job.get("facts") or {}).get("kernel") or {}).get("release") or "unknown")


def mediated_status(job: Mapping[str, Any]) -> str:
    return str(((job.get("facts") or {}).get("mediated_pmu") or {}).get("status") or "unknown")


NOT_TESTED = "not tested here"
# What a subject test must have done for a job to count as tested: it ran and judged.
_JUDGED = (PASSED, FAILED, ERROR, XFAILED, XPASSED)


def is_subject(test: Mapping[str, Any]) -> bool:
    """A test of the suite's subject; ``harness`` tests (agent/plugin.py) say ``subject`` false/0."""
    return test.get("subject") not in (0, False)


def not_tested_reason(job: Mapping[str, Any]) -> str | None:
    """Why a finished job tested nothing of its suite's subject, or None when it did (or did not finish).

    A job is "not tested here" when it ended passed/no_tests and none of its subject tests ran: every
    one was skipped for a missing fact (a host without the mediated vPMU passes only the harness
    self-test). The reason is the mediated verdict's own, else the most common skip reason.
    """
    if job.get("status") not in ("passed", "no_tests"):
        return None
    tests = job.get("tests") or ()
    if any(is_subject(t) and t.get("outcome") in _JUDGED for t in tests):
        return None
    med = (job.get("facts") or {}).get("mediated_pmu") or {}
    reasons = [str(r) for r in med.get("reasons") or () if r]
    if med.get("status") and med.get("status") != "available":
        return f"mediated vPMU {med['status']}" + (f": {'; '.join(reasons)}" if reasons else "")
    skips: dict[str, int] = {}
    for t in tests:
        if is_subject(t) and t.get("outcome") == SKIPPED:
            why = first_line(t.get("message"), 300) or "skipped"
            skips[why] = skips.get(why, 0) + 1
    if skips:
        return max(skips, key=skips.__getitem__)
    return "no test of the suite's subject was collected"


def driver_of(job: Mapping[str, Any]) -> str:
    facts = job.get("facts") or {}
    if job.get("driver"):
        return str(job["driver"])
    if facts.get("driver"):
        return str(facts["driver"])
    return "model" if facts.get("simulated") else "unknown"
