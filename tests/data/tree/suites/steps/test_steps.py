"""Three tests; the second waits for a file the test creates (PMUFARM_TEST_GATE): progress is seen
mid-run deterministically, and a suite whose gate never opens hangs until --timeout kills it."""

import os
import time
from pathlib import Path


def test_first():
    assert True


def test_waits_for_gate():
    gate = Path(os.environ["PMUFARM_TEST_GATE"])
    while not gate.exists():
        time.sleep(0.05)


def test_last():
    assert True
