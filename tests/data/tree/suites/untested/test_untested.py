"""A harness check that passes and a subject test whose fact no host has: the run tested nothing."""

import pytest


@pytest.mark.harness
def test_machinery_works():
    assert True


@pytest.mark.requires(vendor="nosuchvendor")
def test_the_subject():
    raise AssertionError("never runs: no host has this vendor")
