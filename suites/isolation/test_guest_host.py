"""Guest counts exclude the host, host counts exclude the guest, and perf/KVM exclusion.

vpmu.md §3.2: guest PMU state is loaded just before VM-entry and put right after VM-exit, with
PERF_GLOBAL_CTRL loaded/zeroed atomically by the VM-entry/exit controls (Intel) or counters made
GuestOnly (AMD); so a guest counter sees only guest work, and a host exclude_guest event sees none.
vpmu.md §2: perf refuses include-guest events while a mediated VM lives, and KVM refuses the
mediated PMU while an include-guest event exists.
"""

import errno

import pytest

MEDIATED = pytest.mark.requires(mediated_pmu=True)


@MEDIATED
@pytest.mark.errata("insn_overcount_on_vm_transition", "branch_overcount_on_vm_transition",
                    "vmrun_counted_as_branch")
@pytest.mark.parametrize("event", ["instructions", "branches"])
def test_guest_count_excludes_host(probe, errata, event):
    """The guest's count over a loop with one VM-exit per iteration equals what the loop retires.

    Rule (vpmu.md §3.2, §4.2: exact LOOP_INSNS/LOOP_BRANCHES on Intel with GLOBAL_CTRL): KVM's exit
    handling runs with the guest context put, so none of the host's work between exit and re-entry
    reaches the guest counter; errata SRF7 (§5.1) and AMD's VMRUN-as-branch (§5.3) may add up to
    their per-transition bound.
    """
    obs = probe("guest_count").observations
    work = obs["workload"]
    assert obs["exceptions"] == [], f"guest took exceptions: {obs['exceptions']}"
    assert work["vm_exits"] >= work["iterations"] > 0, \
        f"{work['vm_exits']} exits for {work['iterations']} iterations: the window had no forced exits"
    errata.exact(f"guest {event}", obs["counts"][event], work[event], transitions=work["vm_exits"])


@MEDIATED
def test_host_excludes_guest(probe):
    """A host exclude_guest event on the vCPU thread does not grow with the guest's work.

    Rule (vpmu.md §2 perf_load_guest_context schedules exclude_guest events out; §3.2): two runs make
    the same number of exits, so the host-side work (exit handling, the run loop) is the same and the
    host count differs only by noise; the guest retires about a million more instructions in the
    large run. A leak of guest counts into the host event would move the host delta by ~100% of the
    guest delta; interrupts and timer ticks on the vCPU thread during the longer run stay far below
    1% (~10k instructions for a 1M-instruction delta), hence the 1% threshold.
    """
    obs = probe("host_excludes_guest").observations
    assert obs["perf_open_errno"] == 0, \
        f"host could not open the exclude_guest event: errno {obs['perf_open_errno']}"
    assert len(obs["runs"]) >= 2, f"need a small and a large run, got {obs['runs']}"
    small, large = obs["runs"][0], obs["runs"][-1]
    assert small["vm_exits"] == large["vm_exits"], \
        f"runs differ in exits ({small['vm_exits']} vs {large['vm_exits']}): host work not comparable"
    guest_delta = large["guest_instructions"] - small["guest_instructions"]
    host_delta = large["host_count"] - small["host_count"]
    assert guest_delta > 0, f"large run retired no more guest instructions than the small one ({guest_delta})"
    assert abs(host_delta) < guest_delta / 100, (
        f"host exclude_guest count moved by {host_delta} when the guest retired {guest_delta} more "
        f"instructions ({100 * host_delta / guest_delta:.1f}% >= 1%): guest work leaks into the host count")


EXCLUSIVITY = [
    pytest.param("event_without_exclude_guest_errno", errno.EOPNOTSUPP, id="include_guest-event-refused"),
    pytest.param("event_with_exclude_guest_errno", 0, id="exclude_guest-event-allowed"),
    pytest.param("vcpu_create_errno_while_event", errno.EBUSY, id="vcpu-refused-while-include_guest-event"),
]


@MEDIATED
@pytest.mark.parametrize(("key", "expected"), EXCLUSIVITY)
def test_exclusivity(probe, key, expected):
    """perf and the mediated vPMU exclude each other in both directions.

    Rule (vpmu.md §2, tip eff95e170275): while a mediated VM lives, perf_event_alloc() fails an
    !exclude_guest event on a mediated-capable PMU with -EOPNOTSUPP; exclude_guest events open; and
    perf_create_mediated_pmu() (at the first KVM_CREATE_VCPU) returns -EBUSY while such an event exists.
    """
    obs = probe("exclusivity").observations
    got = obs[key]
    assert got == expected, f"{key} = {_errno(got)}, expected {_errno(expected)}"


def _errno(value):
    return f"{value} ({errno.errorcode.get(value, '?') if value else 'success'})"
