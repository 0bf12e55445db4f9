"""The inventory tables: ``inventory/microarch.yaml`` and ``inventory/errata.yaml`` (contracts §7).

Microarch rows match on ``vendor``, ``family`` and ``models`` / ``model_ranges`` (inclusive), plus
an optional ``steppings`` list (Skylake-SP vs Cascade Lake share model 0x55).

Errata rows match on ``vendor``, ``family``, ``models`` (``null`` = every model of the family),
``steppings`` (``null`` = all) and ``microcode`` (``null`` = every revision; otherwise the revision
that fixes it: a host is affected when its microcode is older or unknown). One erratum id may have
several rows (e.g. SRF7: instructions+branches on some models, instructions only on others);
for a given CPU at most one row per id applies.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml

from .decode import empty_pmu
from .vendors import AMD, INTEL, VENDORS, intel_events_mask

SYMPTOM_CLASSES = (
    "insn_overcount_on_vm_transition",
    "branch_overcount_on_vm_transition",
    "vmrun_counted_as_branch",
    "global_ctrl_cleared_on_vm_exit",
    "ht_counter_corruption",
    "min_sample_period",
)


def inventory_dir() -> Path:
    """``$PMUFARM_INVENTORY`` if set, else the repository's ``inventory/``."""
    env = os.environ.get("PMUFARM_INVENTORY")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "inventory"


def _load(name: str) -> list[dict[str, Any]]:
    path = inventory_dir() / name
    with path.open(encoding="utf-8") as fh:
        rows = yaml.safe_load(fh) or []
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of mappings")
    return rows


@functools.cache
def load_microarch() -> list[dict[str, Any]]:
    rows = _load("microarch.yaml")
    for row in rows:
        missing = {"id", "name", "vendor", "family", "hybrid", "pmu", "mediated_possible"} - row.keys()
        if missing or not ({"models", "model_ranges"} & row.keys()):
            raise ValueError(f"microarch.yaml row {row.get('id')!r} lacks {sorted(missing) or 'models'}")
    return rows


@functools.cache
def load_errata() -> list[dict[str, Any]]:
    rows = _load("errata.yaml")
    for row in rows:
        missing = {"id", "vendor", "family", "models", "symptoms", "events", "description", "source"} - row.keys()
        if missing:
            raise ValueError(f"errata.yaml row {row.get('id')!r} lacks {sorted(missing)}")
        unknown = set(row["symptoms"]) - set(SYMPTOM_CLASSES)
        if unknown:
            raise ValueError(f"errata.yaml row {row['id']!r}: unknown symptom classes {sorted(unknown)}")
    return rows


KVM_FIELDS = {"id", "since", "detect", "source", "version_clamp", "max_gp_counters", "min_gp_counters",
              "max_fixed_counters", "status_set_min_version", "global_ctrl_passthrough", "rdpmc_passthrough",
              "emulated_insns_counted", "guest_pebs_lbr", "amd_host_guest_only"}
KVM_DETECTORS = ("kvm_fixed_counters_gt_3",)


@functools.cache
def load_kvm() -> list[dict[str, Any]]:
    """``inventory/kvm.yaml``: KVM's mediated-vPMU behaviour per kernel, oldest first."""
    rows = _load("kvm.yaml")
    for row in rows:
        missing = KVM_FIELDS - row.keys()
        if missing:
            raise ValueError(f"kvm.yaml row {row.get('id')!r} lacks {sorted(missing)}")
        if row["detect"] is not None and row["detect"] not in KVM_DETECTORS:
            raise ValueError(f"kvm.yaml row {row['id']!r}: unknown detect {row['detect']!r}")
    return rows


def _release_tuple(release: str | None) -> tuple[int, int] | None:
    parts = (release or "").split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return None


def first_mediated_release() -> str:
    return str(load_kvm()[0]["since"])


def kvm_behaviour(release: str | None, supported_pmu: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kvm.yaml row for a kernel ``release`` (``uname -r``; unknown or unparsable = the newest
    released row) and KVM's supported PMU (a ``detect`` row wins when its evidence is there)."""
    rows = load_kvm()
    sup = supported_pmu or {}
    for row in reversed(rows):
        if row["detect"] == "kvm_fixed_counters_gt_3" and (sup.get("fixed_counters") or 0) > 3:
            return row
    released = [r for r in rows if r["since"] is not None]
    have = _release_tuple(release)
    if have is None:
        return released[-1]
    fits = [r for r in released if _release_tuple(str(r["since"])) <= have]
    return fits[-1] if fits else released[0]


def row_models(row: dict[str, Any]) -> set[int]:
    """Every display model a microarch row covers."""
    models = set(row.get("models") or [])
    for lo, hi in row.get("model_ranges") or []:
        models.update(range(lo, hi + 1))
    return models


def lookup_uarch(vendor: str | None, family: int | None, model: int | None,
                 stepping: int | None = None) -> dict[str, Any] | None:
    """The microarch row for this CPU, or ``None`` (unknown model, or ambiguous without stepping)."""
    if vendor is None or family is None or model is None:
        return None
    hits = [r for r in load_microarch()
            if r["vendor"] == vendor and r["family"] == family and model in row_models(r)]
    if stepping is not None:
        hits = [r for r in hits if r.get("steppings") is None or stepping in r["steppings"]]
    return hits[0] if len(hits) == 1 else None


def uarch_by_id(uarch: str) -> dict[str, Any] | None:
    return next((r for r in load_microarch() if r["id"] == uarch), None)


def _microcode_int(value: str | int | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        return None


def match_errata(vendor: str | None, family: int | None, model: int | None,
                 stepping: int | None = None, microcode: str | int | None = None) -> list[dict[str, Any]]:
    """Errata that apply to this CPU: ``[{"id", "symptoms", "events", "description", "source"}]``."""
    out: dict[str, dict[str, Any]] = {}
    host_ucode = _microcode_int(microcode)
    for row in load_errata():
        if row["vendor"] != vendor or row["family"] != family:
            continue
        if row["models"] is not None and model not in row["models"]:
            continue
        if row.get("steppings") is not None and stepping not in row["steppings"]:
            continue
        fixed_in = _microcode_int(row.get("microcode"))
        if fixed_in is not None and host_ucode is not None and host_ucode >= fixed_in:
            continue
        out.setdefault(row["id"], {
            "id": row["id"],
            "symptoms": list(row["symptoms"]),
            "events": list(row["events"]),
            "description": row["description"],
            "source": row["source"],
        })
    return list(out.values())


def facts_from_row(row: dict[str, Any], model: int | None = None,
                   stepping: int | None = None) -> dict[str, Any]:
    """``{"cpu", "pmu"}`` for a CPU of this microarch row, in exactly the live-facts schema.

    ``model`` defaults to the row's first model; ``stepping`` to the row's first stepping (or
    ``None``). ``perf_capabilities`` is ``None`` (the row knows FW_WRITE, not the whole MSR).
    """
    vendor = VENDORS[row["vendor"]]
    if model is None:
        model = min(row_models(row))
    if stepping is None and row.get("steppings"):
        stepping = row["steppings"][0]
    p = row["pmu"]
    pmu = empty_pmu()
    if vendor is INTEL:
        nfixed = p["fixed_counters"]
        pmu.update(
            version=p["version"], gp_counters=p["gp_counters"], gp_width=p["gp_width"],
            fixed_counters=nfixed, fixed_width=p["fixed_width"],
            arch_events=list(p["arch_events"]), arch_events_mask=intel_events_mask(p["arch_events"]),
            fixed_counters_mask=p.get("fixed_counters_mask", (1 << nfixed) - 1),
            pdcm=True, perf_capabilities=None, full_width_writes=p["full_width_writes"],
            perfctr_core=False, perfmon_v2=False, amd_core_counters=0,
        )
    else:
        pmu.update(
            version=p["version"], gp_counters=p["gp_counters"], gp_width=p["gp_width"],
            fixed_counters=0, fixed_width=0,
            arch_events=[e.name for e in AMD.arch_events], arch_events_mask=None, fixed_counters_mask=0,
            pdcm=False, perf_capabilities=None, full_width_writes=None,
            perfctr_core=p.get("perfctr_core", True), perfmon_v2=p["perfmon_v2"],
            amd_core_counters=p["gp_counters"],
        )
    cpu = {
        "vendor": vendor.name,
        "vendor_id": vendor.vendor_id,
        "family": row["family"],
        "model": model,
        "stepping": stepping,
        "microcode": None,
        "model_name": row["name"],
        "uarch": row["id"],
        "uarch_name": row["name"],
        "hybrid": row["hybrid"],
        "hypervisor": False,
    }
    return {"cpu": cpu, "pmu": pmu}


__all__ = ["SYMPTOM_CLASSES", "facts_from_row", "first_mediated_release", "inventory_dir", "kvm_behaviour",
           "load_errata", "load_kvm", "load_microarch", "lookup_uarch", "match_errata", "row_models", "uarch_by_id"]
