"""The guest-perf capability end to end: workload, initramfs, a real QEMU boot, driver, suite.

Everything here runs for real: perfload is compiled and run on this machine, the initramfs is
written and parsed back, QEMU boots a Linux guest (TCG where KVM cannot run one) and the workload's
JSON comes back over the serial console. A test skips only when a prerequisite is missing, and
names it (gcc, QEMU, static busybox, the guest kernel: ``python -m agent.guestimage fetch-kernel``).
"""

from __future__ import annotations

import errno
import gzip
import json
import sqlite3
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from agent import guestimage
from agent.drivers.guest import GuestDriver, parse_perf_record, parse_perf_stat, parse_perf_test, perf_test_list
from agent.facts import collect_facts, flat_facts
from agent.protocol import GUEST_PROBES, GUEST_SUITE_PROBES
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
NO_PMU = {errno.ENOENT, errno.EOPNOTSUPP, errno.ENODEV}


def _need(fn, *args):
    try:
        return fn(*args)
    except guestimage.GuestImageError as exc:
        pytest.skip(f"missing {exc.missing}: {exc}")


@pytest.fixture(scope="module")
def perfload() -> Path:
    return _need(guestimage.build_perfload)


@pytest.fixture(scope="module")
def guest_env(perfload: Path) -> dict:
    """Everything a boot needs, or a skip naming what is missing."""
    qemu = _need(guestimage.find_qemu)
    busybox = _need(guestimage.find_busybox)
    kernel = _need(guestimage.find_kernel)
    return {"qemu": qemu, "busybox": busybox, "kernel": kernel,
            "initrd": guestimage.build_initramfs(perfload, busybox)}


@pytest.fixture(scope="module")
def facts() -> dict:
    return collect_facts()


def _qemu_pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd and b"qemu" in cmd:
            pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------------------------------
# The workload


def test_perfload_makefile_builds_a_static_binary(tmp_path: Path):
    if not guestimage.shutil.which("gcc") or not guestimage.shutil.which("make"):
        pytest.skip("missing gcc/make")
    r = subprocess.run(["make", "-s", "-C", str(guestimage.GUEST_SRC), f"BUILD={tmp_path}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    binary = tmp_path / "perfload"
    assert binary.is_file()
    assert guestimage._is_static_elf(binary), "perfload must be static: it runs in a busybox initramfs"


def test_perfload_on_host_reports_events_honestly(perfload: Path):
    """Each event either counts the loop (3N instructions, N branches) or carries its errno and no count."""
    out = guestimage.run_host(["--mode", "count,sample,enum,include_guest", "--iterations", "100000",
                               "--runs", "3", "--sample-iterations", "1000000", "--period", "100000"])
    assert out["where"] == "host" and out["exclude_guest"] == 1
    count = out["count"]
    assert count["loop"] == {"instructions": 300000, "branches": 100000}
    for name, ev in count["events"].items():
        if ev["errno"]:
            assert ev["counts"] is None and ev["baseline"] is None, f"{name}: a count next to errno {ev['errno']}"
            assert ev["error"] == errno.errorcode.get(ev["errno"]), ev
            continue
        assert len(ev["counts"]) == 3 and len(ev["baseline"]) == 3
        if name in count["loop"]:
            delta = min(ev["counts"]) - min(ev["baseline"])
            assert abs(delta - count["loop"][name]) <= 256 + count["loop"][name] // 10_000, (name, ev)
    # perf_event_open itself works: a software event needs no PMU
    assert count["software"]["errno"] == 0 and count["software"]["count"] > 0
    sample = out["sample"]
    assert (sample["samples"] is None) == bool(sample["errno"]), sample
    inc = out["include_guest"]
    assert set(inc) == {"event", "without_exclude_guest", "with_exclude_guest"}
    if count["events"]["instructions"]["errno"] in NO_PMU:
        # this machine: no PMU, and the reference says so instead of inventing numbers
        assert out["enum"]["group"]["max_group"] == 0
        assert inc["with_exclude_guest"]["errno"] in NO_PMU


def test_perfload_rejects_bad_arguments(perfload: Path):
    for args in (["--bogus", "1"], ["--iterations", "x"], ["--runs", "0"], ["--period", "0"]):
        r = subprocess.run([str(perfload), *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "" and "usage" in r.stderr, args


# --------------------------------------------------------------------------------------------------
# The image


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    entries, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad newc magic at {pos}"
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) // 4 * 4
        body = data[pos: pos + size]
        pos = (pos + size + 3) // 4 * 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, (rmaj, rmin))


def test_initramfs_is_gzip_newc_with_init_busybox_and_workload(perfload: Path, tmp_path: Path):
    busybox = _need(guestimage.find_busybox)
    path = guestimage.build_initramfs(perfload, busybox, out_dir=tmp_path)
    again = guestimage.build_initramfs(perfload, busybox, out_dir=tmp_path)
    assert path == again, "the image is keyed by content and reused"
    entries = _read_newc(gzip.decompress(path.read_bytes()))
    assert entries["init"][0] & 0o777 == 0o755 and entries["init"][1].startswith(b"#!/bin/sh")
    assert guestimage.MARK_BEGIN.encode() in entries["init"][1]
    assert entries["bin/perfload"][1] == perfload.read_bytes()
    assert entries["bin/busybox"][1] == busybox.read_bytes()
    assert entries["bin/sh"][0] & 0o170000 == 0o120000 and entries["bin/sh"][1] == b"busybox"
    assert entries["dev/console"][0] & 0o170000 == 0o020000 and entries["dev/console"][2] == (5, 1)


def test_missing_kernel_is_named(monkeypatch):
    monkeypatch.setenv("PMUFARM_GUEST_KERNEL", "/nonexistent/vmlinuz")
    with pytest.raises(guestimage.GuestImageError) as exc:
        guestimage.find_kernel()
    assert exc.value.missing == "kernel" and "/nonexistent/vmlinuz" in str(exc.value)
    result = GuestDriver({}).run("guest_boot")
    assert result.status == "unsupported" and "kernel" in result.reason


def test_pvh_boot_image_is_the_kernels_own_vmlinux(guest_env):
    path, how = guestimage.boot_image(guest_env["kernel"])
    if "pvh" not in how:
        pytest.skip(f"kernel boots as bzImage here: {how}")
    assert guestimage._elf_has_pvh_note(path.read_bytes())


# --------------------------------------------------------------------------------------------------
# Booting


def test_guest_boots_under_tcg_and_returns_workload_json(guest_env):
    run = guestimage.run_guest(kernel=guest_env["kernel"], initrd=guest_env["initrd"], accel="tcg",
                               args=["--mode", "count,enum", "--iterations", "10000", "--runs", "2"], timeout=90)
    assert run.error is None, f"{run.error}\n{run.console_tail()}"
    assert run.accel == "tcg" and run.ready and run.boot_s is not None and run.workload_rc == 0
    res = run.result
    assert res["tool"] == "perfload" and res["where"] == "guest"
    cpuid = res["enum"]["cpuid"]
    assert cpuid["hypervisor"] is True and cpuid["hypervisor_id"] == "TCGTCGTCGTCG"
    assert res["count"]["software"]["errno"] == 0 and res["count"]["software"]["count"] > 0
    for name, ev in res["count"]["events"].items():
        # TCG emulates no PMU: each hardware event reports its errno, never a count
        assert ev["errno"] in NO_PMU and ev["counts"] is None, (name, ev)
    assert res["nmi_watchdog"] == 0, "the guest boots with nmi_watchdog=0 so perf owns every counter"
    assert "Run /init" in run.console or guestimage.MARK_READY in run.console


def test_accel_choice_is_recorded(guest_env):
    accel, why = guestimage.choose_accel(guest_env["kernel"], guest_env["initrd"])
    assert accel in ("kvm", "tcg") and why
    ok, quick = guestimage.kvm_usable_quick()
    if not ok:
        assert accel == "tcg" and quick in why


def test_timeout_kills_qemu_and_cleans_up(guest_env, monkeypatch, tmp_path: Path):
    marker = f"pmufarm_test={uuid.uuid4().hex}"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = guestimage.run_guest(kernel=guest_env["kernel"], initrd=guest_env["initrd"], accel="tcg",
                               args=["--mode", "enum"], timeout=0.5, extra_cmdline=marker)
    assert run.timed_out and run.error and "timeout" in run.error and run.result is None
    assert run.total_s < 15
    assert _qemu_pids_with(marker) == [], "QEMU outlived the timeout"
    assert list(tmp_path.iterdir()) == [], "temporary files left behind"


def test_hold_runs_host_code_while_the_guest_lives(guest_env):
    """The host_include_guest path: init waits after READY, the hook runs while QEMU is alive."""
    marker = f"pmufarm_test={uuid.uuid4().hex}"
    seen = {}

    def hook(run):
        seen["ready"] = run.ready
        seen["alive"] = _qemu_pids_with(marker)
        return "hooked"

    run = guestimage.run_guest(kernel=guest_env["kernel"], initrd=guest_env["initrd"], accel="tcg",
                               args=["--mode", "enum"], timeout=90, while_running=hook, extra_cmdline=marker)
    assert run.error is None, f"{run.error}\n{run.console_tail()}"
    assert seen["ready"] and seen["alive"], "the hook must run while QEMU is alive"
    assert run.hook_result == "hooked" and run.result["where"] == "guest"
    assert guestimage.MARK_WAIT in run.console
    assert _qemu_pids_with(marker) == []


def test_guest_that_dies_is_an_error_with_the_console_tail(guest_env, tmp_path: Path):
    initrd = guestimage.build_initramfs(busybox=guest_env["busybox"], out_dir=tmp_path,
                                        init_script="#!/bin/sh\necho dying on purpose\nexit 3\n")
    run = guestimage.run_guest(kernel=guest_env["kernel"], initrd=initrd, accel="tcg", timeout=90)
    assert run.result is None and run.error and not run.timed_out
    assert "Kernel panic" in run.console, run.console_tail()
    assert "dying on purpose" in run.console


def test_driver_boot_error_carries_console_tail(guest_env, tmp_path: Path):
    bogus = tmp_path / "vmlinuz-bogus"
    bogus.write_bytes(b"not a kernel" * 100)
    result = GuestDriver({}, kernel=str(bogus), accel="tcg", timeout=30).run("guest_perf_count")
    assert result.status == "error", result
    assert "console" in result.reason and result.observations["console_tail"], result.reason


# --------------------------------------------------------------------------------------------------
# Driver and suite


def test_driver_catalogue(facts):
    d = GuestDriver(facts)
    assert d.name == "guest" and d.simulated is False
    assert d.list() == list(GUEST_PROBES) == GUEST_SUITE_PROBES["guest_perf"]
    assert d.run("no_such_probe").status == "error"
    bad = d.run("guest_perf_count", bogus=1)
    assert bad.status == "error" and "bogus" in bad.reason


def test_driver_probes_on_this_host(guest_env, facts):
    """Real boot; without a PMU in the guest every PMU probe is unsupported with the reason."""
    d = GuestDriver(facts, kernel=str(guest_env["kernel"]))
    boot = d.run("guest_boot")
    assert boot.status == "ok", boot.reason
    obs = boot.observations
    assert obs["workload_rc"] == 0 and obs["guest_task_clock"]["count"] > 0
    results = {p: d.run(p) for p in ("guest_perf_count", "guest_perf_sample", "guest_perf_enum",
                                      "host_include_guest")}
    for name, r in results.items():
        json.loads(r.to_json())  # the contract shape
        assert r.status in ("ok", "unsupported"), (name, r.reason)
        if r.status == "unsupported":
            assert r.reason, name
    if obs["accel"] == "tcg":
        for name in ("guest_perf_count", "guest_perf_sample"):
            r = results[name]
            assert r.status == "unsupported" and "ENOENT" in r.reason and "no PMU in the guest" in r.reason, r
            assert "TCG" in r.reason
        assert results["guest_perf_enum"].status == "unsupported"
        assert "TCG" in results["host_include_guest"].reason
        # one boot served count, sample, enum and boot (the default parameters share it)
        assert len(d._guest_cache) == 1


# A few fast built-in perf tests (an Ok, a Skip, a software event, a sampling one): the whole
# ``perf test`` takes ~190 s under TCG here and is the suite's default, not CI's.
CI_PERF_TESTS = "1,2,7,25"


def test_guest_perf_suite_runs_and_skips_with_reasons(guest_env, facts, tmp_path: Path):
    """``orchestrator submit suites/guest_perf``: the guest boots with perf, perf test results reach the store."""
    inv = tmp_path / "inv.yaml"
    inv.write_text("- {name: gperf, address: local}\n")
    env = {"FARM_STATE_DIR": str(tmp_path / "st"), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent"),
           "PMUFARM_TREE": str(ROOT), "PMUFARM_GUEST_KERNEL": str(guest_env["kernel"]),
           "PMUFARM_PERF_TESTS": CI_PERF_TESTS}
    r = run_cli("--reports-dir", str(tmp_path / "reports"), "submit", "suites/guest_perf", "--inventory", str(inv),
                env=env, timeout=600)
    assert "Traceback" not in r.stderr, r.stderr
    with sqlite3.connect(tmp_path / "st" / "pmufarm.sqlite") as db:
        tests = [{"name": n, "outcome": o, "message": m} for n, o, m in db.execute(
            "SELECT r.name, r.outcome, r.message FROM results r JOIN jobs j ON j.id=r.job_id "
            "WHERE j.suite='guest_perf'")]
    bad = [t for t in tests if t["outcome"] in ("failed", "error")]
    assert tests and not bad, (bad, r.stdout[-2000:])
    outcomes = {t["name"]: t["outcome"] for t in tests}
    assert outcomes["test_guest_boots_and_runs_workload"] == "passed"
    # a software event samples in any guest, TCG included: this one runs for real
    assert outcomes["test_perf_record_software_samples_land_in_the_loop"] == "passed"
    perf_tests = {n: t for n, t in ((t["name"], t) for t in tests) if n.startswith("test_perf_test[")}
    wanted = [tid for tid, _ in perf_test_list() if tid.split(".")[0] in CI_PERF_TESTS.split(",")]
    assert len(perf_tests) == len(wanted) and wanted, (perf_tests, wanted)
    for t in perf_tests.values():
        assert t["outcome"] in ("passed", "skipped"), t  # these four pass or skip on any x86 guest
        if t["outcome"] == "skipped":
            assert t["message"].startswith("perf test "), t
    if not flat_facts(facts)["mediated_pmu"]:
        for t in tests:
            if t["name"].startswith(("test_perf_stat_counts_the_loop", "test_perf_record_hardware")):
                # perf's own words for the missing PMU, e.g. "instructions:u <not supported>"
                assert t["outcome"] == "skipped" and "not supported" in t["message"], t
            elif t["name"] in ("test_guest_boots_and_runs_workload",
                               "test_perf_record_software_samples_land_in_the_loop") or t["name"] in perf_tests:
                continue
            else:
                assert t["outcome"] == "skipped", t
                assert t["message"].startswith("requires mediated_pmu=True: host has mediated_pmu=False"), t


# --------------------------------------------------------------------------------------------------
# perf in the guest


DATA = Path(__file__).resolve().parent / "data" / "guest_perf"


def test_perf_image_carries_perf_and_its_libraries(perfload: Path, tmp_path: Path):
    busybox = _need(guestimage.find_busybox)
    perf = _need(guestimage.find_perf)
    path = guestimage.build_initramfs(perfload, busybox, out_dir=tmp_path, with_perf=True)
    entries = _read_newc(path.read_bytes())  # uncompressed: the kernel needs no decompressor
    assert entries["usr/bin/perf"][1] == perf.read_bytes()
    libs = guestimage.ldd_closure(perf)
    assert any("ld-linux" in g for g in libs), libs
    for guest, host in libs.items():
        assert entries[guest.lstrip("/")][1] == host.read_bytes(), guest
    assert entries["init"][1].decode() == guestimage.PERF_INIT_SCRIPT
    assert entries["bin/timeout"][1] == b"busybox" and entries["bin/perfload"][1] == perfload.read_bytes()


def test_perf_test_output_parsed_from_a_real_guest_run():
    """``perf test`` (perf 6.1.187) in a TCG guest on this machine: 100 leaf tests, 70 Ok, 26 Skip, 4 FAILED."""
    tests = parse_perf_test((DATA / "perf_test_tcg.txt").read_text())
    assert len(tests) == 100
    assert tests["16"] == {"name": "syscalls:sys_enter_openat event fields", "result": "Ok", "reason": ""}
    assert tests["4.2"]["result"] == "Skip" and tests["4.2"]["reason"] == "permissions"
    assert tests["10.4"]["name"] == "Parsing of PMU event table metrics with fake PMUs"
    assert "4" not in tests, "a parent of subtests has no verdict of its own"
    assert sorted(k for k, v in tests.items() if v["result"] == "FAILED!") == ["19", "26", "74", "8"]


def test_perf_stat_csv_parsed():
    stat = parse_perf_stat((DATA / "perf_stat_tcg.txt").read_text())
    assert stat == {"instructions:u": {"count": None, "text": "<not supported>"},
                    "branches:u": {"count": None, "text": "<not supported>"}}
    ok = parse_perf_stat("30051234,,instructions:u,123,100.00,,\n10001234,,branches:u,123,100.00,,\n")
    assert ok["instructions:u"]["count"] == 30051234 and ok["branches:u"]["count"] == 10001234


def test_perf_record_samples_parsed():
    line = "[ perf record: Captured and wrote 0.003 MB /tmp/sw.data (74 samples) ]"
    rec = parse_perf_record({"rc": 0, "output": line})
    assert rec["samples"] == 74 and rec["rc"] == 0
    assert parse_perf_record(None)["samples"] is None


def test_sections_of_a_guest_that_died_mid_command():
    """The perf image's console: a finished section has its rc; one the guest died in has rc None."""
    run = guestimage.GuestRun(accel="tcg", console="\n".join([
        "PMUFARM-READY", f"{guestimage.MARK_SECTION_BEGIN} stat", "1,,instructions:u,1,100.00,,",
        f"{guestimage.MARK_SECTION_END} stat rc=0", f"{guestimage.MARK_SECTION_BEGIN} test",
        "  1: vmlinux symtab matches kallsyms : Skip", "Kernel panic - not syncing"]))
    guestimage._parse_sections(run)
    assert run.sections["stat"] == {"rc": 0, "output": "1,,instructions:u,1,100.00,,"}
    assert run.sections["test"]["rc"] is None and "Kernel panic" in run.sections["test"]["output"]
