"""A test that kills its own pytest process, as a wedged harness might."""

import os


def test_passes_first():
    assert True


def test_crashes_process():
    os.abort()
