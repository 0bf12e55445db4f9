"""Reports layer: JUnit per CPU model+errata, matrix, KCIDB, summary, HTML in a real browser."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from junitparser import Error, Failure, JUnitXml, Skipped

from orchestrator.reports import (
    baseline_from_jobs,
    build_kcidb,
    build_matrix,
    render_matrix,
    result_key,
    validate_kcidb,
    write_reports,
)
from orchestrator.reports.naming import job_cpu, junit_filename

RUN_ID = "20261125-101500-ab12"
RUN = {"id": RUN_ID, "created": "2026-11-25T10:15:00+00:00", "suites": ["isolation", "counters"],
       "kernel": {"tree": "kvm-next", "commit": "0123456789abcdef0123456789abcdef01234567",
                  "patchset_hash": "ab" * 32},
       "origin": "pmufarm"}


def facts(vendor, uarch, name, family, model, stepping=1, simulated=True, errata=(), mediated=True):
    return {
        "schema": 1, "simulated": simulated,
        "cpu": {"vendor": vendor, "vendor_id": "GenuineIntel" if vendor == "intel" else "AuthenticAMD",
                "family": family, "model": model, "stepping": stepping, "microcode": "0x2b000603",
                "model_name": name, "uarch": uarch, "uarch_name": name, "hybrid": False, "hypervisor": False},
        "pmu": {"version": 5 if vendor == "intel" else 2, "gp_counters": 8 if vendor == "intel" else 6,
                "gp_width": 48, "fixed_counters": 4 if vendor == "intel" else 0, "fixed_width": 48,
                "perfmon_v2": vendor == "amd"},
        "kvm": {"present": True, "module": f"kvm_{vendor}", "enable_pmu": True, "enable_mediated_pmu": mediated},
        "kernel": {"release": "simulated" if simulated else "7.0.0-rc3", "cmdline": "", "nmi_watchdog": 0,
                   "perf_event_paranoid": 2},
        "mediated_pmu": {"status": "available" if mediated else "unavailable",
                         "reasons": [] if mediated else ["kvm_intel.enable_mediated_pmu=N"]},
        "errata": [{"id": e, "symptoms": ["insn_overcount_on_vm_transition"]} for e in errata],
    }


SPR = facts("intel", "sapphirerapids", "Sapphire Rapids", 6, 0x8F, stepping=8)
SRF = facts("intel", "sierraforest", "Sierra Forest", 6, 0xAF, stepping=3, errata=["SRF7"])
ZEN4 = facts("amd", "zen4", "Zen 4", 0x19, 0x11)
GNR = facts("intel", "graniterapids", "Granite Rapids", 6, 0xAD, simulated=False)

ISO = "suites/isolation/test_state.py::test_fresh_vm_state_is_zero"
GH = "suites/isolation/test_guest_host.py::test_guest_count_excludes_host"
UNEXP = "suites/isolation/test_unexposed.py::test_fast_rdpmc_gp"
CNT = "suites/counters/test_arch_events.py::test_arch_event_counts"


def t(nodeid, outcome, message="", erratum=None, duration=0.01):
    suite = nodeid.split("/")[1]
    return {"nodeid": nodeid, "suite": suite, "name": nodeid.split("::")[-1],
            "classname": nodeid.split("::")[0][:-3].replace("/", "."), "outcome": outcome,
            "duration": duration, "message": message, "erratum": erratum}


def job(host, suite, f, tests, status=None, attempt=1, log_tail="", exit_code=None):
    if status is None:
        status = "failed" if any(x["outcome"] in ("failed", "error") for x in tests) else "passed"
    return {"run_id": RUN_ID, "host": host, "suite": suite, "attempt": attempt, "status": status,
            "exit_code": exit_code if exit_code is not None else (1 if status == "failed" else 0),
            "facts": f, "tests": tests, "started": "2026-11-25T10:16:00", "finished": "2026-11-25T10:17:00Z",
            "log_tail": log_tail}


SKIP_MSG = "requires perfmon_v2=True: host has perfmon_v2=False"
XFAIL_MSG = "SRF7: instructions 1000004 vs 1000000 (+4, within 2 per transition x 2; insn_overcount_on_vm_transition)"
FAIL_MSG = ("instructions 1000007 vs 1000000 (+7); no declared erratum of this host explains it; "
            "fault leak_guest_count")


def make_jobs():
    return [
        # Two simulated Sapphire Rapids: one fails a test with *no message* (junit-xml would drop it).
        job("sim-spr-0", "isolation", SPR, [
            t(f"{ISO}[gp0]", "passed"), t(f"{ISO}[fixed0]", "passed"),
            t(f"{GH}[instructions]", "passed"), t(UNEXP, "skipped", SKIP_MSG)]),
        # sim-spr-1 isolation: attempt 1 was an infra error, attempt 2 counts.
        job("sim-spr-1", "isolation", {}, [], status="infra_error", attempt=1,
            log_tail="celery: worker lost", exit_code=-1),
        job("sim-spr-1", "isolation", SPR, [
            t(f"{ISO}[gp0]", "passed"), t(f"{ISO}[fixed0]", "failed", ""),
            t(f"{GH}[instructions]", "passed"), t(UNEXP, "skipped", SKIP_MSG)], attempt=2),
        job("sim-spr-0", "counters", SPR, [t(f"{CNT}[cycles]", "passed"), t(f"{CNT}[instructions]", "passed")]),
        job("sim-spr-1", "counters", SPR, [t(f"{CNT}[cycles]", "passed"), t(f"{CNT}[instructions]", "passed")]),
        # Simulated Sierra Forest with erratum SRF7: xfails carrying the id.
        job("sim-srf-0", "isolation", SRF, [
            t(f"{ISO}[gp0]", "passed"), t(f"{ISO}[fixed0]", "passed"),
            t(f"{GH}[instructions]", "xfailed", XFAIL_MSG, "SRF7"), t(UNEXP, "skipped", SKIP_MSG)]),
        job("sim-srf-0", "counters", SRF, [
            t(f"{CNT}[cycles]", "passed"), t(f"{CNT}[instructions]", "xfailed", XFAIL_MSG, "SRF7")]),
        # Simulated Zen 4 with an injected fault: a real failure, plus a test error.
        job("sim-zen4-0", "isolation", ZEN4, [
            t(f"{ISO}[gp0]", "passed"), t(f"{ISO}[fixed0]", "skipped", "requires vendor='intel'"),
            t(f"{GH}[instructions]", "failed", FAIL_MSG), t(UNEXP, "passed")]),
        job("sim-zen4-0", "counters", ZEN4, [
            t(f"{CNT}[cycles]", "error", "fixture 'probe': ProbeError: vmrun failed"),
            t(f"{CNT}[instructions]", "passed")]),
        # A real Granite Rapids host.
        job("farm-gnr-01", "isolation", GNR, [
            t(f"{ISO}[gp0]", "passed"), t(f"{ISO}[fixed0]", "passed"),
            t(f"{GH}[instructions]", "passed"), t(UNEXP, "passed")]),
        job("farm-gnr-01", "counters", GNR, [
            t(f"{CNT}[cycles]", "passed"), t(f"{CNT}[instructions]", "xpassed", "SRF7: may overcount", "SRF7")]),
        # A host that never answered: no facts, no tests.
        job("farm-zen5-07", "isolation", {}, [], status="infra_error", exit_code=255,
            log_tail="fabric: ssh farm-zen5-07:22: Connection refused"),
    ]


EXPECTED_FILES = {
    "intel-sapphirerapids-06-8f-sim.xml", "intel-sierraforest-06-af-sim+SRF7.xml",
    "amd-zen4-19-11-sim.xml", "intel-graniterapids-06-ad.xml", "unknown.xml",
}
# (file, suite name) -> (tests, failures, errors, skipped)
EXPECTED_SUITES = {
    ("intel-sapphirerapids-06-8f-sim.xml", "sim-spr-0/isolation"): (4, 0, 0, 1),
    ("intel-sapphirerapids-06-8f-sim.xml", "sim-spr-1/isolation"): (4, 1, 0, 1),
    ("intel-sapphirerapids-06-8f-sim.xml", "sim-spr-0/counters"): (2, 0, 0, 0),
    ("intel-sapphirerapids-06-8f-sim.xml", "sim-spr-1/counters"): (2, 0, 0, 0),
    ("intel-sierraforest-06-af-sim+SRF7.xml", "sim-srf-0/isolation"): (4, 0, 0, 2),
    ("intel-sierraforest-06-af-sim+SRF7.xml", "sim-srf-0/counters"): (2, 0, 0, 1),
    ("amd-zen4-19-11-sim.xml", "sim-zen4-0/isolation"): (4, 1, 0, 1),
    ("amd-zen4-19-11-sim.xml", "sim-zen4-0/counters"): (2, 0, 1, 0),
    ("intel-graniterapids-06-ad.xml", "farm-gnr-01/isolation"): (4, 0, 0, 0),
    ("intel-graniterapids-06-ad.xml", "farm-gnr-01/counters"): (2, 0, 0, 0),
    ("unknown.xml", "farm-zen5-07/isolation"): (1, 0, 1, 0),
}
PROPS = {"host", "vendor", "uarch", "family", "model", "stepping", "microcode", "kernel", "mediated",
         "simulated", "driver", "errata"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / RUN_ID
    jobs = make_jobs()
    written = write_reports(RUN, jobs, out, matrix_formats=("md", "html", "json", "csv"), validate=True)
    return out, written, jobs


# ------------------------------------------------------------------ naming / JUnit

def test_file_names_per_cpu_model_and_errata(reports):
    out, written, _ = reports
    names = {p.name for p in (out / "junit").glob("*.xml")}
    assert names == EXPECTED_FILES
    assert {k for k in written if k.startswith("junit/")} == {f"junit/{n}" for n in EXPECTED_FILES}
    for key in ("matrix.md", "matrix.html", "matrix.json", "matrix.csv", "kcidb.json", "summary.md"):
        assert written[key] == out / key and written[key].stat().st_size > 0
    assert not list(out.rglob("*.tmp"))


def test_inventory_fallback_names_file():
    j = job("farm-x", "isolation", {}, [], status="infra_error")
    j["host_cpu"] = {"vendor": "amd", "uarch": "zen5", "family": 0x1A, "model": 0x02}
    assert junit_filename(job_cpu(j)) == "amd-zen5-1a-02.xml"
    assert junit_filename(job_cpu(job("farm-y", "isolation", {}, [], status="infra_error"))) == "unknown.xml"


def test_junit_counts_per_suite_and_root_totals(reports):
    out, _, _ = reports
    seen = set()
    for path in sorted((out / "junit").glob("*.xml")):
        xml = JUnitXml.fromfile(str(path))
        for suite in xml:
            key = (path.name, suite.name)
            seen.add(key)
            got = (suite.tests, suite.failures, suite.errors, suite.skipped)
            assert got == EXPECTED_SUITES[key], key
            # Recount from the cases themselves, not just the attributes we wrote.
            cases = list(suite)
            recount = (len(cases),
                       sum(1 for c in cases if any(isinstance(r, Failure) for r in c.result)),
                       sum(1 for c in cases if any(isinstance(r, Error) for r in c.result)),
                       sum(1 for c in cases if any(isinstance(r, Skipped) for r in c.result)))
            assert recount == got, key
        root = ET.parse(path).getroot()
        # The strict schema allows no attributes on the root: totals live on each testsuite.
        assert root.tag == "testsuites" and not root.attrib, path.name
        assert [s.get("id") for s in root] == [str(i) for i in range(len(root))]
    assert seen == set(EXPECTED_SUITES)


JUNIT_XSD = Path(__file__).resolve().parents[2] / "shared" / "reference" / "junit" / "JUnit.xsd"


def test_junit_valid_against_the_schema(reports):
    """Every file validates against the Ant/Jenkins JUnit schema, read from shared/ at test time."""
    lxml = pytest.importorskip("lxml.etree", reason="lxml (the test extra) is not installed")
    if not JUNIT_XSD.exists():
        pytest.skip(f"no JUnit schema at {JUNIT_XSD} (shared/reference/junit/ is not beside this checkout)")
    schema = lxml.XMLSchema(lxml.parse(str(JUNIT_XSD)))
    out, _, _ = reports
    files = sorted((out / "junit").glob("*.xml"))
    assert files
    for path in files:
        doc = lxml.parse(str(path))
        assert schema.validate(doc), f"{path.name}: " + "; ".join(
            f"line {e.line}: {e.message}" for e in list(schema.error_log)[:5])


def test_junit_properties_and_classnames(reports):
    out, _, _ = reports
    xml = JUnitXml.fromfile(str(out / "junit" / "intel-sierraforest-06-af-sim+SRF7.xml"))
    for suite in xml:
        props = {p.name: p.value for p in suite.properties()}
        assert set(props) >= PROPS
        assert props["host"] == "sim-srf-0" and props["errata"] == "SRF7"
        assert props["simulated"] == "true" and props["driver"] == "model"
        assert (props["vendor"], props["uarch"], props["family"], props["model"]) == \
            ("intel", "sierraforest", "6", str(0xAF))
        for case in suite:
            assert case.classname.startswith(f"sim-srf-0.{props['suite']}.")
    gnr = JUnitXml.fromfile(str(out / "junit" / "intel-graniterapids-06-ad.xml"))
    props = {p.name: p.value for s in gnr for p in s.properties()}
    assert props["simulated"] == "false" and props["kernel"] == "7.0.0-rc3"
    assert props["kernel_commit"] == RUN["kernel"]["commit"]


def _case(path: Path, suite_name: str, name: str):
    for suite in JUnitXml.fromfile(str(path)):
        if suite.name == suite_name:
            for case in suite:
                if case.name == name:
                    return case
    raise AssertionError(f"{suite_name}::{name} not in {path.name}")


def test_junit_xfail_skip_failure_error_infra(reports):
    out, _, _ = reports
    j = out / "junit"
    xf = _case(j / "intel-sierraforest-06-af-sim+SRF7.xml", "sim-srf-0/isolation",
               "test_guest_count_excludes_host[instructions]")
    (sk,) = xf.result
    # <skipped> takes no type in the schema: the message says xfail and names the erratum.
    assert isinstance(sk, Skipped) and sk.message.startswith("xfail: SRF7: ")
    skip = _case(j / "intel-sierraforest-06-af-sim+SRF7.xml", "sim-srf-0/isolation", "test_fast_rdpmc_gp")
    assert isinstance(skip.result[0], Skipped) and skip.result[0].message == SKIP_MSG
    # A message-less failure must still be a failure, with a message.
    nomsg = _case(j / "intel-sapphirerapids-06-8f-sim.xml", "sim-spr-1/isolation",
                  "test_fresh_vm_state_is_zero[fixed0]")
    (f,) = nomsg.result
    assert isinstance(f, Failure) and f.message == "failed (no message)"
    assert "test_fresh_vm_state_is_zero[fixed0]" in (f.text or "")
    fail = _case(j / "amd-zen4-19-11-sim.xml", "sim-zen4-0/isolation",
                 "test_guest_count_excludes_host[instructions]")
    assert isinstance(fail.result[0], Failure) and "leak_guest_count" in fail.result[0].message
    err = _case(j / "amd-zen4-19-11-sim.xml", "sim-zen4-0/counters", "test_arch_event_counts[cycles]")
    assert isinstance(err.result[0], Error) and "ProbeError" in err.result[0].message
    infra = _case(j / "unknown.xml", "farm-zen5-07/isolation", "[job] infra_error")
    (e,) = infra.result
    assert isinstance(e, Error) and e.type == "infra_error"
    assert "Connection refused" in e.message and "exit code 255" in e.message
    assert infra.classname == "farm-zen5-07.isolation.job"


def test_retry_counts_last_attempt_only(reports):
    out, _, _ = reports
    xml = JUnitXml.fromfile(str(out / "junit" / "intel-sapphirerapids-06-8f-sim.xml"))
    names = [s.name for s in xml]
    assert names.count("sim-spr-1/isolation") == 1
    props = {p.name: p.value for s in xml if s.name == "sim-spr-1/isolation" for p in s.properties()}
    assert props["attempt"] == "2"


def test_junit_survives_control_characters(tmp_path):
    jobs = [job("sim-spr-0", "isolation", SPR, [t(f"{ISO}[gp0]", "failed", "bad \x1b[31mcolour\x00 \x07")])]
    write_reports(RUN, jobs, tmp_path)
    xml = JUnitXml.fromfile(str(tmp_path / "junit" / "intel-sapphirerapids-06-8f-sim.xml"))
    (case,) = list(next(iter(xml)))
    assert case.result[0].message == "bad [31mcolour" and "\x1b" not in case.result[0].text


def test_stale_junit_files_removed(tmp_path):
    write_reports(RUN, make_jobs(), tmp_path)
    write_reports(RUN, [j for j in make_jobs() if j["host"] != "farm-gnr-01"], tmp_path)
    assert not (tmp_path / "junit" / "intel-graniterapids-06-ad.xml").exists()


# ------------------------------------------------------------------ matrix

def test_matrix_columns_and_cells():
    m = build_matrix(make_jobs())
    keys = [c.key for c in m.columns]
    assert set(keys) == {"intel-sapphirerapids-sim", "intel-sierraforest-sim", "intel-graniterapids",
                         "amd-zen4-sim", "unknown-unknown"}
    assert keys.index("intel-sapphirerapids-sim") < keys.index("amd-zen4-sim")
    spr = next(c for c in m.columns if c.key == "intel-sapphirerapids-sim")
    assert spr.simulated and spr.models == ["06-8F"] and spr.hosts == ["sim-spr-0", "sim-spr-1"]
    assert "(sim)" in spr.header and "×2 hosts" in spr.header

    cell = m.cell(f"{ISO}[fixed0]", "intel-sapphirerapids-sim")
    assert (cell.worst, cell.worst_count, cell.total, cell.text) == ("failed", 1, 2, "fail 1/2")
    assert cell.outcomes["passed"] == ["sim-spr-0"] and cell.outcomes["failed"] == ["sim-spr-1"]
    ok = m.cell(f"{ISO}[gp0]", "intel-sapphirerapids-sim")
    assert ok.text == "pass 2/2"
    xf = m.cell(f"{GH}[instructions]", "intel-sierraforest-sim")
    assert xf.text == "xfail 1/1" and xf.detail == "SRF7"
    sk = m.cell(UNEXP, "intel-sapphirerapids-sim")
    assert sk.text == "skip 2/2" and sk.detail == SKIP_MSG
    assert m.cell(f"{CNT}[cycles]", "amd-zen4-sim").text == "error 1/1"
    assert m.cell(f"{CNT}[instructions]", "intel-graniterapids").text == "xpass 1/1"
    assert m.cell(f"{GH}[instructions]", "amd-zen4-sim").text == "fail 1/1"
    # The host that never answered shows up as a job row, not as silence.
    job_row = next(r for r in m.rows if r.suite == "isolation" and r.test == "[job]")
    assert job_row.cells["unknown-unknown"].text == "infra 1/1"
    assert "Connection refused" in job_row.cells["unknown-unknown"].title()
    # Not run in a column -> no cell.
    assert m.cell(f"{CNT}[cycles]", "unknown-unknown") is None


def test_matrix_worst_outcome_order():
    hosts = [("h-pass", "passed"), ("h-skip", "skipped"), ("h-xfail", "xfailed"), ("h-xpass", "xpassed")]
    jobs = [job(h, "isolation", SPR, [t(f"{ISO}[gp0]", o, "SRF7: x" if "x" in o else "")]) for h, o in hosts]
    cell = build_matrix(jobs).cell(f"{ISO}[gp0]", "intel-sapphirerapids-sim")
    assert cell.text == "xpass 1/4"
    jobs.append(job("h-fail", "isolation", SPR, [t(f"{ISO}[gp0]", "failed", "boom")]))
    assert build_matrix(jobs).cell(f"{ISO}[gp0]", "intel-sapphirerapids-sim").text == "fail 1/5"
    jobs.append(job("h-err", "isolation", SPR, [t(f"{ISO}[gp0]", "error", "setup")]))
    assert build_matrix(jobs).cell(f"{ISO}[gp0]", "intel-sapphirerapids-sim").text == "error 1/6"
    only_skip = build_matrix([jobs[0], jobs[1]]).cell(f"{ISO}[gp0]", "intel-sapphirerapids-sim")
    assert only_skip.text == "pass 1/2"


def test_matrix_suite_filter_and_renderings():
    jobs = make_jobs()
    m = build_matrix(jobs, suite="counters")
    assert m.suites == ["counters"] and all(r.suite == "counters" for r in m.rows)
    assert "unknown-unknown" not in [c.key for c in m.columns]  # that host only ran isolation
    full = build_matrix(jobs)
    md = render_matrix(full, "md")
    assert "## isolation" in md and "## counters" in md
    assert "**fail 1/2**" in md and "xfail(SRF7) 1/1" in md and "Sapphire Rapids (sim)" in md
    data = json.loads(render_matrix(full, "json"))
    assert data["order"] == ["infra", "timeout", "error", "fail", "xpass", "xfail", "pass", "skip"]
    row = next(r for r in data["rows"] if r["nodeid"] == f"{ISO}[fixed0]")
    assert row["cells"]["intel-sapphirerapids-sim"]["counts"] == {"passed": 1, "failed": 1}
    csv_text = render_matrix(full, "csv")
    assert csv_text.splitlines()[0].startswith("suite,test,nodeid,")
    with pytest.raises(ValueError):
        render_matrix(full, "pdf")


# ------------------------------------------------------------------ KCIDB

PATH_RE = re.compile(r"^([a-zA-Z0-9_-]+(\.[a-zA-Z0-9_-]+)*)?$")


def test_kcidb_validates_and_maps_statuses(reports):
    out, _, jobs = reports
    data = json.loads((out / "kcidb.json").read_text())
    validate_kcidb(data)
    from kcidb_io.schema import LATEST
    assert data["version"] == {"major": LATEST.major, "minor": LATEST.minor} and LATEST.major == 5
    (co,) = data["checkouts"]
    assert co["id"] == f"pmufarm:{RUN_ID}" and co["origin"] == "pmufarm"
    assert co["tree_name"] == "kvm-next" and co["git_commit_hash"] == RUN["kernel"]["commit"]
    assert co["patchset_hash"] == "ab" * 32
    for obj in data["builds"] + data["tests"]:
        assert obj["id"].startswith("pmufarm:") and obj["origin"] == "pmufarm"
    ids = [x["id"] for x in data["tests"]]
    assert len(ids) == len(set(ids))
    # Simulated hosts are left out by default: the real GNR host + the host that never answered.
    by = {(x["environment"]["misc"]["host"], x["path"]): x for x in data["tests"]}
    assert {h for h, _ in by} == {"farm-gnr-01", "farm-zen5-07"}
    assert by[("farm-zen5-07", "pmufarm.isolation")]["status"] == "MISS"
    p = "pmufarm.counters.test_arch_events.test_arch_event_counts.instructions"
    assert by[("farm-gnr-01", p)]["status"] == "PASS" and by[("farm-gnr-01", p)]["misc"]["outcome"] == "xpassed"
    gnr = by[("farm-gnr-01", "pmufarm.isolation.test_state.test_fresh_vm_state_is_zero.gp0")]
    assert "farm-gnr-01" in gnr["environment"]["comment"] and "06-AD" in gnr["environment"]["comment"]
    assert gnr["environment"]["misc"]["uarch"] == "graniterapids"
    assert all(PATH_RE.match(x["path"]) for x in data["tests"])


def test_kcidb_with_simulated_and_xfail_choice():
    data = build_kcidb(RUN, make_jobs(), include_simulated=True)
    validate_kcidb(data)
    tests = {(x["environment"]["misc"]["host"], x["path"]): x for x in data["tests"]}
    xf = tests[("sim-srf-0", "pmufarm.isolation.test_guest_host.test_guest_count_excludes_host.instructions")]
    assert xf["status"] == "DONE" and xf["misc"]["erratum"] == "SRF7" and "SRF7" in xf["comment"]
    assert tests[("sim-zen4-0", "pmufarm.isolation.test_guest_host.test_guest_count_excludes_host."
                  "instructions")]["status"] == "FAIL"
    assert tests[("sim-zen4-0", "pmufarm.counters.test_arch_events.test_arch_event_counts.cycles")]["status"] \
        == "ERROR"
    assert tests[("sim-spr-0", "pmufarm.isolation.test_unexposed.test_fast_rdpmc_gp")]["status"] == "SKIP"
    assert "(simulated)" in xf["environment"]["comment"] and xf["environment"]["misc"]["simulated"] is True
    # Build per booted kernel release.
    assert {b["misc"]["kernel_release"] for b in data["builds"]} == {"simulated", "7.0.0-rc3", "unknown"}


def test_kcidb_no_kernel_info_and_timeout():
    run = {**RUN, "kernel": {"tree": None, "commit": None, "patchset_hash": None}}
    j = job("farm-gnr-01", "counters", GNR, [t(f"{CNT}[cycles]", "passed")], status="timeout",
            log_tail="timeout after 600 s")
    data = build_kcidb(run, [j])
    validate_kcidb(data)
    (co,) = data["checkouts"]
    assert "git_commit_hash" not in co and "patchset_hash" not in co and "tree_name" not in co
    statuses = {x["path"]: x["status"] for x in data["tests"]}
    assert statuses == {"pmufarm.counters.test_arch_events.test_arch_event_counts.cycles": "PASS",
                        "pmufarm.counters": "ERROR"}


# ------------------------------------------------------------------ summary

def test_summary_verdict_failures_first(reports):
    out, _, _ = reports
    text = (out / "summary.md").read_text()
    lines = text.splitlines()
    assert lines[0] == f"# pmufarm run {RUN_ID}: FAIL"
    assert lines[2].startswith("**FAIL**: 2 failed, 1 error, 1 infra/timeout jobs")
    assert len(lines) <= 45
    fails = text.index("## Failures")
    assert fails < text.index("## Infra") < text.index("## Reports")
    first = lines[lines.index(next(ln for ln in lines if ln.startswith("## Failures"))) + 1]
    assert first.startswith("- FAIL ")
    assert "| Sapphire Rapids (sim) | 06-8F | 2 |" in text
    assert "farm-zen5-07 / isolation: infra_error (exit code 255)" in text
    for rel in ("junit/unknown.xml", "matrix.html", "kcidb.json", "matrix.md"):
        assert f"({rel})" in text


def test_summary_new_failures_first(tmp_path):
    jobs = make_jobs()
    base = baseline_from_jobs(jobs)
    # In the baseline the zen4 failure already existed, the SPR one did not.
    base[result_key("sim-spr-1", f"{ISO}[fixed0]")] = "passed"
    text = (write_reports(RUN, jobs, tmp_path, baseline=base)["summary.md"]).read_text()
    failure_lines = [ln for ln in text.splitlines() if ln.startswith("- ") and ("FAIL " in ln or "ERROR " in ln)]
    assert failure_lines[0].startswith("- **NEW** FAIL `isolation::test_state::test_fresh_vm_state_is_zero[fixed0]`")
    assert "1 new vs baseline" in text
    assert not any("NEW" in ln for ln in failure_lines[1:])


def test_summary_pass_and_infra_verdicts(tmp_path):
    ok = [j for j in make_jobs() if j["host"] == "farm-gnr-01"]
    assert f"run {RUN_ID}: PASS" in write_reports(RUN, ok, tmp_path / "a")["summary.md"].read_text()
    infra = ok + [job("farm-zen5-07", "isolation", {}, [], status="infra_error", log_tail="no route")]
    assert ": INFRA" in write_reports(RUN, infra, tmp_path / "b")["summary.md"].read_text().splitlines()[0]


def test_inputs_not_mutated():
    jobs = make_jobs()
    before = copy.deepcopy(jobs)
    build_matrix(jobs)
    build_kcidb(RUN, jobs, include_simulated=True)
    assert jobs == before


# ------------------------------------------------------------------ HTML in a real browser

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _chromium(args, tmp_path):
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless browser /usr/bin/chromium not installed "
                                             "(apt-get install -y chromium)")
def test_html_renders_in_chromium(reports, tmp_path):
    out, _, _ = reports
    html_path = out / "matrix.html"
    text = html_path.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text
    dom = _chromium(["--dump-dom", html_path.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    d = dom.stdout
    assert 'id="legend"' in d and "Legend" in d
    m = re.search(r'<tr data-test="suites/isolation/test_state.py::test_fresh_vm_state_is_zero\[fixed0\]">(.*?)</tr>',
                  d, re.S)
    assert m, "row for the failing test missing from the DOM"
    cell = re.search(r'<td class="cell fail sim" data-col="intel-sapphirerapids-sim" '
                     r'data-outcome="failed" title="([^"]*)">fail 1/2', m.group(1))
    assert cell, m.group(1)
    assert "sim-spr-1" in cell.group(1) and "failed 1/2" in cell.group(1)
    assert re.search(r'<th class="col sim" data-col="intel-sapphirerapids-sim" data-simulated="true"', d)
    assert re.search(r'<th class="col" data-col="intel-graniterapids" data-simulated="false"', d)
    assert 'class="cell xfail sim"' in d and ">SRF7<" in d
    png = tmp_path / "matrix.png"
    shot = _chromium([f"--screenshot={png}", "--window-size=1400,900", html_path.as_uri()], tmp_path)
    assert shot.returncode == 0 and png.exists() and png.stat().st_size > 10_000, shot.stderr[-2000:]
    keep = Path("/tmp/pmufarm-matrix.png")
    shutil.copy(png, keep)  # for a human look


# ------------------------------------------------------------------ not tested here

def test_not_tested_when_only_harness_tests_ran(tmp_path):
    """A host without the mediated vPMU passes only the harness self-test: NOT TESTED, never PASS."""
    from orchestrator.reports.naming import not_tested_reason
    from orchestrator.reports.summary import verdict
    from orchestrator.runner import EXIT_NOT_TESTED, EXIT_OK, job_exit_code

    no_pmu = facts("amd", "zen5", "Zen 5", 0x1A, 0x11, simulated=False, mediated=False)
    selftest = {**t("suites/isolation/test_selftest.py::test_selftest_no_guest_exceptions", "passed"), "subject": 0}
    skipped = [t(f"{ISO}[gp{i}]", "skipped", "requires mediated_pmu=True: host has mediated_pmu=False")
               for i in range(3)]
    untested = job("h1", "isolation", no_pmu, [selftest, *skipped])
    assert not_tested_reason(untested) == "mediated vPMU unavailable: kvm_intel.enable_mediated_pmu=N"
    assert verdict([untested])[0] == "NOT TESTED" and job_exit_code([untested]) == EXIT_NOT_TESTED
    # One subject test that ran (even an xfail) makes it tested; a stored subject of None counts as subject.
    ran = job("h2", "isolation", SPR, [selftest, {**t(f"{ISO}[gp9]", "xfailed", XFAIL_MSG), "subject": None}])
    assert not_tested_reason(ran) is None
    assert verdict([untested, ran])[0] == "PASS" and job_exit_code([untested, ran]) == EXIT_OK
    # Infra and failures keep their precedence over "not tested".
    assert job_exit_code([untested, job("h3", "isolation", SPR, [t(ISO, "failed", FAIL_MSG)])]) == 1
    out = tmp_path / "r"
    write_reports(RUN, [untested, ran], out)
    summary = (out / "summary.md").read_text()
    assert "## Not tested here (1 job)" in summary and "h1 / isolation: mediated vPMU unavailable" in summary
    xml = "".join(p.read_text() for p in (out / "junit").glob("*.xml"))
    assert '<property name="tested" value="false"' in xml and '<property name="tested" value="true"' in xml
    # With facts that say mediated is available, the reason is the commonest skip reason.
    avail = job("h4", "isolation", SPR, [selftest, t(UNEXP, "skipped", SKIP_MSG)])
    assert not_tested_reason(avail) == SKIP_MSG


def test_junit_failure_body_has_assertion_and_traceback(tmp_path):
    tb = ('def test_x(probe):\n>       assert obs["count"] == 1000\nE       AssertionError: count 1007 != 1000\n\n'
          'suites/isolation/test_state.py:42: AssertionError')
    failed = {**t(ISO, "failed", "AssertionError: count 1007 != 1000"), "details": tb}
    write_reports(RUN, [job("h1", "isolation", SPR, [failed])], tmp_path)
    (case,) = list(next(iter(JUnitXml.fromfile(str(tmp_path / "junit" / "intel-sapphirerapids-06-8f-sim.xml")))))
    (f,) = case.result
    assert isinstance(f, Failure) and f.message == "AssertionError: count 1007 != 1000"
    assert "suites/isolation/test_state.py:42" in f.text and '>       assert obs["count"] == 1000' in f.text


# A farm of twelve microarchitectures, as a maintainer would look at it.
FARM = [("intel", "icelakex", "Ice Lake-SP", 6, 0x6A, ()), ("intel", "sapphirerapids", "Sapphire Rapids", 6, 0x8F, ()),
        ("intel", "emeraldrapids", "Emerald Rapids", 6, 0xCF, ()),
        ("intel", "graniterapids", "Granite Rapids", 6, 0xAD, ()),
        ("intel", "sierraforest", "Sierra Forest", 6, 0xAF, ("SRF7",)),
        ("intel", "clearwaterforest", "Clearwater Forest", 6, 0xDD, ("SRF7",)),
        ("intel", "alderlake", "Alder Lake", 6, 0x97, ()), ("intel", "raptorlake", "Raptor Lake", 6, 0xB7, ()),
        ("amd", "zen2", "Zen 2", 0x17, 0x31, ("AMD-VMRUN-BRANCH",)),
        ("amd", "zen3", "Zen 3", 0x19, 0x01, ("AMD-VMRUN-BRANCH",)),
        ("amd", "zen4", "Zen 4", 0x19, 0x11, ("AMD-VMRUN-BRANCH",)),
        ("amd", "zen5", "Zen 5", 0x1A, 0x02, ("AMD-VMRUN-BRANCH",))]


def farm_jobs():
    jobs = []
    for i, (vendor, uarch, name, fam, model, errata) in reversed(list(enumerate(FARM))):  # input order must not matter
        mediated = uarch not in ("alderlake", "raptorlake", "zen2", "zen3")
        f = facts(vendor, uarch, name, fam, model, errata=errata, mediated=mediated)
        tests = [t(f"{ISO}[{p}]", "passed" if mediated else "skipped",
                   "" if mediated else "requires mediated_pmu=True: host has mediated_pmu=False")
                 for p in ("gp_counters", "gp_selectors", "fixed_counters", "fixed_ctrl", "global_status")]
        tests.append({**t("suites/isolation/test_selftest.py::test_selftest_no_guest_exceptions", "passed"),
                      "subject": 0})
        if errata and mediated:
            tests.append(t(f"{GH}[instructions]", "xfailed", f"{errata[0]}: instructions +4 within bound"))
        tests.append(t("suites/isolation/test_guest_host.py::test_exclusivity[vcpu-refused-while-include_guest-event]",
                       "passed" if mediated else "skipped"))
        if uarch == "graniterapids":
            tests.append(t(UNEXP, "failed", FAIL_MSG))
        jobs.append(job(f"h{i}-{uarch}", "isolation", f, tests))
    return jobs


def test_matrix_columns_by_vendor_and_generation_with_verdicts():
    m = build_matrix(farm_jobs())
    assert [c.uarch for c in m.columns] == [u for _, u, *_ in FARM]  # inventory/microarch.yaml order
    by = {c.uarch: c for c in m.columns}
    assert by["graniterapids"].verdict == "FAIL" and by["sapphirerapids"].verdict == "PASS"
    assert by["zen3"].verdict == "NOT TESTED" and by["zen3"].mediated_text == "unavailable"
    assert by["sierraforest"].errata == {"SRF7"} and "1 xfail" in by["sierraforest"].results
    md = render_matrix(m, "md")
    assert "## Per column" in md and "| **verdict** |" in md and "NOT TESTED" in md
    # summary.md lists the microarchitectures in the same order as the matrix columns.
    from orchestrator.reports import render_summary

    summary = render_summary(RUN, farm_jobs())
    labels = [line.split("|")[1].strip() for line in summary.splitlines()
              if line.startswith("| ") and not line.startswith("| microarchitecture")]
    assert labels == [c.label for c in m.columns]


@pytest.mark.skipif(CHROMIUM is None, reason="headless browser /usr/bin/chromium not installed "
                                             "(apt-get install -y chromium)")
def test_matrix_readable_at_1400px(tmp_path):
    """Twelve columns fit a 1400 px window; the verdict block and vendor groups render; screenshot kept."""
    html_text = render_matrix(build_matrix(farm_jobs()), "html")
    # The report has no script; a copy measures the layout in the browser and writes it into the DOM.
    probe = ("<script>window.onload=function(){var t=document.getElementById('matrix').getBoundingClientRect();"
             "document.body.setAttribute('data-right',Math.ceil(t.right));"
             "document.body.setAttribute('data-vw',document.documentElement.clientWidth);};</script>")
    (tmp_path / "m.html").write_text(html_text.replace("</body>", probe + "</body>"))
    dom = _chromium(["--window-size=1400,900", "--dump-dom", (tmp_path / "m.html").as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    right = int(re.search(r'data-right="(\d+)"', dom.stdout).group(1))
    viewport = int(re.search(r'data-vw="(\d+)"', dom.stdout).group(1))  # 1400 less a scrollbar
    assert right <= viewport, f"the matrix ends at {right} px, the window at {viewport}: columns off screen"
    assert re.search(r'<th class="vendor v-intel" colspan="8"', dom.stdout)
    assert re.search(r'<th class="vendor v-amd" colspan="4"', dom.stdout)
    assert dom.stdout.count('<tr class="verdict"') == 4
    (tmp_path / "matrix.html").write_text(html_text)
    png = tmp_path / "matrix.png"
    shot = _chromium([f"--screenshot={png}", "--window-size=1400,900", (tmp_path / "matrix.html").as_uri()], tmp_path)
    assert shot.returncode == 0 and png.exists() and png.stat().st_size > 10_000, shot.stderr[-2000:]
    shutil.copy(png, Path("/tmp/pmufarm-matrix-farm.png"))  # for a human look


def test_kcidb_schema_version_cached_per_kcidb_io_version(tmp_path, monkeypatch):
    """The version written into kcidb.json is the installed kcidb-io's, cached so a run skips its import."""
    from kcidb_io.schema import LATEST

    from orchestrator.reports.kcidb import schema_version

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert schema_version() == (LATEST.major, LATEST.minor)
    cached = json.loads((tmp_path / "pmufarm" / "kcidb-schema.json").read_text())
    assert list(cached.values()) == [[LATEST.major, LATEST.minor]]
    assert schema_version() == (LATEST.major, LATEST.minor)
