"""A tiny suite for the farm's own end-to-end tests (not a PMU suite)."""

import pytest


def test_passes(facts):
    assert facts["cpu"]["vendor"] in ("intel", "amd", "unknown")


def test_skips():
    pytest.skip("requires fact smoke_skip=True; host has smoke_skip=False")


def test_selftest_probe(probe):
    result = probe("selftest", iterations=10)
    assert result.observations["vm_exits"] == 10
