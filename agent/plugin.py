"""pmufarm's pytest plugin: host facts, ``requires``/``errata`` markers, the probe and errata fixtures.

Loaded by ``suites/conftest.py`` (``pytest_plugins = ["agent.plugin"]``); the contract is
docs/contracts.md §4 (plugin) and §5 (result JSON).

* ``--pmufarm-host FILE`` (or env ``PMUFARM_HOST_FILE``): JSON ``{"host": entry, "facts": facts}``.
  Without ``facts`` they are computed: ``simulated_facts(host)`` for a ``model`` host,
  ``collect_facts()`` otherwise. Without the option the host is this machine, facts are probed
  live and the driver is ``kvm`` (plain ``pytest suites/isolation`` on a farm box).
* ``--pmufarm-results FILE``: ``{"host", "driver", "simulated", "facts", "tests": [...], "probes"}``
  written at session end; ``tests`` are the §5 result rows.
* ``@pytest.mark.requires(**facts)``: compared with ``flat_facts(facts)``; ``min_pmu_version``,
  ``min_gp_counters`` and ``min_fixed_counters`` compare ``>=``; a tuple/list/set value means "one
  of". Unmet -> skip whose reason names the fact and the host's value.
* ``@pytest.mark.errata(*symptom_classes)``: the symptom classes (contracts §6) that may bend the test.
* ``@pytest.mark.counts(*events)``: the test judges counts of these events; a host whose emulated PMU
  does not model one (facts ``emulated.modelled_events``) skips it, naming that fact. ``counted(...)``
  builds such params for ``parametrize``; the ``modelled`` fixture answers per event / fixed counter.
* ``@pytest.mark.judges(*rules)``: the same for KVM rules an emulated PMU declares it does not follow
  (facts ``emulated.unmodelled_rules``, rule -> why).
* Fixtures: ``facts``, ``flat_facts``, ``host``, ``pmufarm_driver``, ``probe``, ``errata``, ``modelled``.

Drivers observe; the suites judge. Nothing here knows what a probe's observations mean except the
errata bounds of contracts §6, which live in ``SYMPTOMS`` below.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import GUEST_PROBES, PROBES, ProbeResult, parse_params

# --------------------------------------------------------------------------------------------------
# Errata vocabulary (contracts §6): which counted event a symptom bends and how far.


@dataclass(frozen=True)
class Symptom:
    name: str
    events: tuple[str, ...]          # counted events it bends ("" = not a count deviation)
    summary: str
    # (deviation, transitions, expected count, KVM's exit count or None) -> within the bound?
    bound: Callable[[int, int, int, int | None], bool] | None = None
    bound_text: Callable[[int, int, int | None], str] | None = None


def _per_transition(dev: int, exits: int, expected: int, kvm_exits: int | None = None) -> bool:
    # "up to one count per VM-entry and per VM-exit in the window": every exit inside the window is
    # followed by the entry that resumes the guest, so at most 2 per exit; KVM's own exit count
    # (workload.kvm_exits, in-kernel exits included) replaces the userspace one when measured.
    return 0 < dev <= 2 * max(exits, kvm_exits or 0)


def _per_transition_text(exits: int, expected: int, kvm_exits: int | None = None) -> str:
    n = max(exits, kvm_exits or 0)
    return f"+1..+{2 * n} (one per VM-entry and per VM-exit, {n} exits)"


def _async_entries(expected: int) -> int:
    """VM-entries after host interrupts (timer ticks, IPIs) that userspace never sees: kvm-unit-tests
    x86/pmu.c adjust_events_range() gives up exact counts on AMD for them and keeps its AMD ranges,
    instructions and branches at most +10% of the loop's count (branches [N, 1.1N]); that is the bound."""
    return expected // 10 + 1


def _vmrun_max(exits: int, expected: int, kvm_exits: int | None) -> int:
    # KVM's own exit count over the batch (in-kernel exits included) bounds the VMRUNs exactly;
    # without it, the exits userspace saw plus kvm-unit-tests' AMD allowance
    return kvm_exits if kvm_exits is not None else exits + 1 + _async_entries(expected)


def _vmrun(dev: int, exits: int, expected: int, kvm_exits: int | None = None) -> bool:
    # AMD retires each VMRUN as a guest instruction AND branch (lore "[PATCH 5/5] KVM: x86/pmu: Hide
    # guest counter updates from the VMRUN instruction"): one per exit seen in the window (the entry
    # after the window-opening WRMSR may fall either side), plus entries after in-kernel exits.
    return max(0, exits - 1) <= dev <= _vmrun_max(exits, expected, kvm_exits)


def _vmrun_text(exits: int, expected: int, kvm_exits: int | None = None) -> str:
    hi = _vmrun_max(exits, expected, kvm_exits)
    why = f"KVM counted {kvm_exits} exits" if kvm_exits is not None else \
        f"{exits} exits seen, up to {_async_entries(expected)} after host interrupts"
    return f"+{max(0, exits - 1)}..+{hi} (one per VMRUN: {why})"


SYMPTOMS: dict[str, Symptom] = {s.name: s for s in [
    Symptom("insn_overcount_on_vm_transition", ("instructions",),
            "instructions retired may count each VM-entry/VM-exit",
            _per_transition, _per_transition_text),
    Symptom("branch_overcount_on_vm_transition", ("branches",),
            "branches retired may count each VM-entry/VM-exit",
            _per_transition, _per_transition_text),
    Symptom("vmrun_counted_as_branch", ("branches", "instructions"),
            "AMD retires each VMRUN as a guest instruction and branch (finding 4)",
            _vmrun, _vmrun_text),
    Symptom("global_ctrl_cleared_on_vm_exit", (), "VM-exit may clear PERF_GLOBAL_CTRL[34:32]"),
    Symptom("ht_counter_corruption", (), "MEM_*_RETIRED events may corrupt the HT sibling's counters"),
    Symptom("min_sample_period", (), "short sample periods are raised by the hardware/perf"),
]}

MIN_KEYS = {"min_pmu_version": "pmu_version", "min_gp_counters": "gp_counters",
            "min_fixed_counters": "fixed_counters"}

ERRATUM_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_.+-]*):\s")

_STATE = pytest.StashKey["PmufarmState"]()
DETAILS_LIMIT = 8000  # characters of a failure's traceback kept for the JUnit body


# --------------------------------------------------------------------------------------------------
# Facts


def flatten(facts: dict[str, Any]) -> dict[str, Any]:
    from agent.facts import flat_facts

    return flat_facts(facts)


def _fmt(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return "|".join(_fmt(v) for v in value)
    return str(value)


def unmet_requirements(flat: dict[str, Any], facts: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """One phrase per requirement the host does not meet; raises KeyError on an unknown fact."""
    unmet = []
    for key, want in wanted.items():
        fact = MIN_KEYS.get(key, key)
        if fact not in flat:
            raise KeyError(f"requires({key}=...) names no known fact (known: {', '.join(sorted(flat))})")
        have = flat[fact]
        if key in MIN_KEYS:
            ok = have is not None and have >= want
        elif isinstance(want, list | tuple | set | frozenset):
            ok = have in want
        elif isinstance(have, list) and not isinstance(want, list):
            ok = want in have
        else:
            ok = have == want
        if ok:
            continue
        phrase = f"requires {key}={_fmt(want)}: host has {fact}={_fmt(have)}"
        if fact == "mediated_pmu":
            reasons = (facts.get("mediated_pmu") or {}).get("reasons") or []
            if reasons:
                phrase += f" ({'; '.join(reasons)})"
        elif have is None:
            phrase += " (unknown)"
        unmet.append(phrase)
    return unmet


def unmodelled(facts: dict[str, Any], events: Iterable[str]) -> list[str]:
    """The events of ``events`` this host's PMU does not count for real. Only an emulated PMU declares
    what it models (facts ``emulated.modelled_events``: agent/drivers/emulated.py); on any other host
    every event is the hardware's, so nothing is unmodelled."""
    modelled = (facts.get("emulated") or {}).get("modelled_events")
    if modelled is None:
        return []
    return [e for e in dict.fromkeys(events) if e not in modelled]


def unmodelled_reason(facts: dict[str, Any], events: Iterable[str]) -> str:
    """The skip reason naming the fact, '' when every event is modelled."""
    missing = unmodelled(facts, events)
    if not missing:
        return ""
    have = (facts.get("emulated") or {}).get("modelled_events") or []
    return f"emulated.modelled_events lacks {', '.join(missing)} (has {', '.join(have) or 'none'})"


def unmodelled_rules_reason(facts: dict[str, Any], rules: Iterable[str]) -> str:
    """Why an emulated PMU does not follow one of ``rules`` (facts ``emulated.unmodelled_rules``), or ''."""
    gaps = (facts.get("emulated") or {}).get("unmodelled_rules") or {}
    return "; ".join(f"emulated.unmodelled_rules has {r}: {gaps[r]}" for r in dict.fromkeys(rules) if r in gaps)


class Modelled:
    """``modelled(event)``: does this host count ``event`` for real? For tests that judge several
    counters in one observation: keep the modelled ones, ``skip_unless_any`` when none is left."""

    def __init__(self, facts: dict[str, Any]):
        self.facts = facts

    def __call__(self, event: str) -> bool:
        return not unmodelled(self.facts, [event])

    def fixed(self, index: int) -> bool:
        """Intel fixed counter ``index`` counts a modelled event (its event: vendors.py)."""
        from agent.facts.vendors import INTEL_FIXED_COUNTERS

        return self(INTEL_FIXED_COUNTERS[index] if index < len(INTEL_FIXED_COUNTERS) else f"fixed_counter_{index}")

    def skip_unless_any(self, events: Iterable[str]) -> None:
        events = list(events)
        if events and all(not self(e) for e in events):
            pytest.skip(unmodelled_reason(self.facts, events))


# --------------------------------------------------------------------------------------------------
# Session state


@dataclass
class Row:
    nodeid: str
    suite: str
    name: str
    classname: str
    outcome: str = "passed"
    duration: float = 0.0
    message: str = ""
    erratum: str | None = None
    details: str = ""            # a failure's assertion and traceback (JUnit failure body)
    subject: bool = True         # False for ``harness`` tests: their pass alone is not a verdict


@dataclass
class PmufarmState:
    host: dict[str, Any]
    facts: dict[str, Any]
    flat: dict[str, Any]
    results_path: Path | None
    driver: Any = None           # the first driver that served a probe: names the results
    own_driver: Any = None       # the one make_driver(host, facts) built for this session
    driver_error: str | None = None
    cache: dict[tuple, ProbeResult] = field(default_factory=dict)
    rows: dict[str, Row] = field(default_factory=dict)
    harness: set[str] = field(default_factory=set)  # node ids marked ``harness``
    started: float = field(default_factory=time.time)

    @property
    def driver_name(self) -> str:
        return getattr(self.driver, "name", None) or self.host.get("driver", "kvm")

    def get_driver(self) -> Any:
        """The host entry's driver (built once). Suites that override ``pmufarm_driver`` do not
        replace it for the other suites of the same session."""
        if self.own_driver is None and self.driver_error is None:
            from agent.drivers import make_driver

            try:
                self.own_driver = make_driver(self.host, self.facts)
            except Exception as exc:  # the driver could not even start: every probe errors
                self.driver_error = f"driver {self.host.get('driver', 'kvm')} failed to start: " \
                                    f"{type(exc).__name__}: {exc}"
        return self.own_driver

    def run_probe(self, driver: Any, name: str, params: dict[str, Any]) -> ProbeResult:
        """Run once per session per (driver, probe, params); a driver exception is an ``error``."""
        key = (getattr(driver, "name", type(driver).__name__), name, tuple(sorted(params.items())))
        if self.driver is None:
            self.driver = driver
        if key not in self.cache:
            start = time.monotonic_ns()
            try:
                result = driver.run(name, **params)
                if not isinstance(result, ProbeResult):
                    raise TypeError(f"run() returned {type(result).__name__}, not ProbeResult")
            except Exception as exc:
                result = ProbeResult(name, "error", f"driver {getattr(driver, 'name', '?')} raised "
                                     f"{type(exc).__name__}: {exc}", {}, time.monotonic_ns() - start)
            self.cache[key] = result
        return self.cache[key]


def _load_host(config: pytest.Config) -> tuple[dict[str, Any], dict[str, Any]]:
    path = config.getoption("pmufarm_host") or os.environ.get("PMUFARM_HOST_FILE")
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise pytest.UsageError(f"--pmufarm-host {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("host"), dict):
            raise pytest.UsageError(f"--pmufarm-host {path}: expected {{\"host\": {{...}}, \"facts\": {{...}}}}")
        host, facts = data["host"], data.get("facts")
    else:
        host = {"name": socket.gethostname(), "address": "local", "driver": "kvm", "provision": "none"}
        facts = None
    if not facts:
        try:
            if host.get("driver") == "model":
                from agent.drivers.model import simulated_facts

                facts = simulated_facts(host)
            elif host.get("driver") == "emulated":
                from agent.drivers.emulated import emulated_facts

                facts = emulated_facts(host)
            else:
                from agent.facts import collect_facts

                facts = collect_facts()
        except Exception as exc:
            raise pytest.UsageError(f"pmufarm: cannot get host facts for {host.get('name', '?')}: "
                                    f"{type(exc).__name__}: {exc}") from None
    return host, facts


def _state(config: pytest.Config) -> PmufarmState:
    return config.stash[_STATE]


# --------------------------------------------------------------------------------------------------
# Hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pmufarm", "pmufarm host facts and results")
    group.addoption("--pmufarm-host", dest="pmufarm_host", metavar="FILE", default=None,
                    help='JSON {"host": entry, "facts": facts} (env PMUFARM_HOST_FILE); '
                         "default: this machine, live facts, kvm driver")
    group.addoption("--pmufarm-results", dest="pmufarm_results", metavar="FILE", default=None,
                    help="write the JSON result list (contracts §5) and the facts here at session end")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(**facts): skip unless the host's flat facts match (vendor='intel', "
        "mediated_pmu=True, min_pmu_version=N, min_gp_counters=N, min_fixed_counters=N, ...)")
    config.addinivalue_line(
        "markers", "errata(*symptom_classes): symptom classes (contracts §6) that may bend this test; "
        "a deviation they explain on a host with such an erratum is an xfail carrying the erratum ID")
    config.addinivalue_line(
        "markers", "counts(*events): the test judges counts of these events (contracts §8 names); skip on a "
        "host whose emulated PMU does not model one of them (facts emulated.modelled_events)")
    config.addinivalue_line(
        "markers", "judges(*rules): the test judges these KVM rules; skip on a host whose emulated PMU "
        "declares it does not follow one of them (facts emulated.unmodelled_rules)")
    config.addinivalue_line(
        "markers", "harness: checks the VM machinery, not the suite's subject (the mediated vPMU); a run "
        "where only harness tests ran is reported 'not tested here', never PASS")
    if _STATE in config.stash or config.option.help or config.option.markers:
        return
    host, facts = _load_host(config)
    results = config.getoption("pmufarm_results")
    st = PmufarmState(host=host, facts=facts, flat=flatten(facts),
                      results_path=Path(results) if results else None)
    config.stash[_STATE] = st
    config.pluginmanager.register(_Recorder(st), "pmufarm-recorder")


def pytest_report_header(config: pytest.Config) -> list[str]:
    if _STATE not in config.stash:
        return []
    st = _state(config)
    f = st.flat
    model = f"{f.get('model'):#x}" if isinstance(f.get("model"), int) else f.get("model")
    return [f"pmufarm: host={st.host.get('name', '?')} uarch={f.get('uarch')} vendor={f.get('vendor')} "
            f"family={f.get('family')} model={model} driver={st.driver_name} simulated={f.get('simulated')} "
            f"mediated_pmu={f.get('mediated_pmu')} errata={','.join(map(str, f.get('errata') or [])) or '-'}"]


REQUIRE_ORDER = ("vendor", "kvm", "enable_pmu", "mediated_pmu", "perfmon_v2", "full_width_writes",
                 "min_pmu_version", "min_gp_counters", "min_fixed_counters")
_PROBLEM = pytest.StashKey[str]()


def _item_requirements(item: pytest.Item) -> dict[str, Any]:
    wanted: dict[str, Any] = {}
    for mark in reversed(list(item.iter_markers("requires"))):  # the closest marker wins
        if mark.args:
            raise KeyError("requires() takes keyword facts only, e.g. requires(vendor='intel')")
        wanted.update(mark.kwargs)
    order = {k: i for i, k in enumerate(REQUIRE_ORDER)}
    return dict(sorted(wanted.items(), key=lambda kv: order.get(kv[0], len(order))))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Unmet ``requires`` -> a skip marker (reported at the test's own location)."""
    if _STATE not in config.stash:
        return
    st = _state(config)
    st.harness = {item.nodeid for item in items if item.get_closest_marker("harness")}
    for item in items:
        for mark in item.iter_markers("errata"):
            unknown = [s for s in mark.args if s not in SYMPTOMS]
            if unknown or mark.kwargs:
                item.stash[_PROBLEM] = (f"errata() names unknown symptom classes {unknown or list(mark.kwargs)} "
                                        f"(known: {', '.join(SYMPTOMS)})")
        try:
            unmet = unmet_requirements(st.flat, st.facts, _item_requirements(item))
        except KeyError as exc:
            item.stash[_PROBLEM] = str(exc.args[0])
            continue
        counted = [e for mark in item.iter_markers("counts") for e in mark.args]
        if counted and unmodelled(st.facts, counted):
            unmet.append(unmodelled_reason(st.facts, counted))
        gaps = unmodelled_rules_reason(st.facts, [r for mark in item.iter_markers("judges") for r in mark.args])
        if gaps:
            unmet.append(gaps)
        if unmet:
            item.add_marker(pytest.mark.skip(reason="; ".join(unmet)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A malformed ``requires``/``errata`` marker is the test's error, not a silent skip."""
    problem = item.stash.get(_PROBLEM, None)
    if problem:
        pytest.fail(problem, pytrace=False)


def _suite_of(nodeid: str) -> str:
    parts = nodeid.split("::")[0].split("/")
    if "suites" in parts[:-1]:
        rest = parts[parts.index("suites") + 1:-1]
        if rest:
            return rest[0]
    return parts[-2] if len(parts) > 1 else ""


def _names(nodeid: str) -> tuple[str, str]:
    """(classname, name) as pytest's junitxml writes them."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _failure_message(report: pytest.TestReport | pytest.CollectReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    msg = crash.message if crash is not None else str(report.longrepr or "")
    msg = _first_line(msg)
    return msg[len("Failed: "):] if msg.startswith("Failed: ") else msg


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        reason = str(report.longrepr[2])
    else:
        reason = str(report.longrepr or "")
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def erratum_of(reason: str) -> str | None:
    m = ERRATUM_RE.match(reason or "")
    return m.group(1) if m else None


def _row(st: PmufarmState, nodeid: str) -> Row:
    if nodeid not in st.rows:
        classname, name = _names(nodeid)
        st.rows[nodeid] = Row(nodeid=nodeid, suite=_suite_of(nodeid), name=name, classname=classname,
                              subject=nodeid not in st.harness)
    return st.rows[nodeid]


class _Recorder:
    """Registered at configure time: turns reports into contracts §5 rows and writes the file."""

    def __init__(self, st: PmufarmState):
        self.st = st

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        row = _row(self.st, report.nodeid)
        row.duration += float(report.duration or 0.0)
        wasxfail = getattr(report, "wasxfail", None)
        if report.when == "setup":
            if report.failed:
                row.outcome, row.message = "error", _failure_message(report)
            elif report.skipped:
                row.outcome, row.message = "skipped", _skip_reason(report)
                if wasxfail is not None:  # xfail(run=False) and friends
                    row.outcome, row.message = "xfailed", str(wasxfail)
        elif report.when == "call":
            if wasxfail is not None and report.skipped:
                row.outcome, row.message = "xfailed", str(wasxfail)
            elif wasxfail is not None and report.passed:
                row.outcome, row.message = "xpassed", str(wasxfail)
            elif report.failed:
                row.outcome, row.message = "failed", _failure_message(report)
            elif report.skipped:
                row.outcome, row.message = "skipped", _skip_reason(report)
            else:
                row.outcome, row.message = "passed", ""
        elif report.when == "teardown" and report.failed and row.outcome in ("passed", "skipped", "xfailed"):
            row.outcome, row.message = "error", "teardown: " + _failure_message(report)
        row.erratum = erratum_of(row.message) if row.outcome in ("xfailed", "xpassed") else None
        if report.failed and not row.details:  # the assertion and traceback, as pytest printed them
            row.details = report.longreprtext[-DETAILS_LIMIT:]

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            row = _row(self.st, report.nodeid or "<collection>")
            lines = [ln.strip() for ln in str(report.longrepr or "").splitlines() if ln.strip()]
            last = lines[-1].removeprefix("E").strip() if lines else ""
            row.outcome, row.message = "error", f"collection: {last or _failure_message(report)}"
            row.details = str(report.longrepr or "")[-DETAILS_LIMIT:]

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        path = self.st.results_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results_document(self.st, int(exitstatus)), indent=1, default=str))
        tmp.replace(path)


def results_document(st: PmufarmState, exitstatus: int | None = None) -> dict[str, Any]:
    return {
        "host": st.host.get("name"),
        "driver": st.driver_name,
        "simulated": bool(st.flat.get("simulated")),
        "exitstatus": exitstatus,
        "started": st.started,
        "finished": time.time(),
        "facts": st.facts,
        "tests": [asdict(r) for r in st.rows.values()],
        "probes": [{"driver": k[0], "params": dict(k[2]), **asdict(v)} for k, v in st.cache.items()],
    }


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def pmufarm_state(request: pytest.FixtureRequest) -> PmufarmState:
    if _STATE not in request.config.stash:
        pytest.fail("pmufarm plugin is not configured", pytrace=False)
    return _state(request.config)


@pytest.fixture(scope="session")
def facts(pmufarm_state: PmufarmState) -> dict[str, Any]:
    """The host facts (contracts §2), nested."""
    return pmufarm_state.facts


@pytest.fixture(scope="session")
def flat_facts(pmufarm_state: PmufarmState) -> dict[str, Any]:
    """``flat_facts(facts)``: the keys ``requires`` compares."""
    return pmufarm_state.flat


@pytest.fixture(scope="session")
def host(pmufarm_state: PmufarmState) -> dict[str, Any]:
    """The inventory host entry (contracts §3)."""
    return pmufarm_state.host


@pytest.fixture(scope="session")
def pmufarm_driver(pmufarm_state: PmufarmState) -> Any:
    """The driver serving the probes (``make_driver(host, facts)``); override to inject a fake."""
    driver = pmufarm_state.get_driver()
    if driver is None:
        pytest.fail(pmufarm_state.driver_error or "no driver", pytrace=False)
    return driver


@pytest.fixture(scope="session", autouse=True)
def _pmufarm_properties(pmufarm_state: PmufarmState, record_testsuite_property: Callable) -> None:
    f, cpu = pmufarm_state.flat, pmufarm_state.facts.get("cpu") or {}
    props = {
        "host": pmufarm_state.host.get("name"), "vendor": f.get("vendor"), "uarch": f.get("uarch"),
        "family": f.get("family"), "model": f"{f['model']:#x}" if isinstance(f.get("model"), int)
        else f.get("model"), "stepping": f.get("stepping"), "microcode": cpu.get("microcode"),
        "kernel": f.get("kernel"), "mediated": f.get("mediated_pmu"), "simulated": f.get("simulated"),
        "driver": pmufarm_state.driver_name, "pmu_version": f.get("pmu_version"),
        "errata": ",".join(map(str, f.get("errata") or [])),
    }
    for key, value in props.items():
        record_testsuite_property(key, "" if value is None else str(value))


@pytest.fixture(scope="session")
def modelled(pmufarm_state: PmufarmState) -> Modelled:
    """``modelled(event) -> bool``, ``modelled.fixed(i)``: see ``Modelled`` (emulated hosts only say no)."""
    return Modelled(pmufarm_state.facts)


def counted(*events: str) -> list[Any]:
    """``parametrize("event", counted(...))``: one param per event, each marked ``counts(event)``."""
    return [pytest.param(e, marks=pytest.mark.counts(e)) for e in events]


ProbeFn = Callable[..., ProbeResult]


@pytest.fixture
def probe(request: pytest.FixtureRequest, pmufarm_state: PmufarmState) -> ProbeFn:
    """``probe(name, **params) -> ProbeResult``: runs once per session per (name, params).

    ``unsupported`` -> skip with the driver's reason; ``error`` -> fail with it.
    """

    def run(name: str, **params: Any) -> ProbeResult:
        spec = PROBES.get(name) or GUEST_PROBES.get(name)
        if spec is None:
            pytest.fail(f"unknown probe {name!r} (known: {', '.join([*PROBES, *GUEST_PROBES])})", pytrace=False)
        try:
            merged = parse_params(spec, params)
        except ValueError as exc:
            pytest.fail(str(exc), pytrace=False)
        driver = request.getfixturevalue("pmufarm_driver")
        result = pmufarm_state.run_probe(driver, name, merged)
        request.node.user_properties.append(("probe", f"{name} {json.dumps(merged, sort_keys=True)} "
                                                      f"{result.status}"))
        if result.status == "unsupported":
            pytest.skip(f"probe {name}: {result.reason or 'unsupported (no reason given)'}")
        if result.status != "ok":
            pytest.fail(f"probe {name} {result.status}: {result.reason or '(no reason given)'}",
                        pytrace=False)
        return result

    return run


class Errata:
    """Judges a measured value against the expected one, letting the host's errata bend it.

    Only symptoms that are both declared on the test (``@pytest.mark.errata``) and listed by one of
    the host's errata count; a deviation they explain within the contracts §6 bound is an xfail whose
    reason starts with the erratum ID. Anything else fails.
    """

    def __init__(self, declared: Iterable[str], host_errata: list[dict[str, Any]]):
        self.declared = tuple(dict.fromkeys(declared))
        self.host_errata = list(host_errata or [])

    def applicable(self, symptom: str) -> list[str]:
        """Erratum IDs of this host that list ``symptom``, if the test declared it."""
        if symptom not in self.declared:
            return []
        return [e.get("id", "?") for e in self.host_errata if symptom in (e.get("symptoms") or [])]

    def _context(self) -> str:
        ids = ", ".join(f"{e.get('id')}({'/'.join(e.get('symptoms') or [])})" for e in self.host_errata)
        return f"declared symptoms: {', '.join(self.declared) or 'none'}; host errata: {ids or 'none'}"

    @staticmethod
    def _event(what: str) -> str | None:
        low = what.lower()
        if "instruction" in low:
            return "instructions"
        if "branch" in low and "miss" not in low:
            return "branches"
        return None

    def verdict(self, what: str, observed: int, expected: int, transitions: int = 0,
                event: str | None = None, kvm_exits: int | None = None) -> tuple[str, str]:
        """``("pass", "")``, ``("xfail", "<ID>: ...")`` or ``("fail", why)`` without raising."""
        if observed == expected:
            return "pass", ""
        dev = observed - expected
        event = event or self._event(what)
        head = f"{what} {observed} vs {expected} ({dev:+d}"
        outside = []
        for name in self.declared:
            sym = SYMPTOMS[name]
            if sym.bound is None or event not in sym.events:
                continue
            for erratum in self.applicable(name):
                bound = sym.bound_text(transitions, expected, kvm_exits) if sym.bound_text else ""
                if sym.bound(dev, transitions, expected, kvm_exits):
                    return "xfail", f"{erratum}: {head}, within {bound}; {name})"
                outside.append(f"{erratum}/{name} allows {bound}")
        why = (f"outside the erratum bound: {'; '.join(outside)}" if outside
               else f"no declared erratum of this host explains it; {self._context()}")
        return "fail", f"{head}); {why}"

    def exact(self, what: str, observed: int, expected: int, transitions: int = 0,
              event: str | None = None, kvm_exits: int | None = None) -> None:
        """``observed == expected``, or a deviation a declared + present symptom bounds (-> xfail).

        ``transitions``: VM-exits inside the counting window (the workload's ``vm_exits``); each is
        followed by the VM-entry that resumes the guest. ``event``: ``instructions``/``branches``,
        inferred from ``what`` when omitted. ``kvm_exits``: KVM's own exit count over the batch
        (workload ``kvm_exits``; in-kernel exits included), when the probe measured it.
        """
        self.exact_all([(what, observed, expected, transitions, event, kvm_exits)])

    def exact_all(self, checks: Iterable[tuple]) -> None:
        """Several ``exact`` checks judged together: any failure fails (all listed), else any
        erratum-explained deviation xfails (first ID leads the reason), else pass."""
        verdicts = [self.verdict(*c) for c in checks]
        fails = [m for v, m in verdicts if v == "fail"]
        if fails:
            pytest.fail("; ".join(fails), pytrace=False)
        xfails = [m for v, m in verdicts if v == "xfail"]
        if xfails:
            more = f" (+{len(xfails) - 1} more within the bound)" if len(xfails) > 1 else ""
            pytest.xfail(xfails[0] + more)

    def check(self, what: str, ok: bool, detail: str, symptom: str | None = None,
              explained: bool = False) -> None:
        """Generic form: pass if ``ok``; else xfail if ``symptom`` is declared, one of the host's
        errata lists it and ``explained`` (the deviation is the symptom's); else fail."""
        if ok:
            return
        if symptom is not None:
            if symptom not in SYMPTOMS:
                pytest.fail(f"unknown symptom class {symptom!r}", pytrace=False)
            ids = self.applicable(symptom)
            if ids and explained:
                pytest.xfail(f"{ids[0]}: {what}: {detail} ({symptom})")
            if ids:
                pytest.fail(f"{what}: {detail}; not the {symptom} pattern of {ids[0]}", pytrace=False)
        pytest.fail(f"{what}: {detail}; {self._context()}", pytrace=False)


@pytest.fixture
def errata(request: pytest.FixtureRequest, pmufarm_state: PmufarmState) -> Errata:
    """Helper bound to this test's ``errata`` markers and the host's errata (see ``Errata``)."""
    declared = [s for mark in request.node.iter_markers("errata") for s in mark.args]
    return Errata(declared, pmufarm_state.facts.get("errata") or [])
