"""Inventory loading and host selection: bad input is one line naming the file, host and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.inventory import InventoryError, load_inventory, parse_select, select_hosts
from tests.conftest import ROOT, run_cli


def write(tmp_path: Path, text: str, name: str = "farm.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_local_inventory_loads() -> None:
    hosts = load_inventory(ROOT / "inventory" / "local.yaml")
    assert [h.name for h in hosts] == ["local"]
    assert hosts[0].driver == "kvm" and hosts[0].address == "local"


def test_missing_field_names_file_host_field(tmp_path: Path) -> None:
    p = write(tmp_path, "hosts:\n  - name: sim1\n    driver: model\n    model: {errata: []}\n")
    with pytest.raises(InventoryError) as exc:
        load_inventory(p)
    assert str(exc.value) == f"{p}: host 'sim1': field 'model.uarch': required field is missing"


def test_wrong_value_and_unknown_field(tmp_path: Path) -> None:
    p = write(tmp_path, "- name: a\n  driver: qemu\n")
    with pytest.raises(InventoryError, match=r"farm.yaml: host 'a': field 'driver': Input should be 'kvm'"):
        load_inventory(p)
    p = write(tmp_path, "- name: a\n  adress: x\n")
    with pytest.raises(InventoryError, match=r"host 'a': field 'adress': unknown field"):
        load_inventory(p)


def test_nameless_host_is_numbered(tmp_path: Path) -> None:
    p = write(tmp_path, "- name: a\n- address: b\n")
    with pytest.raises(InventoryError, match=r"host #2: field 'name': required field is missing"):
        load_inventory(p)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    p = write(tmp_path, "hosts:\n  - name: a\n    labels: {x: 1\n")
    with pytest.raises(InventoryError) as exc:
        load_inventory(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:") and "YAML syntax error" in msg and "\n" not in msg


def test_duplicate_host_across_files(tmp_path: Path) -> None:
    write(tmp_path, "- name: a\n", "one.yaml")
    write(tmp_path, "- name: a\n", "two.yaml")
    with pytest.raises(InventoryError, match=r"two.yaml: host 'a': field 'name': duplicate \(also in .*one.yaml\)"):
        load_inventory(tmp_path)


def test_unknown_host_selection(tmp_path: Path) -> None:
    hosts = load_inventory(write(tmp_path, "- name: a\n- name: b\n"))
    with pytest.raises(InventoryError, match=r"--hosts: unknown host 'zeta' \(inventory has: a, b\)"):
        select_hosts(hosts, "a,zeta", {})
    assert [h.name for h in select_hosts(hosts, "b", {})] == ["b"]


def test_select_by_label_and_fact(tmp_path: Path) -> None:
    hosts = load_inventory(write(tmp_path, "- name: a\n  labels: {rack: r1}\n- name: b\n  labels: {rack: r2}\n"))
    assert [h.name for h in select_hosts(hosts, None, parse_select(["rack=r2"]))] == ["b"]
    facts = {"a": {"vendor": "intel", "mediated_pmu": True}, "b": {"vendor": "amd", "mediated_pmu": False}}
    chosen = select_hosts(hosts, None, parse_select(["vendor=amd"]), facts_for=lambda hs: facts)
    assert [h.name for h in chosen] == ["b"]
    chosen = select_hosts(hosts, None, parse_select(["mediated_pmu=true"]), facts_for=lambda hs: facts)
    assert [h.name for h in chosen] == ["a"]
    with pytest.raises(InventoryError, match="expected key=value"):
        parse_select(["vendor"])


@pytest.mark.parametrize("text, needle", [
    ("- name: a\n  driver: model\n", "host 'a': field 'model': required field is missing"),
    ("- name: a\n  labels: {x: 1\n", "YAML syntax error"),
])
def test_cli_bad_inventory_is_one_line_exit_2(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    r = run_cli("--state-dir", str(tmp_path / "st"), "submit", "suites/isolation", "--inventory", str(p))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and str(p) in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_cli_unknown_host_exit_2(tmp_path: Path) -> None:
    r = run_cli("--state-dir", str(tmp_path / "st"), "submit", "suites/isolation", "--hosts", "nosuch")
    assert r.returncode == 2 and "unknown host 'nosuch'" in r.stderr and "Traceback" not in r.stderr


def _nothing_charged(state: Path) -> bool:
    """No run, no job, no host state written: a user's mistake is never charged to a host."""
    import sqlite3

    db = state / "pmufarm.sqlite"
    if not db.exists():
        return True
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT (SELECT COUNT(*) FROM jobs) + (SELECT COUNT(*) FROM hosts)").fetchone() == (0,)


@pytest.mark.parametrize("text, needle", [
    ("- {name: a, driver: model, model: {uarch: nosuchcore}}\n", "field 'model.uarch': unknown id 'nosuchcore'"),
    ("- {name: a, driver: model, model: {uarch: zen4, faults: [nosuchfault]}}\n",
     "field 'model.faults': unknown id 'nosuchfault'"),
    ("- {name: a, driver: nosuchdriver}\n", "field 'driver'"),
])
def test_cli_unknown_model_ids_rejected_at_load(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    r = run_cli("--state-dir", str(tmp_path / "st"), "submit", "suites/isolation", "--inventory", str(p))
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert _nothing_charged(tmp_path / "st")


def test_cli_binary_inventory_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "farm.yaml"
    p.write_bytes(bytes(range(256)) * 4)
    r = run_cli("--state-dir", str(tmp_path / "st"), "submit", "suites/isolation", "--inventory", str(p))
    assert r.returncode == 2 and "not UTF-8 text" in r.stderr and str(p) in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--timeout", "0"], "'--timeout': 0 is not a positive"),
    (["--timeout", "-1"], "'--timeout': -1 is not a positive"),
    (["--timeout", "nan"], "'--timeout': nan is not a positive"),
    (["--expires", "-5"], "'--expires': -5 is not a positive"),
    (["--hosts", ""], "--hosts '': names no host"),
    (["--hosts", " , "], "names no host"),
])
def test_cli_bad_options_refused_before_any_job(tmp_path: Path, args: list[str], needle: str) -> None:
    r = run_cli("--state-dir", str(tmp_path / "st"), "submit", "suites/smoke", "--inventory",
                str(ROOT / "inventory" / "sim.yaml"), *args,
                env={"PMUFARM_TREE": str(ROOT / "tests" / "data" / "tree")})
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _nothing_charged(tmp_path / "st")


def test_cli_empty_suite_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "suites" / "empty").mkdir(parents=True)
    (tree / "suites" / "empty" / "conftest.py").write_text("")
    r = run_cli("--state-dir", str(tmp_path / "st"), "submit", "suites/empty", env={"PMUFARM_TREE": str(tree)})
    assert r.returncode == 2 and "no test files" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _nothing_charged(tmp_path / "st")


def test_cpuid_dump_size_capped(tmp_path: Path) -> None:
    import subprocess
    import sys

    dump = tmp_path / "huge.txt"
    with open(dump, "wb") as fh:
        fh.truncate(200 << 20)  # sparse: 200 MB that costs no disk
    r = subprocess.run([sys.executable, "-m", "agent.cli", "probe", "--cpuid-dump", str(dump)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "is not a CPUID dump" in r.stderr and "Traceback" not in r.stderr, r.stderr
