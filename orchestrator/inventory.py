"""Inventory: load and validate ``inventory/*.yaml`` host lists; select hosts by name, label or fact."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
TABLE_FILES = {"microarch.yaml", "errata.yaml", "faults.yaml", "kvm.yaml"}
MAX_INVENTORY_BYTES = 4 << 20  # a host list, not a data set: anything bigger is a wrong file


class InventoryError(ValueError):
    """One line naming the file, the host and the field."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uarch: str
    errata: list[str] | None = None
    faults: list[str] = Field(default_factory=list)
    stepping: int | None = None


class EmulatedSpec(BaseModel):
    """``driver: emulated``: the real harness with the PMU emulated in the VMM (agent/drivers/emulated.py)."""
    model_config = ConfigDict(extra="forbid")
    layout: str
    errata: list[str] | None = None
    faults: list[str] = Field(default_factory=list)


class Host(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    address: str = "local"
    user: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    labels: dict[str, str] = Field(default_factory=dict)
    driver: Literal["kvm", "model", "emulated"] = "kvm"
    model: ModelSpec | None = None
    emulated: EmulatedSpec | None = None
    provision: Literal["none", "kexec", "reboot"] = "none"
    cpu: dict[str, Any] | None = None
    # upstream suites (agent/upstream.py): a kernel tree for suites/kselftest_kvm, a kvm-unit-tests checkout
    kernel_tree: str | None = None
    kvm_unit_tests: str | None = None
    source: str = Field(default="", exclude=True)

    def entry(self) -> dict[str, Any]:
        """The host entry the agent receives (contracts §3)."""
        return self.model_dump(exclude_none=True)


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(host)"


def tables_dir() -> Path:
    """Where the model tables live: ``$PMUFARM_INVENTORY`` (as the agent reads them), else the repo's inventory/."""
    env = os.environ.get("PMUFARM_INVENTORY")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "inventory"


def _table_ids(name: str) -> set[str] | None:
    """The ``id``s of a table (microarch.yaml, faults.yaml, errata.yaml); None when it cannot be read."""
    try:
        rows = yaml.safe_load((tables_dir() / name).read_text(encoding="utf-8")) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # no table here: the agent judges the entry when it runs
    return {str(r["id"]) for r in rows if isinstance(r, dict) and "id" in r} if isinstance(rows, list) else None


def _check_model(path: Path, label: str, model: ModelSpec) -> None:
    """A simulated host must name table entries that exist: caught at load (exit 2), never charged to the host."""
    checks = [("model.uarch", "microarch.yaml", [model.uarch]), ("model.faults", "faults.yaml", model.faults),
              ("model.errata", "errata.yaml", model.errata or [])]
    for field, table, values in checks:
        known = _table_ids(table) if values else None
        unknown = [v for v in values if known is not None and v not in known]
        if unknown:
            raise InventoryError(f"{path}: {label}: field '{field}': unknown id {unknown[0]!r} "
                                 f"(not in {tables_dir() / table})")


def load_file(path: Path) -> list[Host]:
    try:
        if path.stat().st_size > MAX_INVENTORY_BYTES:
            raise InventoryError(f"{path}: {path.stat().st_size} bytes is not a host list "
                                 f"(limit {MAX_INVENTORY_BYTES >> 20} MiB)")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InventoryError(f"{path}: not UTF-8 text (byte {exc.start}): is this an inventory file?") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InventoryError(f"{where}: YAML syntax error: {problem}") from None
    if isinstance(data, dict) and "hosts" in data:
        data = data["hosts"]
    if not isinstance(data, list):
        raise InventoryError(f"{path}: expected a list of hosts (or a mapping with 'hosts:'), got "
                             f"{type(data).__name__}")
    hosts = []
    for i, raw in enumerate(data, 1):
        label = f"host #{i}"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            label = f"host {raw['name']!r}"
        if not isinstance(raw, dict):
            raise InventoryError(f"{path}: {label}: expected a mapping, got {type(raw).__name__}")
        try:
            host = Host.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            msg = "required field is missing" if err["type"] == "missing" else err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            raise InventoryError(f"{path}: {label}: field '{_field_path(err['loc'])}': {msg}") from None
        if host.driver == "model" and host.model is None:
            raise InventoryError(f"{path}: {label}: field 'model': required field is missing for driver model")
        if host.model is not None:
            _check_model(path, label, host.model)
        if host.driver == "emulated" and host.emulated is None:
            raise InventoryError(f"{path}: {label}: field 'emulated': required field is missing for driver emulated")
        host.source = str(path)
        hosts.append(host)
    return hosts


TREE = Path(__file__).resolve().parent.parent  # the installed tree (holds inventory/ and suites/)


def load_inventory(path: str | Path) -> list[Host]:
    """A file, or a directory whose ``*.yaml`` host lists are all loaded (tables are skipped).

    A relative path missing from the current directory is looked up in the installed tree, so
    ``--inventory inventory/sim.yaml`` (and the default ``inventory/local.yaml``) work from any directory.
    """
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (TREE / p).exists():
        p = TREE / p
    if p.is_dir():
        files = sorted(f for f in p.glob("*.yaml") if f.name not in TABLE_FILES)
        if not files:
            raise InventoryError(f"{p}: no inventory files (*.yaml) in this directory")
    elif p.exists():
        files = [p]
    else:
        raise InventoryError(f"{p}: inventory not found")
    hosts: dict[str, Host] = {}
    for f in files:
        for h in load_file(f):
            if h.name in hosts:
                raise InventoryError(f"{f}: host {h.name!r}: field 'name': duplicate (also in {hosts[h.name].source})")
            hosts[h.name] = h
    if not hosts:
        raise InventoryError(f"{p}: the inventory lists no hosts")
    return list(hosts.values())


def parse_select(pairs: Iterable[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InventoryError(f"--select {pair!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def _matches(value: Any, wanted: str) -> bool:
    if isinstance(value, bool):
        return wanted.lower() in (("true", "1", "yes", "y") if value else ("false", "0", "no", "n"))
    if isinstance(value, list):
        return wanted in [str(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return value == int(wanted, 0)
        except ValueError:
            return False
    return str(value).lower() == wanted.lower()


def select_hosts(hosts: list[Host], names: str | None, select: dict[str, str],
                 facts_for: Callable[[list[Host]], dict[str, dict[str, Any]]] | None = None) -> list[Host]:
    """``--hosts a,b`` then ``--select k=v``: labels first, then probed (flattened) facts."""
    chosen = hosts
    if names is not None:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        if not wanted:  # `--hosts ''` (an unset shell variable) must not mean every host
            raise InventoryError(f"--hosts {names!r}: names no host")
        by_name = {h.name: h for h in hosts}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise InventoryError(f"--hosts: unknown host {unknown[0]!r} (inventory has: {', '.join(by_name)})")
        chosen = [by_name[n] for n in wanted]
    if not select:
        return chosen
    fact_keys = [k for k in select if not all(k in h.labels for h in chosen)]
    flat: dict[str, dict[str, Any]] = {}
    if fact_keys and facts_for is not None:
        flat = facts_for(chosen)
    result = []
    for h in chosen:
        ok = True
        for key, wanted_value in select.items():
            if key in h.labels:
                ok = _matches(h.labels[key], wanted_value)
            elif key in flat.get(h.name, {}):
                ok = _matches(flat[h.name][key], wanted_value)
            else:
                ok = False
            if not ok:
                break
        if ok:
            result.append(h)
    return result
