"""suites/guest_perf is always served by the ``guest`` driver: a real Linux guest running ``perf``.

The plugin picks its driver from the host entry (``kvm`` by default); this suite instead builds
``GuestDriver(facts)`` here and overrides ``pmufarm_driver``. The plugin's ``probe`` fixture serves the
guest probes (``agent.protocol.GUEST_PROBES``) like any other.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.drivers.guest import GuestDriver


@pytest.fixture(scope="session")
def pmufarm_driver(pmufarm_state: Any, facts: dict[str, Any]) -> GuestDriver:
    if facts.get("simulated"):
        pytest.skip(f"suites/guest_perf boots real guests; host {pmufarm_state.host.get('name', '?')} is "
                    "simulated (driver model), and the model does not simulate a Linux guest")
    driver = GuestDriver(facts)
    if pmufarm_state.driver is None:  # the results document then names the driver that served
        pmufarm_state.driver = driver
    return driver
