"""suites/guest_perf is always served by the ``guest`` driver: a real Linux guest running ``perf``.

The plugin picks its driver from the host entry (``kvm`` by default); this suite instead builds
``GuestDriver(facts)`` here and overrides ``pmufarm_driver``. The ``probe`` fixture is the plugin's
contract (contracts §4: runs once per session per (name, params), ``unsupported`` -> skip with the
driver's reason, ``error`` -> fail), looked up in the guest driver's own catalogue so the suite does
not depend on ``agent.protocol.PROBES`` carrying the guest probes yet.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.drivers.guest import GuestDriver
from agent.protocol import GUEST_PROBES, ProbeResult, parse_params


@pytest.fixture(scope="session")
def pmufarm_driver(pmufarm_state: Any, facts: dict[str, Any]) -> GuestDriver:
    if facts.get("simulated"):
        pytest.skip(f"suites/guest_perf boots real guests; host {pmufarm_state.host.get('name', '?')} is "
                    "simulated (driver model), and the model does not simulate a Linux guest")
    driver = GuestDriver(facts)
    if pmufarm_state.driver is None:  # the results document then names the driver that served
        pmufarm_state.driver = driver
    return driver


@pytest.fixture
def probe(request: pytest.FixtureRequest, pmufarm_state: Any, pmufarm_driver: GuestDriver):
    def run(name: str, **params: Any) -> ProbeResult:
        spec = GUEST_PROBES.get(name)
        if spec is None:
            pytest.fail(f"unknown guest probe {name!r} (known: {', '.join(GUEST_PROBES)})", pytrace=False)
        try:
            merged = parse_params(spec, params)
        except ValueError as exc:
            pytest.fail(str(exc), pytrace=False)
        result = pmufarm_state.run_probe(pmufarm_driver, name, merged)
        request.node.user_properties.append(("probe", f"{name} {json.dumps(merged, sort_keys=True)} "
                                                      f"{result.status}"))
        if result.status == "unsupported":
            pytest.skip(f"probe {name}: {result.reason or 'unsupported (no reason given)'}")
        if result.status != "ok":
            pytest.fail(f"probe {name} {result.status}: {result.reason or '(no reason given)'}", pytrace=False)
        return result

    return run
