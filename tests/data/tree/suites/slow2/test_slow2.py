"""A second slow suite, so one host can be given two long jobs in one run."""

import os
import time


def test_slow2():
    with open(os.environ["PMUFARM_TEST_MARKER"], "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(float(os.environ.get("PMUFARM_TEST_SLEEP", "6")))
