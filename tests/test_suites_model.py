"""The suites against the simulated farm (model driver) and against this machine (kvm driver).

- every suite on every inventory/sim.yaml host: passes, or xfails carrying one of the host's erratum
  IDs, or skips with a reason; never fails or errors;
- fault-injection sensitivity over the whole inventory/faults.yaml catalogue: every fault turns at
  least one test red, the healthy baseline has zero false failures;
- the kvm driver on this PMU-less machine: `pytest suites/isolation` passes the self-test and skips
  everything else with a reason naming the missing fact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.sensitivity import exit_code, render_table, run_sensitivity

ROOT = Path(__file__).resolve().parent.parent
SIM_HOSTS = yaml.safe_load((ROOT / "inventory" / "sim.yaml").read_text())["hosts"]
SUITES = ["isolation", "counters", "filter", "pmi"]


def run_pytest(args: list[str], tmp_path: Path, host: dict[str, Any] | None = None) -> tuple[int, dict[str, Any], str]:
    results = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "-q", "-rA",
           "--pmufarm-results", str(results), "--junitxml", str(tmp_path / "junit.xml")]
    if host is not None:
        host_file = tmp_path / "host.json"
        host_file.write_text(json.dumps({"host": host}))
        cmd += ["--pmufarm-host", str(host_file)]
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("PMUFARM_HOST_FILE", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    doc = json.loads(results.read_text()) if results.exists() else {}
    return proc.returncode, doc, proc.stdout + proc.stderr


@pytest.mark.parametrize("host", SIM_HOSTS, ids=[h["name"] for h in SIM_HOSTS])
def test_suites_pass_on_simulated_host(host: dict[str, Any], tmp_path: Path) -> None:
    rc, doc, out = run_pytest([f"suites/{s}" for s in SUITES], tmp_path, host)
    assert rc == 0, out[-3000:]
    errata_ids = {e["id"] for e in doc["facts"]["errata"]}
    assert doc["driver"] == "model" and doc["simulated"] is True
    rows = doc["tests"]
    assert {r["suite"] for r in rows} == set(SUITES)
    bad = [r for r in rows if r["outcome"] not in ("passed", "xfailed", "skipped")]
    assert not bad, bad
    for r in rows:
        if r["outcome"] == "xfailed":
            assert r["erratum"] in errata_ids, r
            assert r["message"].startswith(f"{r['erratum']}: "), r
        if r["outcome"] == "skipped":
            assert r["message"], r
    passed = [r for r in rows if r["outcome"] == "passed"]
    if doc["facts"]["mediated_pmu"]["status"] == "available":
        assert len(passed) > 40, f"only {len(passed)} tests ran on a mediated host"
        if not errata_ids:
            assert not [r for r in rows if r["outcome"] == "xfailed"]
    else:
        # only the PMU-less self-test runs; every other test names what the host lacks
        assert {r["name"] for r in passed} <= {"test_selftest_exits_and_checksum[1-iterations]",
                                               "test_selftest_exits_and_checksum[1000-iterations]",
                                               "test_selftest_no_guest_exceptions"}
        for r in rows:
            if r["outcome"] == "skipped":
                assert "requires " in r["message"] or "probe " in r["message"], r


def test_sensitivity_catches_every_fault(tmp_path: Path) -> None:
    result = run_sensitivity(SUITES, None, None, tmp_path)
    table = render_table(result)
    faults = yaml.safe_load((ROOT / "inventory" / "faults.yaml").read_text())
    assert set(result["faults"]) == {f["id"] for f in faults}
    missed = [fid for fid, f in result["faults"].items() if f["status"] != "caught"]
    assert not missed, table
    assert all(not b["false_failures"] for b in result["baseline"].values()), table
    assert not result["infra_errors"], table
    assert exit_code(result) == 0
    # both vendors' PerfMonV2-class hosts were exercised
    pmu_uarchs = {h["uarch"] for h in result["hosts"] if h["pmu_tests"]}
    assert {"sapphirerapids", "zen4"} <= pmu_uarchs
    assert "Verdict: 0 fault(s) missed" in table


def test_sensitivity_subset_and_exit_code(tmp_path: Path) -> None:
    """A suite selection that cannot see a fault reports it not_exercised, not missed; a suite that
    can but is blind to it makes exit_code non-zero."""
    result = run_sensitivity(["pmi"], ["zen4"], ["pmi_lost", "cross_context_leak"], tmp_path)
    assert result["faults"]["pmi_lost"]["status"] == "caught"
    assert result["faults"]["cross_context_leak"]["status"] == "not_exercised"
    assert exit_code(result) == 0
    blind = json.loads(json.dumps(result))
    blind["faults"]["pmi_lost"]["status"] = "missed"
    assert exit_code(blind) == 1
    with pytest.raises(ValueError, match="nosuchuarch"):
        run_sensitivity(["pmi"], ["nosuchuarch"], None, tmp_path)


def _kvm_ready() -> str | None:
    try:
        import agent.drivers.kvm  # noqa: F401
    except ImportError as exc:
        return f"kvm driver not importable: {exc}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm not accessible"
    from agent.facts import collect_facts, flat_facts

    if flat_facts(collect_facts())["mediated_pmu"]:
        return "this host has a mediated vPMU; the PMU-less expectations do not apply"
    return None


def test_isolation_on_this_machine_with_kvm_driver(tmp_path: Path) -> None:
    why = _kvm_ready()
    if why:
        pytest.skip(why)
    rc, doc, out = run_pytest(["suites/isolation"], tmp_path)
    assert rc == 0, out[-3000:]
    assert doc["driver"] == "kvm" and doc["simulated"] is False
    rows = {r["name"]: r for r in doc["tests"]}
    for name in ("test_selftest_exits_and_checksum[1-iterations]",
                 "test_selftest_exits_and_checksum[1000-iterations]", "test_selftest_no_guest_exceptions"):
        assert rows[name]["outcome"] == "passed", rows[name]
    others = [r for n, r in rows.items() if not n.startswith("test_selftest")]
    assert others and all(r["outcome"] == "skipped" for r in others), others
    for r in others:
        assert "requires mediated_pmu=True: host has mediated_pmu=False" in r["message"], r
        assert "enable_pmu" in r["message"] or "PerfMonV2" in r["message"], r


# Observation mutations for the rules no catalogue fault bends: each must turn its test red.
# (probe, python statement over `o` (the observations), test that must fail)
MUTATIONS = [
    ("selftest", "o['vm_exits'] -= 1", "test_selftest_exits_and_checksum[1000-iterations]"),
    ("selftest", "o['exceptions'] = [{'vector': 6, 'rip': 4096}]", "test_selftest_no_guest_exceptions"),
    ("disabled_counter", "o['gp'][3]['after'] += 1", "test_disabled_counter_does_not_count[gp]"),
    ("disabled_counter", "o['fixed'][0]['after'] += 5", "test_disabled_counter_does_not_count[fixed]"),
    ("overflow_status", "o['after_clear'] = o['after_overflow']", "test_overflow_status[clear-clears]"),
    ("overflow_status", "o['after_overflow'] = 0", "test_overflow_status[overflow-sets]"),
    ("overflow_status", "o['after_set'] = 0", "test_overflow_status[set-sets]"),
    ("filter_invalid", "o['cases'][2]['errno'] = 22", "test_filter_invalid[too_many_events-E2BIG]"),
    ("filter_invalid", "o['cases'][0]['errno'] = 0", "test_filter_invalid[bad_action-EINVAL]"),
    ("unexposed", "o['fast_rdpmc']['vector'] = None", "test_fast_rdpmc_gp"),
    ("pmu_disabled", "o['cap_after_vcpu_errno'] = 0", "test_pmu_disabled_per_vm[cap-refused-after-vcpu]"),
    ("pmu_disabled", "o['guest_pmu_version'] = 2", "test_pmu_disabled_per_vm[guest-cpuid-no-pmu]"),
    ("counter_width", "o['legacy_write']['read'] = o['legacy_write']['written']",
     "test_intel_legacy_write_sign_extends"),
    ("counter_width", "o['beyond_width']['vector'] = None", "test_intel_write_beyond_width_gp"),
    ("global_ctrl", "o['reset_value'] = 0", "test_global_ctrl_reset_value"),
    ("pmi", "o['interrupts'] = 1 if o['lvtpc'] == 'masked' else o['interrupts']",
     "test_pmi_masked[no-guest-interrupt]"),
    ("pmi", "o['global_status'] = 0 if o['lvtpc'] == 'unmasked' else o['global_status']",
     "test_pmi_unmasked[status-bit-set]"),
    ("arch_events", "[e.update(count=0) for e in o['gp'] if e['event'] == 'cycles' and e['counter'] == 5]",
     "test_intel_arch_event_on_every_gp_counter[cycles]"),
    ("arch_events", "o['gp'] = [e for e in o['gp'] if not (e['event'] == 'llc_misses' and e['counter'] == 7)]",
     "test_intel_arch_event_on_every_gp_counter[llc_misses]"),
    ("arch_events", "[e.update(count=0) for e in o['fixed'] if e['counter'] == 1]",
     "test_intel_fixed_counter[fc1-cycles]"),
    ("host_excludes_guest", "o['runs'][1]['vm_exits'] += 7", "test_host_excludes_guest"),
    ("exclusivity", "o['event_with_exclude_guest_errno'] = 16", "test_exclusivity[exclude_guest-event-allowed]"),
    ("fresh_state", "o['exceptions'] = [{'vector': 13, 'rip': 4096}]", "test_fresh_vm_state_is_zero[gp_selectors]"),
    ("event_filter", "o['set_errno'] = 22", "test_event_filter_gp[deny_member]"),
    ("filter_update", "o['selector_read_after_deny'] &= ~(1 << 22)",
     "test_filter_update_while_running[selector-readback]"),
    ("guest_count", "o['counts']['branches'] -= 1", "test_guest_count_excludes_host[branches]"),
]

MUTATOR = '''
import copy, json, os
import agent.drivers as drivers
from agent.protocol import ProbeResult

MUTATIONS = json.loads(os.environ["PMUFARM_TEST_MUTATIONS"])
_make = drivers.make_driver


class Mutating:
    def __init__(self, inner):
        self.inner, self.name, self.simulated = inner, inner.name, inner.simulated

    def list(self):
        return self.inner.list()

    def run(self, probe, **params):
        r = self.inner.run(probe, **params)
        o = copy.deepcopy(r.observations)
        for p, stmt in MUTATIONS:
            if p == probe and r.status == "ok":
                exec(stmt, {"o": o})
        return ProbeResult(r.probe, r.status, r.reason, o, r.elapsed_ns)


drivers.make_driver = lambda host, facts: Mutating(_make(host, facts))
'''


def test_rules_without_a_fault_can_fail(tmp_path: Path) -> None:
    """Every rule the fault catalogue does not bend still turns red on a wrong observation."""
    (tmp_path / "pmufarm_mutator.py").write_text(MUTATOR)
    host = next(h for h in SIM_HOSTS if h["model"]["uarch"] == "sapphirerapids")
    results, host_file = tmp_path / "results.json", tmp_path / "host.json"
    host_file.write_text(json.dumps({"host": host}))
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "PMUFARM_TEST_MUTATIONS": json.dumps([[p, s] for p, s, _ in MUTATIONS])}
    proc = subprocess.run([sys.executable, "-m", "pytest", *[f"suites/{s}" for s in SUITES], "-p", "pmufarm_mutator",
                           "-p", "no:cacheprovider", "-q", "--pmufarm-host", str(host_file),
                           "--pmufarm-results", str(results)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(results.read_text())["tests"]}
    outcome = {t: rows.get(t, {}).get("outcome") for _, _, t in MUTATIONS}
    not_red = {t: o for t, o in outcome.items() if o != "failed"}
    assert not not_red, not_red
