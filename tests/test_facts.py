"""Host facts: CPUID decoding, dump parsing, the microarch/errata tables, the mediated verdict, and
what this very machine is.

CPUID register values are BUILT here from documented fields (Intel SDM Vol. 2A CPUID / Vol. 3B
leaf 0AH; AMD APM Vol. 3 CPUID 0x80000001, 0x80000022) by a small encoder, then decoded.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import facts as F
from agent.facts import tables
from agent.facts.decode import CPU_KEYS, PMU_KEYS, apply_perf_capabilities
from agent.facts.vendors import AMD_EVENTS, INTEL_ARCH_EVENTS, INTEL_FIXED_COUNTERS

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "cpuid"
INVENTORY = ROOT / "inventory"

# ------------------------------------------------------------------------------------------------
# the encoder: documented fields -> register values


def _sig(family: int, model: int, stepping: int) -> int:
    """CPUID.1:EAX for a display family/model/stepping."""
    base_family, ext_family = (0xF, family - 0xF) if family >= 0xF else (family, 0)
    return ext_family << 20 | (model >> 4) << 16 | base_family << 8 | (model & 0xF) << 4 | stepping


def _vendor_regs(vendor_id: str) -> tuple[int, int, int]:
    """(ebx, edx, ecx) of leaf 0 for a 12-character vendor string."""
    return struct.unpack("<3I", vendor_id.encode())


def _brand_regs(text: str) -> list[tuple[int, int, int, int]]:
    regs = struct.unpack("<12I", text.encode().ljust(48, b"\0"))
    return [regs[i:i + 4] for i in (0, 4, 8)]


def encode(*, vendor_id: str, family: int, model: int, stepping: int = 0, brand: str = "",
           version: int = 0, gp: int = 0, gp_width: int = 0, events: list[str] | None = None,
           fixed: int = 0, fixed_width: int = 0, fixed_mask: int = 0, pdcm: bool = False,
           hybrid: bool = False, hypervisor: bool = False, perfctr_core: bool = False,
           perfmon_v2: bool = False, amd_core: int = 0, max_ext: int | None = None) -> F.Leaves:
    """CPUID leaves for a CPU described by documented fields."""
    ebx0, edx0, ecx0 = _vendor_regs(vendor_id)
    leaves: F.Leaves = {(0, 0): (0x20, ebx0, ecx0, edx0)}
    ecx1 = (1 << 15 if pdcm else 0) | (1 << 31 if hypervisor else 0)
    leaves[(1, 0)] = (_sig(family, model, stepping), 0, ecx1, 0)
    leaves[(7, 0)] = (0, 0, 0, 1 << 15 if hybrid else 0)
    if vendor_id == "GenuineIntel":
        names = INTEL_ARCH_EVENTS if events is None else events
        length = max((INTEL_ARCH_EVENTS.index(n) + 1 for n in names), default=0)
        unavailable = sum(1 << i for i in range(length) if INTEL_ARCH_EVENTS[i] not in names)
        eax = length << 24 | gp_width << 16 | gp << 8 | version
        leaves[(0xA, 0)] = (eax, unavailable, fixed_mask, fixed_width << 5 | fixed)
    else:
        leaves[(0xA, 0)] = (0, 0, 0, 0)  # reserved on AMD
    if max_ext is None:
        max_ext = 0x80000022 if perfmon_v2 else 0x80000008
    leaves[(0x80000000, 0)] = (max_ext, ebx0, ecx0, edx0)
    leaves[(0x80000001, 0)] = (0, 0, 1 << 23 if perfctr_core else 0, 0)
    for i, regs in enumerate(_brand_regs(brand)):
        leaves[(0x80000002 + i, 0)] = regs
    if max_ext >= 0x80000022:
        leaves[(0x80000022, 0)] = (1 if perfmon_v2 else 0, amd_core & 0xF, 0, 0)
    return leaves


def intel(family: int, model: int, stepping: int = 0, **kw: Any) -> F.Leaves:
    kw.setdefault("pdcm", True)
    return encode(vendor_id="GenuineIntel", family=family, model=model, stepping=stepping, **kw)


def amd(family: int, model: int, stepping: int = 0, **kw: Any) -> F.Leaves:
    return encode(vendor_id="AuthenticAMD", family=family, model=model, stepping=stepping, **kw)


def leaves_from_facts(cpu: dict[str, Any], pmu: dict[str, Any]) -> F.Leaves:
    """The encoder driven by a facts dict (used to check facts_from_row against decode)."""
    if cpu["vendor"] == "intel":
        mask = pmu["fixed_counters_mask"] & ~((1 << pmu["fixed_counters"]) - 1)
        return intel(cpu["family"], cpu["model"], cpu["stepping"] or 0, version=pmu["version"],
                     gp=pmu["gp_counters"], gp_width=pmu["gp_width"], events=pmu["arch_events"],
                     fixed=pmu["fixed_counters"], fixed_width=pmu["fixed_width"], fixed_mask=mask,
                     hybrid=cpu["hybrid"])
    return amd(cpu["family"], cpu["model"], cpu["stepping"] or 0, perfctr_core=pmu["perfctr_core"],
               perfmon_v2=pmu["perfmon_v2"], amd_core=pmu["amd_core_counters"])


def qualifying_host(decoded: dict[str, Any], perf_capabilities: int | None = 0x33C5) -> dict[str, Any]:
    """Facts for a live host whose KVM side is all set (kvm present, enable_pmu=Y, module param Y)."""
    cpu, pmu = decoded["cpu"], dict(decoded["pmu"])
    if cpu["vendor"] == "intel":
        apply_perf_capabilities(pmu, perf_capabilities)
    module = {"intel": "kvm_intel", "amd": "kvm_amd"}[cpu["vendor"]]
    sup = dict(pmu)
    if cpu["vendor"] == "intel":
        sup["version"] = min(pmu["version"], 2)  # KVM's guest-visible clamp (vpmu.md §1.3)
    return {"schema": 1, "simulated": False, "source": "test", "cpu": cpu, "pmu": pmu,
            "kvm": {"present": True, "module": module, "vendor_modules": [module], "enable_pmu": True,
                    "enable_mediated_pmu": True, "ignore_msrs": False, "mediated_vcpu_errno": 0,
                    "supported_pmu": sup},
            "kernel": {"release": "7.0.0", "cmdline": "", "nmi_watchdog": 0, "perf_event_paranoid": 2}}


SPR_EVENTS = list(INTEL_ARCH_EVENTS[:8])
OLD_EVENTS = list(INTEL_ARCH_EVENTS[:7])

# name -> (leaves, uarch, expected pmu subset, hybrid, mediated available?)
CASES: dict[str, tuple[F.Leaves, str, dict[str, Any], bool, bool]] = {
    "sapphirerapids": (
        intel(6, 0x8F, 8, version=5, gp=8, gp_width=48, events=SPR_EVENTS, fixed=4, fixed_width=48,
              brand="Intel(R) Xeon(R) Platinum 8480+"),
        "sapphirerapids",
        {"version": 5, "gp_counters": 8, "gp_width": 48, "fixed_counters": 4, "fixed_width": 48,
         "arch_events_mask": 0xFF, "fixed_counters_mask": 0xF, "perfmon_v2": False},
        False, True),
    "graniterapids": (
        intel(6, 0xAD, 1, version=5, gp=8, gp_width=48, events=SPR_EVENTS, fixed=4, fixed_width=48),
        "graniterapids",
        {"version": 5, "gp_counters": 8, "fixed_counters": 4, "arch_events": SPR_EVENTS},
        False, True),
    "sierraforest": (
        intel(6, 0xAF, 3, version=5, gp=8, gp_width=48, events=OLD_EVENTS, fixed=3, fixed_width=48),
        "sierraforest",
        {"version": 5, "gp_counters": 8, "fixed_counters": 3, "fixed_counters_mask": 0x7,
         "arch_events_mask": 0x7F},
        False, True),
    "icelake-sp": (
        intel(6, 0x6A, 6, version=5, gp=8, gp_width=48, events=SPR_EVENTS, fixed=4, fixed_width=48),
        "icelakex",
        {"version": 5, "gp_counters": 8, "gp_width": 48, "fixed_counters": 4},
        False, True),
    "zen3": (
        amd(0x19, 0x01, 1, perfctr_core=True, max_ext=0x80000021),
        "zen3",
        {"version": 1, "gp_counters": 6, "gp_width": 48, "amd_core_counters": 6, "perfctr_core": True,
         "perfmon_v2": False, "fixed_counters": 0, "arch_events_mask": None},
        False, False),
    "zen4-19h-11h": (
        amd(0x19, 0x11, 1, perfctr_core=True, perfmon_v2=True, amd_core=6),
        "zen4",
        {"version": 2, "gp_counters": 6, "amd_core_counters": 6, "perfmon_v2": True,
         "arch_events": ["cycles", "instructions", "branches", "branch_misses"]},
        False, True),
    "zen5": (
        amd(0x1A, 0x44, 0, perfctr_core=True, perfmon_v2=True, amd_core=6),
        "zen5",
        {"version": 2, "gp_counters": 6, "perfmon_v2": True, "full_width_writes": None},
        False, True),
    "alderlake-hybrid": (
        intel(6, 0x97, 2, version=5, gp=8, gp_width=48, events=SPR_EVENTS, fixed=4, fixed_width=48,
              hybrid=True),
        "alderlake",
        {"version": 5, "gp_counters": 8},
        True, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_built_cpuid(name):
    leaves, uarch, pmu_expect, hybrid, available = CASES[name]
    d = F.decode_cpuid(leaves)
    assert tuple(d["cpu"]) == CPU_KEYS and tuple(d["pmu"]) == PMU_KEYS
    assert d["cpu"]["uarch"] == uarch
    assert d["cpu"]["uarch_name"] == F.uarch_by_id(uarch)["name"]
    assert d["cpu"]["hybrid"] is hybrid
    assert d["cpu"]["hypervisor"] is False
    for key, want in pmu_expect.items():
        assert d["pmu"][key] == want, key
    verdict = F.mediated_verdict(qualifying_host(d))
    assert verdict["status"] == ("available" if available else "unavailable"), verdict
    if not available:
        word = "hybrid" if hybrid else "PerfMonV2=0"
        assert any(word in r for r in verdict["reasons"]), verdict


def test_decode_signature_fields():
    d = F.decode_cpuid(intel(6, 0x8F, 8, version=5, gp=8, gp_width=48, fixed=4, fixed_width=48))
    assert (d["cpu"]["vendor"], d["cpu"]["vendor_id"]) == ("intel", "GenuineIntel")
    assert (d["cpu"]["family"], d["cpu"]["model"], d["cpu"]["stepping"]) == (6, 0x8F, 8)
    assert d["cpu"]["microcode"] is None  # not a CPUID fact
    dmr = F.decode_cpuid(intel(19, 0x01, 0, version=5, gp=8, gp_width=48, fixed=4, fixed_width=48))
    assert (dmr["cpu"]["family"], dmr["cpu"]["model"], dmr["cpu"]["uarch"]) == (19, 0x01, "diamondrapids")
    z = F.decode_cpuid(amd(0x1A, 0x02, 1, perfctr_core=True, perfmon_v2=True, amd_core=6,
                           brand="AMD EPYC 9B45 128-Core Processor"))
    assert (z["cpu"]["family"], z["cpu"]["model"], z["cpu"]["stepping"]) == (0x1A, 0x02, 1)
    assert z["cpu"]["model_name"] == "AMD EPYC 9B45 128-Core Processor"


def test_decode_arch_events_unavailable_bits_and_v5_fixed_bitmap():
    # CWF-like: FC0-2 contiguous plus FC4-6 from the v5 ECX bitmap; branches marked unavailable
    events = [e for e in OLD_EVENTS if e != "branches"]
    d = F.decode_cpuid(intel(6, 0xDD, 0, version=5, gp=8, gp_width=48, events=events, fixed=3,
                             fixed_width=48, fixed_mask=0x70))
    pmu = d["pmu"]
    assert d["cpu"]["uarch"] == "clearwaterforest"
    assert pmu["fixed_counters"] == 3 and pmu["fixed_counters_mask"] == 0x77
    assert "branches" not in pmu["arch_events"] and pmu["arch_events_mask"] == 0x7F & ~(1 << 5)
    # before v5 ECX is not a bitmap, before v2 EDX is not enumerated
    v4 = F.decode_cpuid(intel(6, 0x55, 4, version=4, gp=4, gp_width=48, fixed=3, fixed_width=48,
                              fixed_mask=0x70))
    assert v4["pmu"]["fixed_counters_mask"] == 0x7 and v4["cpu"]["uarch"] == "skylakex"
    v1 = F.decode_cpuid(intel(6, 0x0F, 0, version=1, gp=2, gp_width=40, fixed=3, fixed_width=40))
    assert (v1["pmu"]["fixed_counters"], v1["pmu"]["fixed_width"]) == (0, 0)
    assert v1["cpu"]["uarch"] is None


def test_full_width_writes_from_perf_capabilities():
    d = F.decode_cpuid(CASES["sapphirerapids"][0])
    assert d["pmu"]["pdcm"] is True and d["pmu"]["full_width_writes"] is None
    assert apply_perf_capabilities(dict(d["pmu"]), 0x33C5)["full_width_writes"] is True
    assert apply_perf_capabilities(dict(d["pmu"]), 0x13C5)["full_width_writes"] is False
    nopdcm = F.decode_cpuid(intel(6, 0x8F, 8, pdcm=False, version=5, gp=8, gp_width=48, fixed=4, fixed_width=48))
    assert nopdcm["pmu"]["full_width_writes"] is False


def test_intel_verdict_reasons_name_the_fact():
    spr = F.decode_cpuid(CASES["sapphirerapids"][0])
    facts = qualifying_host(spr, perf_capabilities=None)
    # finding 8: kvm_intel.enable_mediated_pmu=Y proves FW_WRITES (intel_pmu_is_mediated_pmu_supported)
    assert F.mediated_verdict(facts)["reasons"] == []
    assert F.flat_facts(facts)["full_width_writes"] is True
    facts["kvm"]["enable_mediated_pmu"] = False
    assert F.mediated_verdict(facts)["reasons"] == [
        "kvm_intel.enable_mediated_pmu=N",
        "IA32_PERF_CAPABILITIES (MSR 0x345) unreadable: full-width writes (bit 13) unknown"]
    assert F.flat_facts(facts)["full_width_writes"] is None
    facts = qualifying_host(spr, perf_capabilities=0x13C5)
    assert F.mediated_verdict(facts)["reasons"] == ["IA32_PERF_CAPABILITIES (MSR 0x345) bit 13 FW_WRITE=0"]
    hsw = F.decode_cpuid(intel(6, 0x3F, 2, version=3, gp=4, gp_width=48, fixed=3, fixed_width=48))
    assert hsw["cpu"]["uarch"] == "haswell"
    assert F.mediated_verdict(qualifying_host(hsw))["reasons"] == ["CPUID 0x0A EAX[7:0] PMU version=3 < 4"]


def test_kvm_verdict_reasons_name_the_fact():
    z4 = qualifying_host(F.decode_cpuid(CASES["zen4-19h-11h"][0]))
    assert F.mediated_verdict(z4) == {"status": "available", "reasons": [], "caveats": []}
    z4["kvm"].update(enable_pmu=False, module="kvm_pvm", vendor_modules=["kvm_pvm"], enable_mediated_pmu=None)
    z4["kvm"]["supported_pmu"] = dict(z4["kvm"]["supported_pmu"], perfmon_v2=False)
    assert F.mediated_verdict(z4)["reasons"] == [
        "kvm.enable_pmu=N",
        "no kvm_amd module: enable_mediated_pmu is not exposed (loaded vendor modules: kvm_pvm)",
        "KVM's supported CPUID 0x80000022 has no PerfMonV2",
    ]
    spr = qualifying_host(F.decode_cpuid(CASES["sapphirerapids"][0]))
    spr["kvm"]["enable_mediated_pmu"] = False
    assert F.mediated_verdict(spr)["reasons"] == ["kvm_intel.enable_mediated_pmu=N"]
    spr["kvm"]["enable_mediated_pmu"] = None
    spr["kernel"]["release"] = "6.12.0"
    assert F.mediated_verdict(spr)["reasons"] == [
        "kvm_intel.enable_mediated_pmu is not exposed (kernel 6.12.0; mediated vPMU needs Linux 7.0+)"]
    spr["kvm"] = {"present": False}
    assert F.mediated_verdict(spr)["reasons"] == ["/dev/kvm missing: KVM not present"]


def test_verdict_host_perf_events_block_and_ignore_msrs_is_a_caveat():
    """Finding 1: the NMI watchdog's perf event (no exclude_guest) makes KVM_CREATE_VCPU fail with EBUSY
    (x86.c kvm_arch_vcpu_precreate); finding 14: ignore_msrs=Y voids #GP checks but blocks nothing."""
    z4 = qualifying_host(F.decode_cpuid(CASES["zen4-19h-11h"][0]))
    z4["kernel"]["nmi_watchdog"] = 1
    v = F.mediated_verdict(z4)
    assert v["status"] == "unavailable" and len(v["reasons"]) == 1
    assert v["reasons"][0].startswith("kernel.nmi_watchdog=1: ") and "EBUSY" in v["reasons"][0]
    z4["kernel"]["nmi_watchdog"] = 0
    z4["kvm"]["mediated_vcpu_errno"] = 16
    assert F.mediated_verdict(z4)["reasons"] == [
        "KVM_CREATE_VCPU with an in-kernel irqchip failed with EBUSY: a host perf event without "
        "exclude_guest exists (system-wide perf events or the NMI watchdog)"]
    z4["kvm"]["mediated_vcpu_errno"] = 12
    assert F.mediated_verdict(z4)["reasons"] == [
        "KVM_CREATE_VCPU with an in-kernel irqchip failed: errno 12 (Cannot allocate memory)"]
    z4["kvm"].update(mediated_vcpu_errno=0, ignore_msrs=True)
    v = F.mediated_verdict(z4)
    assert v["status"] == "available" and v["caveats"][0].startswith("kvm.ignore_msrs=Y: ")
    assert F.flat_facts(z4)["ignore_msrs"] is True


def test_verdict_rules_header_is_generated_from_the_table():
    """The C verdict reads agent/facts/rules.py through a generated header; a stale header fails."""
    from agent.facts.rules import RULES, c_header

    header = ROOT / "agent" / "native" / "include" / "verdict_rules.h"
    assert header.read_text() == c_header(), \
        "stale header: run python -m agent.facts.rules > agent/native/include/verdict_rules.h"
    assert len({r.id for r in RULES}) == len(RULES) and all(r.source for r in RULES)


SYSROOTS = {
    "as-is": None,
    "kvm_amd-watchdog-ignore_msrs": {
        "sys/module/kvm/parameters/enable_pmu": "Y", "sys/module/kvm/parameters/ignore_msrs": "Y",
        "sys/module/kvm_amd/parameters/enable_mediated_pmu": "Y", "sys/module/kvm_pvm/": "",
        "proc/sys/kernel/nmi_watchdog": "1"},
    "kvm_intel-param-off": {
        "sys/module/kvm/parameters/enable_pmu": "N", "sys/module/kvm_intel/parameters/enable_mediated_pmu": "N",
        "proc/sys/kernel/nmi_watchdog": "0"},
    "no-vendor-module": {"sys/module/kvm/parameters/ignore_msrs": "N", "sys/module/kvm_pvm/": ""},
}


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm is not accessible")
@pytest.mark.parametrize("tree", sorted(SYSROOTS))
def test_c_and_python_verdicts_agree(tree, tmp_path):
    """`vpmu caps` and collect_facts() give the same reasons and caveats, in the same order, for this
    host and for crafted /sys/module + /proc/sys/kernel trees ($PMUFARM_SYSROOT)."""
    import subprocess

    from agent.drivers.kvm import NATIVE_DIR

    binary = NATIVE_DIR / "build" / "vpmu"
    proc = subprocess.run(["make", "-C", str(NATIVE_DIR)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and binary.exists(), proc.stderr
    env = dict(os.environ)
    env.pop("PMUFARM_SYSROOT", None)
    if SYSROOTS[tree] is not None:
        for rel, value in SYSROOTS[tree].items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith("/"):
                path.mkdir(exist_ok=True)
            else:
                path.write_text(value + "\n")
        env["PMUFARM_SYSROOT"] = str(tmp_path)
    out = subprocess.run([str(binary), "caps"], capture_output=True, text=True, timeout=60, env=env)
    c_verdict = json.loads(out.stdout)["mediated_pmu"]
    py = subprocess.run([sys.executable, "-c", "import json; from agent.facts import collect_facts; "
                         "print(json.dumps(collect_facts()['mediated_pmu']))"],
                        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert py.returncode == 0, py.stderr
    assert c_verdict == json.loads(py.stdout)
    if SYSROOTS[tree] and SYSROOTS[tree].get("proc/sys/kernel/nmi_watchdog") == "1":
        assert any(r.startswith("kernel.nmi_watchdog=1") for r in c_verdict["reasons"])
        assert c_verdict["caveats"] and c_verdict["caveats"][0].startswith("kvm.ignore_msrs=Y")


def test_amd_legacy_counters_without_cpuid_bits():
    bare = F.decode_cpuid(amd(0x10, 0x04, 2))  # K10: no PerfCtrExtCore, no PerfMonV2
    assert (bare["pmu"]["version"], bare["pmu"]["gp_counters"]) == (1, 4)
    hv = F.decode_cpuid(amd(0x1A, 0x02, 1, hypervisor=True, max_ext=0x80000021))
    assert hv["cpu"]["hypervisor"] is True and hv["cpu"]["uarch"] == "zen5"
    assert hv["pmu"]["gp_counters"] is None and hv["pmu"]["perfmon_v2"] is False  # CPUID cannot say


# ------------------------------------------------------------------------------------------------
# dumps


def test_plain_hex_dump_sapphire_rapids():
    d = F.decode_cpuid(F.parse_cpuid_dump((DATA / "sapphirerapids-plain-hex.txt").read_text(), "spr"))
    assert d["cpu"]["uarch"] == "sapphirerapids" and d["cpu"]["model_name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert (d["pmu"]["version"], d["pmu"]["gp_counters"], d["pmu"]["fixed_counters"]) == (5, 8, 4)


def test_plain_decimal_dump_zen4():
    d = F.decode_cpuid(F.parse_cpuid_dump((DATA / "zen4-genoa-plain-decimal.txt").read_text(), "z4"))
    assert (d["cpu"]["family"], d["cpu"]["model"], d["cpu"]["uarch"]) == (0x19, 0x11, "zen4")
    assert d["pmu"]["perfmon_v2"] is True and d["pmu"]["amd_core_counters"] == 6


def test_cpuid_r_dump_uses_first_cpu_only():
    text = (DATA / "graniterapids-cpuid-r.txt").read_text()
    assert text.count("CPU ") == 2
    leaves = F.parse_cpuid_dump(text, "gnr")  # CPU 1 repeats every leaf: would be duplicates
    d = F.decode_cpuid(leaves)
    assert (d["cpu"]["model"], d["cpu"]["uarch"]) == (0xAD, "graniterapids")


def test_cpuid_r_dump_of_this_machine():
    """`cpuid -r` output captured on the dev VM (AMD EPYC, family 0x1A model 0x02, under a hypervisor)."""
    d = F.decode_cpuid(F.parse_cpuid_dump((DATA / "zen5-epyc-fam1a-model02-vm-cpuid-r.txt").read_text(), "vm"))
    cpu, pmu = d["cpu"], d["pmu"]
    assert (cpu["vendor"], cpu["family"], cpu["model"], cpu["stepping"]) == ("amd", 0x1A, 0x02, 1)
    assert cpu["uarch"] == "zen5" and cpu["hypervisor"] is True
    assert pmu["perfctr_core"] is False and pmu["perfmon_v2"] is False


def test_cpuid_r_minus_1_header():
    text = "CPU:\n   0x00000000 0x00: eax=0x00000001 ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65\n"
    assert F.parse_cpuid_dump(text, "x") == {(0, 0): (1, 0x68747541, 0x444D4163, 0x69746E65)}


def test_collect_facts_from_dump_nulls_live_parts():
    path = DATA / "zen4-genoa-plain-decimal.txt"
    facts = F.collect_facts(path)
    assert facts["source"] == f"dump:{path}" and facts["simulated"] is False
    assert set(facts["kvm"].values()) == {None} and set(facts["kernel"].values()) == {None}
    assert facts["cpu"]["microcode"] is None
    assert facts["mediated_pmu"]["status"] == "unavailable"
    assert facts["mediated_pmu"]["reasons"] == ["KVM state unknown (facts not probed on a live host)"]
    assert [e["id"] for e in facts["errata"]] == ["AMD-VMRUN-BRANCH"]
    json.dumps(facts)


def test_format_round_trip():
    leaves = CASES["graniterapids"][0]
    assert F.parse_cpuid_dump(F.format_cpuid_dump(leaves, comment="gnr\nbuilt"), "rt") == leaves


@pytest.mark.parametrize("fname,lineno", [("malformed-line7.txt", 7), ("malformed-cpuid-r.txt", 4)])
def test_malformed_dump_files(fname, lineno):
    path = DATA / fname
    with pytest.raises(ValueError) as exc:
        F.parse_cpuid_dump(path.read_text(), str(path))
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{lineno}: expected 'leaf subleaf eax ebx ecx edx', got '")


@pytest.mark.parametrize("text,lineno,fragment", [
    ("# c\n0x1 0x0 0x1 0x2 0x3\n", 2, "(5 numbers)"),
    ("0x0a 0x00 07300805 0 0 0\n", 1, "'07300805' is not a 0x-hex or decimal number"),
    ("0 0 1 2 3 4\n\n0 0 1 2 3 4\n", 3, "duplicate leaf 0x0 subleaf 0x0"),
    ("0 0 0x100000000 0 0 0\n", 1, "eax does not fit in 32 bits"),
    ("   0x00000000 0x00: eax=0x1 ebx=0x2 ecx=0x3\n", 1, "not a 'cpuid -r' line"),
    ("# only comments\n", 0, "no CPUID leaves found"),
])
def test_malformed_dump_text(text, lineno, fragment):
    with pytest.raises(F.CpuidDumpError) as exc:
        F.parse_cpuid_dump(text, "dump.txt")
    msg = str(exc.value)
    assert msg.startswith(f"dump.txt:{lineno}: ") and fragment in msg and "\n" not in msg


def test_probe_main(capsys):
    assert F.probe_main(str(DATA / "sapphirerapids-plain-hex.txt"), True) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["cpu"]["uarch"] == "sapphirerapids" and out.count("\n") == 1
    bad = DATA / "malformed-line7.txt"
    assert F.probe_main(str(bad), False) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and f"{bad}:7:" in cap.err and "Traceback" not in cap.err
    assert F.probe_main(str(DATA / "no-such-dump.txt"), True) == 2
    assert "no-such-dump.txt:0: cannot read dump" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# tables


def _rows_with_source(path: Path) -> tuple[int, list[int]]:
    """(number of rows, line numbers of rows not preceded by a `# source:` comment block)."""
    lines = path.read_text().splitlines()
    rows, missing = 0, []
    for i, line in enumerate(lines):
        if not line.startswith("- id:"):
            continue
        rows += 1
        j, found = i - 1, False
        while j >= 0 and lines[j].startswith("#"):
            found = found or lines[j].startswith("# source:")
            j -= 1
        if not found:
            missing.append(i + 1)
    return rows, missing


@pytest.mark.parametrize("name", ["microarch.yaml", "errata.yaml"])
def test_every_row_has_a_source_comment(name):
    path = INVENTORY / name
    rows, missing = _rows_with_source(path)
    assert rows == len(yaml.safe_load(path.read_text())) > 0
    assert missing == [], f"{name}: rows without '# source:' comment at lines {missing}"


def _steppings(row: dict[str, Any]) -> set[int]:
    return set(row.get("steppings") or range(16))


def test_no_overlapping_model_ranges():
    rows = F.load_microarch()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    for i, a in enumerate(rows):
        for lo, hi in a.get("model_ranges") or []:
            assert lo <= hi, a["id"]
        for b in rows[i + 1:]:
            if (a["vendor"], a["family"]) != (b["vendor"], b["family"]):
                continue
            both = tables.row_models(a) & tables.row_models(b)
            assert not (both and _steppings(a) & _steppings(b)), (a["id"], b["id"], sorted(both))


def test_errata_rows_are_well_formed_and_do_not_overlap_per_id():
    rows = F.load_errata()
    events = set(INTEL_ARCH_EVENTS) | set(AMD_EVENTS)
    for r in rows:
        assert r["vendor"] in ("intel", "amd") and r["source"] and r["description"]
        assert set(r["symptoms"]) <= set(F.SYMPTOM_CLASSES) and r["symptoms"]
        assert set(r["events"]) <= events
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["id"] != b["id"] or a["family"] != b["family"]:
                continue
            assert a["models"] is not None and b["models"] is not None, a["id"]
            assert not set(a["models"]) & set(b["models"]), a["id"]


def test_required_table_coverage():
    want = {("intel", 6, m) for m in (0x55, 0x6A, 0x6C, 0x7D, 0x7E, 0x8F, 0xCF, 0xAD, 0xAE, 0xAF, 0xB6, 0xDD,
                                     0x97, 0x9A, 0xB7, 0xBA, 0xBF, 0xAA, 0xAC, 0xC5, 0xC6, 0xBD)}
    want |= {("intel", 19, 0x01)}
    for vendor, family, model in sorted(want):
        assert F.lookup_uarch(vendor, family, model, 5) is not None, hex(model)
    hybrid = {"alderlake", "raptorlake", "meteorlake", "arrowlake", "lunarlake"}
    for r in F.load_microarch():
        if r["id"] in hybrid:
            assert r["hybrid"] is True and r["mediated_possible"] is False
    for fam, model, uarch in [(0x17, 0x01, "zen1"), (0x17, 0x31, "zen2"), (0x17, 0x90, "zen2"),
                              (0x19, 0x01, "zen3"), (0x19, 0x21, "zen3"), (0x19, 0x11, "zen4"),
                              (0x19, 0x61, "zen4"), (0x1A, 0x02, "zen5"), (0x1A, 0x44, "zen5"),
                              (0x1A, 0x50, "zen6"), (0x1A, 0xC0, "zen6")]:
        row = F.lookup_uarch("amd", fam, model)
        assert row and row["id"] == uarch, (hex(fam), hex(model))
        assert row["pmu"]["perfmon_v2"] is (uarch not in ("zen1", "zen2", "zen3"))
        assert row["mediated_possible"] is row["pmu"]["perfmon_v2"]


def test_skylake_vs_cascade_lake_by_stepping():
    assert F.lookup_uarch("intel", 6, 0x55, 4)["id"] == "skylakex"
    assert F.lookup_uarch("intel", 6, 0x55, 7)["id"] == "cascadelakex"
    assert F.lookup_uarch("intel", 6, 0x55) is None  # ambiguous without a stepping
    assert F.lookup_uarch("intel", 6, 0x8F)["id"] == "sapphirerapids"
    assert F.lookup_uarch("amd", 6, 0x8F) is None


@pytest.mark.parametrize("row", F.load_microarch(), ids=lambda r: r["id"])
def test_facts_from_row_equals_decoded_cpuid(row):
    """A simulated host's cpu+pmu must be exactly what decoding that CPU's CPUID gives."""
    assert F.facts_from_row(row)["cpu"]["stepping"] == (row["steppings"][0] if row.get("steppings") else None)
    sim = F.facts_from_row(row, stepping=(row.get("steppings") or [0])[0])
    assert tuple(sim["cpu"]) == CPU_KEYS and tuple(sim["pmu"]) == PMU_KEYS
    decoded = F.decode_cpuid(leaves_from_facts(sim["cpu"], sim["pmu"]))
    assert decoded["cpu"] == dict(sim["cpu"], model_name=None)
    pmu = decoded["pmu"]
    if row["vendor"] == "intel":
        pmu["full_width_writes"] = row["pmu"]["full_width_writes"]  # from IA32_PERF_CAPABILITIES
    assert pmu == sim["pmu"]


@pytest.mark.parametrize("row", F.load_microarch(), ids=lambda r: r["id"])
def test_mediated_possible_matches_the_verdict(row):
    sim = F.facts_from_row(row)
    facts = qualifying_host(sim, perf_capabilities=None)
    facts["pmu"] = sim["pmu"]
    verdict = F.mediated_verdict(facts)
    assert (verdict["status"] == "available") is row["mediated_possible"], verdict


def test_match_errata():
    def ids(*args):
        return [e["id"] for e in F.match_errata(*args)]

    srf = F.match_errata("intel", 6, 0xAF, 3, "0x3000341")
    assert [e["id"] for e in srf] == ["SRF7"]
    assert srf[0]["symptoms"] == ["insn_overcount_on_vm_transition", "branch_overcount_on_vm_transition"]
    assert srf[0]["source"]
    cwf = F.match_errata("intel", 6, 0xDD, 0, None)
    assert cwf[0]["symptoms"] == ["insn_overcount_on_vm_transition"] and cwf[0]["events"] == ["instructions"]
    for model in (0x4D, 0x5F, 0x86):
        assert ids("intel", 6, model, 0, None) == ["SRF7"]
    for fam, model in [(0x17, 0x31), (0x19, 0x11), (0x1A, 0x02)]:
        assert ids("amd", fam, model, 0, None) == ["AMD-VMRUN-BRANCH"]
    assert ids("intel", 6, 0x2C, 2, None) == ["BC86", "AAY89", "BD102"]
    assert ids("intel", 6, 0x1A, 5, None) == ["AAK155"]
    assert ids("intel", 6, 0x3C, 3, None) == ["HSD29"]
    assert ids("intel", 6, 0x4F, 1, None) == ["BDM55", "BDM11"]
    assert ids("intel", 6, 0x8F, 8, None) == []


def test_match_errata_microcode_fix(monkeypatch):
    row = {"id": "X1", "vendor": "intel", "family": 6, "models": [0x8F], "steppings": [8], "microcode": "0x2b000600",
           "symptoms": ["min_sample_period"], "events": [], "description": "d", "source": "s"}
    monkeypatch.setattr(tables, "load_errata", lambda: [row])
    assert [e["id"] for e in F.match_errata("intel", 6, 0x8F, 8, "0x2b000500")] == ["X1"]
    assert [e["id"] for e in F.match_errata("intel", 6, 0x8F, 8, None)] == ["X1"]
    assert F.match_errata("intel", 6, 0x8F, 8, "0x2b000603") == []
    assert F.match_errata("intel", 6, 0x8F, 7, None) == []


def test_flat_facts_keys():
    facts = qualifying_host(F.decode_cpuid(CASES["sierraforest"][0]))
    facts["errata"] = [{"id": e["id"], "symptoms": e["symptoms"]} for e in F.match_errata("intel", 6, 0xAF, 3)]
    flat = F.flat_facts(facts)
    assert list(flat) == ["vendor", "family", "model", "stepping", "uarch", "hybrid", "pmu_version", "gp_counters",
                          "fixed_counters", "perfmon_v2", "full_width_writes", "kvm", "enable_pmu",
                          "ignore_msrs", "mediated_pmu", "simulated", "kernel", "errata", "symptoms"]
    assert flat["mediated_pmu"] is True and flat["uarch"] == "sierraforest" and flat["errata"] == ["SRF7"]
    assert flat["symptoms"] == ["insn_overcount_on_vm_transition", "branch_overcount_on_vm_transition"]


def test_event_tables_follow_contracts_section_8():
    assert INTEL_ARCH_EVENTS == ("cycles", "instructions", "ref_cycles", "llc_references", "llc_misses",
                                 "branches", "branch_misses", "topdown_slots", "topdown_be_bound",
                                 "topdown_bad_spec", "topdown_fe_bound", "topdown_retiring", "lbr_inserts")
    assert INTEL_FIXED_COUNTERS == ("instructions", "cycles", "ref_cycles", "topdown_slots", "topdown_bad_spec",
                                    "topdown_fe_bound", "topdown_retiring")
    assert AMD_EVENTS == {"cycles": 0x76, "instructions": 0xC0, "branches": 0xC2, "branch_misses": 0xC3}
    contracts = (ROOT / "docs" / "contracts.md").read_text()
    section = contracts[contracts.index("## 8."):]
    listed = re.search(r"bit order: `([^`]*)`", section).group(1)
    assert [n.strip() for n in listed.split(",")] == list(INTEL_ARCH_EVENTS)


# ------------------------------------------------------------------------------------------------
# THIS machine (live)


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            break
        k, _, v = line.partition(":")
        info.setdefault(k.strip(), v.strip())
    return info


@pytest.fixture(scope="module")
def live() -> dict[str, Any]:
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo: not a Linux host")
    return F.collect_facts()


def test_live_identity_matches_proc_cpuinfo(live):
    info = _cpuinfo()
    cpu = live["cpu"]
    assert cpu["vendor_id"] == info["vendor_id"]
    assert cpu["family"] == int(info["cpu family"]) and cpu["model"] == int(info["model"])
    assert cpu["stepping"] == int(info["stepping"]) and cpu["microcode"] == info.get("microcode")
    row = F.lookup_uarch(cpu["vendor"], cpu["family"], cpu["model"], cpu["stepping"])
    assert cpu["uarch"] == (row["id"] if row else None)
    assert cpu["hypervisor"] == ("hypervisor" in info.get("flags", "").split())
    if (cpu["vendor"], cpu["family"], cpu["model"]) == ("amd", 0x1A, 0x02):
        assert cpu["uarch"] == "zen5"  # the kernel's amd.c table: Fam 0x1A 0x00-0x2f = Zen 5
    assert live["kvm"]["present"] == Path("/dev/kvm").exists()
    assert live["kernel"]["release"] == os.uname().release
    assert live["source"] in ("/dev/cpu/0/cpuid", "cpuid -r -1") or live["source"].startswith("/proc/cpuinfo")
    json.dumps(live)


def test_live_mediated_unavailable(live):
    verdict = live["mediated_pmu"]
    if verdict["status"] == "available":
        pytest.skip("this host qualifies for mediated vPMU: kvm.enable_pmu=Y, "
                    f"{live['kvm']['module']}.enable_mediated_pmu=Y and the CPU rules hold")
    assert verdict["status"] == "unavailable" and verdict["reasons"]


def test_live_reasons_name_enable_pmu(live):
    if live["kvm"]["present"] is not True:
        pytest.skip("/dev/kvm missing: kvm.enable_pmu is not a reason here")
    if live["kvm"]["enable_pmu"] is not False:
        pytest.skip(f"kvm.enable_pmu={live['kvm']['enable_pmu']} on this host")
    assert "kvm.enable_pmu=N" in live["mediated_pmu"]["reasons"]


def test_live_reasons_name_perfmon_v2(live):
    if live["cpu"]["vendor"] != "amd":
        pytest.skip(f"vendor={live['cpu']['vendor']}: PerfMonV2 is an AMD fact")
    if live["pmu"]["perfmon_v2"]:
        pytest.skip("CPUID 0x80000022 EAX[0] PerfMonV2=1 on this host")
    assert "CPUID 0x80000022 EAX[0] PerfMonV2=0" in live["mediated_pmu"]["reasons"]


def test_live_kvm_supported_cpuid(live):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm not accessible: KVM_GET_SUPPORTED_CPUID not possible")
    sup = live["kvm"]["supported_pmu"]
    assert sup is not None and tuple(sup) == PMU_KEYS
    if live["kvm"]["enable_pmu"] is False:
        assert sup["version"] == 0 and sup["gp_counters"] == 0


def test_live_cpuid_fallbacks(monkeypatch):
    from agent.facts import cpuid as C
    from agent.facts import kvm as K

    assert K.KVM_GET_SUPPORTED_CPUID == 0xC008AE05  # _IOWR(0xAE, 0x05, struct kvm_cpuid2)

    def denied(cpu):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(C, "_read_dev", denied)
    if C.shutil.which("cpuid"):
        leaves, source = C.read_cpuid_live()
        assert source == "cpuid -r -1" and (1, 0) in leaves
        info = _cpuinfo()
        assert F.decode_cpuid(leaves)["cpu"]["model"] == int(info["model"])
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    with pytest.raises(F.CpuidUnavailable, match="Permission denied; cpuid tool not installed"):
        C.read_cpuid_live()
    facts = F.collect_facts()  # falls back to the kernel's decoding in /proc/cpuinfo, PMU unknown
    assert facts["source"].startswith("/proc/cpuinfo (CPUID unreadable:")
    assert facts["cpu"]["model"] == int(_cpuinfo()["model"]) and facts["pmu"]["version"] is None
    assert facts["mediated_pmu"]["status"] == "unavailable"


def test_kvm_table_rows_by_kernel_and_detection():
    """inventory/kvm.yaml: 7.0 clamps the version to 2 and fixed counters to 3 (pmu.c
    kvm_init_pmu_capability, kvm_host.h); the FC3 follow-up is recognised by KVM's supported CPUID."""
    rows = tables.load_kvm()
    assert rows[0]["since"] == "7.0" == tables.first_mediated_release()
    assert tables.kvm_behaviour("7.0.0-rc1")["id"] == "linux-7.0"
    assert tables.kvm_behaviour("7.3.2")["id"] == "linux-7.0"          # newest released row
    assert tables.kvm_behaviour(None)["id"] == "linux-7.0"
    seven = tables.kvm_behaviour("7.0.0", {"fixed_counters": 3})
    assert (seven["version_clamp"], seven["max_fixed_counters"]["intel"]) == (2, 3)
    fc3 = tables.kvm_behaviour("7.0.0", {"fixed_counters": 4})
    assert fc3["id"] == "fc3-follow-up" and fc3["max_fixed_counters"]["intel"] == 4
    for row in rows:
        assert all(str(v) for k, v in row.items() if k.endswith("source")), row["id"]


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm is not accessible")
def test_harness_names_the_extra_blockers(tmp_path):
    """On this PMU-less machine the harness still runs its VMs and answers every PMU probe
    `unsupported`; with the NMI watchdog on (a crafted /proc tree) the reason names it too (finding 1)."""
    import subprocess

    from agent.drivers.kvm import NATIVE_DIR
    from agent.protocol import PROBES

    binary = NATIVE_DIR / "build" / "vpmu"
    proc = subprocess.run(["make", "-C", str(NATIVE_DIR)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and binary.exists(), proc.stderr
    caps = json.loads(subprocess.run([str(binary), "caps"], capture_output=True, text=True, timeout=60).stdout)
    if caps["mediated_pmu"]["status"] == "available":
        pytest.skip("mediated vPMU available here: the probes run for real")
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/nmi_watchdog").write_text("1\n")
    env = {**os.environ, "PMUFARM_SYSROOT": str(tmp_path)}
    selftest = subprocess.run([str(binary), "run", "selftest", "iterations=10"], capture_output=True, text=True,
                              timeout=60, env=env)
    assert selftest.returncode == 0 and json.loads(selftest.stdout)["status"] == "ok", selftest.stdout
    for name in [n for n, spec in PROBES.items() if spec.needs_pmu][:4]:
        out = subprocess.run([str(binary), "run", name], capture_output=True, text=True, timeout=60, env=env)
        result = json.loads(out.stdout)
        assert out.returncode == 4 and result["status"] == "unsupported", (name, result)
        assert "kernel.nmi_watchdog=1: " in result["reason"], (name, result["reason"])
