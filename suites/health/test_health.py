"""Health check: run before a host's first job and after any infrastructure error (LAVA style).

Short on purpose: it asks only whether the host can serve jobs at all (facts readable, KVM present,
a minimal VM runs), not whether its PMU is correct; that is the other suites' job.
"""

from __future__ import annotations


def test_facts_readable(facts: dict) -> None:
    """The agent reads the host's CPU identity (DESIGN.md, Host facts)."""
    assert facts["cpu"]["vendor"] in ("intel", "amd"), f"unreadable CPU vendor: {facts['cpu'].get('vendor_id')!r}"
    assert isinstance(facts["cpu"]["family"], int) and isinstance(facts["cpu"]["model"], int)


def test_kvm_present(facts: dict) -> None:
    """A farm host must expose /dev/kvm; without it no suite can run a VM."""
    assert facts["kvm"]["present"], "/dev/kvm is missing"


def test_minimal_vm_runs(probe) -> None:
    """The harness self-test: a guest loop with one VM-exit per iteration runs to the end."""
    result = probe("selftest", iterations=100)
    obs = result.observations
    assert obs["vm_exits"] == obs["iterations"] == 100
    assert obs["guest_sum"] == obs["expected_sum"]
    assert not obs["exceptions"], f"guest took exceptions: {obs['exceptions']}"
