"""Runs longer than the short visibility timeout the exactly-once test configures."""

import os
import time


def test_slow():
    with open(os.environ["PMUFARM_TEST_MARKER"], "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(float(os.environ.get("PMUFARM_TEST_SLEEP", "6")))
