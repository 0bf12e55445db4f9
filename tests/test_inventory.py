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
    with pytest.raises(InventoryError, match=r"farm.yaml: host 'a': field 'driver': Input should be 'kvm' or 'model'"):
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
