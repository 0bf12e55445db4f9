"""Host perf and a running guest: the mediated vPMU's exclusivity rule, seen from real perf.

vpmu.md §2: while a mediated VM lives, perf refuses host events without exclude_guest (EOPNOTSUPP).
The isolation suite checks it with the harness's minimal VMs; here the VM is a real QEMU guest
running Linux, the way a developer would meet it with ``perf stat`` on the host.
"""

import errno

import pytest

MEDIATED = pytest.mark.requires(mediated_pmu=True)


PHASES = [
    pytest.param("before_vm", "without_exclude_guest_errno", 0, id="before-vm-include_guest-opens"),
    pytest.param("while_vm", "without_exclude_guest_errno", errno.EOPNOTSUPP, id="while-vm-include_guest-refused"),
    pytest.param("while_vm", "with_exclude_guest_errno", 0, id="while-vm-exclude_guest-opens"),
    pytest.param("after_vm", "without_exclude_guest_errno", 0, id="after-vm-include_guest-opens"),
]


@MEDIATED
@pytest.mark.parametrize(("phase", "key", "expected"), PHASES)
def test_host_include_guest_refused_while_guest_runs(probe, phase, key, expected):
    """Host perf without exclude_guest fails with EOPNOTSUPP exactly while a mediated VM lives.

    Rule (vpmu.md §2, tip eff95e170275): mediated_pmu_account_event() refuses !exclude_guest events
    on a mediated-capable PMU while nr_mediated_pmu_vms > 0; the count drops when the VM is
    destroyed (perf_release_mediated_pmu from kvm_arch_destroy_vm), so the same open succeeds before
    the guest starts and after QEMU exits. exclude_guest events are never refused.
    """
    obs = probe("host_include_guest").observations
    got = obs[phase][key]
    assert got == expected, (
        f"{phase}: host perf_event_open(instructions, {key.replace('_errno', '')}) -> "
        f"{errno.errorcode.get(got, got) if got else 0}, expected "
        f"{errno.errorcode.get(expected, expected) if expected else 0}"
        + ("; another mediated VM may be alive on this host" if phase == "before_vm" else ""))
