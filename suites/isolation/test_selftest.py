"""Harness self-test: the VM machinery every other probe relies on, no PMU involved.

A guest loop of known length makes one port-I/O VM-exit per iteration and reports a checksum. If
this fails, no PMU verdict from the same driver can be trusted. It must pass on any KVM host,
including the PMU-less development machines (shared/DESIGN.md "What these machines have").
"""

import pytest

# The VM machinery, not the mediated vPMU: these passing alone make a run "not tested here", not PASS.
pytestmark = pytest.mark.harness
ITERATIONS = [1, 1000]


@pytest.mark.requires(kvm=True)
@pytest.mark.parametrize("iterations", ITERATIONS, ids=lambda n: f"{n}-iterations")
def test_selftest_exits_and_checksum(probe, iterations):
    """Every guest iteration is one exit seen by the host, and the guest computed sum(range(N)).

    Rule: a port-I/O instruction always causes a VM-exit (SDM Vol. 3C 26.1.3 / 27.1.3 "unconditional
    I/O exiting"; APM Vol. 2 15.10 IOIO intercept), so exits == iterations exactly; the guest's
    checksum shows its loop ran to completion with registers intact across every exit.
    """
    obs = probe("selftest", iterations=iterations).observations
    assert obs["iterations"] == iterations, f"probe ran {obs['iterations']} iterations, asked {iterations}"
    assert obs["expected_sum"] == iterations * (iterations - 1) // 2, \
        f"expected_sum {obs['expected_sum']} is not sum(range({iterations}))"
    assert obs["vm_exits"] == iterations, \
        f"host saw {obs['vm_exits']} exits on the channel port for {iterations} guest iterations"
    assert obs["guest_sum"] == obs["expected_sum"], \
        f"guest checksum {obs['guest_sum']} != sum(range({iterations})) = {obs['expected_sum']}"


@pytest.mark.requires(kvm=True)
def test_selftest_no_guest_exceptions(probe):
    """The self-test guest takes no exception (no #GP/#UD/#PF from the harness itself).

    Rule: the self-test touches no PMU state, so any exception is a harness or KVM defect that would
    also taint every PMU probe of this driver (shared/DESIGN.md "Harness protocol").
    """
    obs = probe("selftest").observations
    assert obs["exceptions"] == [], f"guest took exceptions: {obs['exceptions']}"
