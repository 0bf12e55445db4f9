"""Debian's ``perf`` itself in the guest: ``perf stat``, ``perf record`` and ``perf test``.

The guest's initramfs carries the host's perf (linux-perf) and its shared libraries (ldd closure),
so the tool KVM and perf maintainers use is the one measuring. The workload is perfload's ``spin``
phase: loop(N) retires 3N instructions and N branches by construction (agent/native/guest/perfload.c),
plus the program's own start-up and JSON output, identical on the host and in the guest (one
static binary). Where perf cannot count a hardware event (no PMU: QEMU TCG, or a host without one)
the test skips with perf's own words.
"""

from __future__ import annotations

import pytest

MEDIATED = pytest.mark.requires(mediated_pmu=True)
EVENTS = ["instructions:u", "branches:u"]


def tolerance(expected: int) -> int:
    """Same argument as test_count.tolerance: identical user-mode streams, so only interrupts and
    exits in the window (a few counts each) separate guest from bare metal; start-up and output
    of perfload are the same code on both sides."""
    return 256 + expected // 10_000


def _count_or_skip(stat: dict, where: str, event: str) -> int:
    ev = stat.get(event)
    if ev is None:
        pytest.skip(f"{where} perf stat printed no {event} line: {stat.get('output') or stat.get('error') or stat}")
    if ev["count"] is None:
        pytest.skip(f"{where} perf stat: {event} {ev['text']}")
    return ev["count"]


@pytest.mark.parametrize("event", EVENTS)
def test_perf_stat_counts_the_loop(probe, event):
    """perf stat in the guest counts at least the loop (3N / N) and not more than the loop plus
    perfload's own start-up and output (under 1M user-mode instructions for a static binary)."""
    obs = probe("guest_perf_tool").observations
    got = _count_or_skip(obs["guest_stat"], f"guest ({obs['accel']})", event)
    loop = obs["loop"]["instructions" if event.startswith("instructions") else "branches"]
    assert loop <= got <= loop + 1_000_000, f"guest perf stat {event}: {got} for a loop of {loop}"


@MEDIATED
@pytest.mark.parametrize("event", EVENTS)
def test_perf_stat_guest_equals_bare_metal(probe, event):
    """The same perf stat over the same binary counts the same in the guest and on bare metal."""
    obs = probe("guest_perf_tool").observations
    g = _count_or_skip(obs["guest_stat"], f"guest ({obs['accel']})", event)
    h = _count_or_skip(obs["host_stat"], "host", event)
    loop = obs["loop"]["instructions" if event.startswith("instructions") else "branches"]
    assert abs(g - h) <= tolerance(loop), f"{event}: guest {g} vs bare metal {h} ({g - h:+d}, tol {tolerance(loop)})"


def test_perf_record_software_samples_land_in_the_loop(probe):
    """perf record -e cpu-clock:u (a software event: no PMU needed) samples the workload, and
    perf report attributes most samples to the loop, where the program spends its time."""
    rec = probe("guest_perf_tool").observations["record_sw"]
    assert rec["rc"] == 0 and rec["samples"], f"perf record cpu-clock failed (rc {rec['rc']}): {rec['output']}"
    assert rec.get("top_symbol") == "loop", f"top symbol {rec.get('top_symbol')!r}, report: {rec}"
    assert rec["top_percent"] >= 50, f"only {rec['top_percent']}% of samples in loop"


def test_perf_record_hardware_samples(probe):
    """perf record -e instructions:u -c P: about 3N/P samples (the loop dominates the count)."""
    obs = probe("guest_perf_tool").observations
    rec = obs["record_hw"]
    if rec["rc"] != 0 and "not supported" in rec["output"]:
        pytest.skip(f"guest ({obs['accel']}) perf record: {' '.join(rec['output'].split())}")
    assert rec["rc"] == 0 and rec["samples"] is not None, f"perf record failed (rc {rec['rc']}): {rec['output']}"
    period = 100_000
    want = obs["loop"]["instructions"] // period
    assert want <= rec["samples"] <= want + 1_000_000 // period + 2, (
        f"{rec['samples']} samples at period {period} for a {obs['loop']['instructions']}-instruction loop")


def test_perf_test(probe, perf_test_id):
    """One result per ``perf test`` case, with perf's verdict: Ok passes, Skip skips with perf's
    reason, FAILED! fails with the ``perf test -v`` output."""
    obs = probe("guest_perf_test").observations
    t = obs["tests"].get(perf_test_id)
    if t is None:
        why = "perf test timed out before it" if obs["timed_out"] else "perf test printed no verdict for it"
        pytest.fail(f"perf test {perf_test_id}: {why} (perf test rc {obs['rc']})", pytrace=False)
    if t["result"] == "Ok":
        return
    if t["result"].startswith("Skip"):
        pytest.skip(f"perf test {perf_test_id} {t['name']}: Skip" + (f" ({t['reason']})" if t["reason"] else ""))
    pytest.fail(f"perf test {perf_test_id} {t['name']}: {t['result']}\n{t.get('verbose', '')}", pytrace=False)
