"""Drivers observe; suites judge. Every driver answers the probe catalogue in agent/protocol.py."""

from __future__ import annotations

from typing import Any, Protocol

from agent.protocol import ProbeResult


class Driver(Protocol):
    name: str
    simulated: bool

    def run(self, probe: str, **params: Any) -> ProbeResult: ...

    def list(self) -> list[str]: ...


def make_driver(host: dict[str, Any], facts: dict[str, Any]) -> Driver:
    """Build the driver an inventory host entry names (default ``kvm``)."""
    kind = host.get("driver", "kvm")
    if kind == "kvm":
        from agent.drivers.kvm import KvmDriver

        return KvmDriver(facts)
    if kind == "model":
        from agent.drivers.model import ModelDriver

        return ModelDriver(host, facts)
    if kind == "emulated":
        from agent.drivers.emulated import EmulatedDriver

        return EmulatedDriver(host, facts)
    if kind == "guest":
        from agent.drivers.guest import GuestDriver

        return GuestDriver(facts)
    raise ValueError(f"host {host.get('name', '?')}: unknown driver {kind!r} (known: kvm, model, emulated, guest)")
