"""suites/guest_perf is always served by the ``guest`` driver: a real Linux guest running ``perf``.

The plugin picks its driver from the host entry (``kvm`` by default); this suite instead builds
``GuestDriver(facts)`` here and overrides ``pmufarm_driver``. The plugin's ``probe`` fixture serves the
guest probes (``agent.protocol.GUEST_PROBES``) like any other.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent import guestimage
from agent.drivers.guest import GuestDriver, perf_test_list


@pytest.fixture(scope="session")
def pmufarm_driver(pmufarm_state: Any, facts: dict[str, Any]) -> GuestDriver:
    if facts.get("simulated"):
        pytest.skip(f"suites/guest_perf boots real guests; host {pmufarm_state.host.get('name', '?')} is "
                    "simulated (driver model), and the model does not simulate a Linux guest")
    driver = GuestDriver(facts)
    if pmufarm_state.driver is None:  # the results document then names the driver that served
        pmufarm_state.driver = driver
    return driver


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``perf_test_id``: one test per ``perf test`` case, listed by the host's perf (the binary the
    guest runs); ``PMUFARM_PERF_TESTS=2,5`` narrows it. Without perf: one case that skips saying so."""
    if "perf_test_id" not in metafunc.fixturenames:
        return
    try:
        cases = [pytest.param(tid, id=f"{tid} {name}") for tid, name in perf_test_list()]
    except (guestimage.GuestImageError, ValueError, OSError) as exc:
        cases = [pytest.param(None, id="perf", marks=pytest.mark.skip(reason=f"no perf test list: {exc}"))]
    metafunc.parametrize("perf_test_id", cases or [
        pytest.param(None, id="none", marks=pytest.mark.skip(reason="perf test list names no test"))])
