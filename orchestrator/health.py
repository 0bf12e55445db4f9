"""Host states in the LAVA style: health checks, consecutive-infra-error quarantine, maintenance.

- ``unknown``: never checked, or last job ended in an infrastructure error -> health check first.
- ``good``: the last health check passed. ``bad``: it failed (a test of the health suite failed).
- ``quarantined``: ``FARM_QUARANTINE_AFTER`` (default 3) infrastructure errors in a row.
- ``maintenance``: set by hand. Only ``orchestrator hosts --release NAME`` returns a host to service.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.inventory import Host
from orchestrator.store import Store

HEALTH_SUITE = "health"
OUT_OF_SERVICE = ("bad", "quarantined", "maintenance")
INFRA_STATUSES = ("infra_error", "timeout")


def quarantine_after() -> int:
    return int(os.environ.get("FARM_QUARANTINE_AFTER", "3"))


def split_usable(store: Store, hosts: list[Host]) -> tuple[list[Host], list[tuple[Host, str]]]:
    usable, refused = [], []
    for h in hosts:
        st = store.host_state(h.name)
        if st["state"] in OUT_OF_SERVICE:
            why = f"{st['state']}" + (f": {st['state_reason']}" if st["state_reason"] else "")
            refused.append((h, why))
        else:
            usable.append(h)
    return usable, refused


def needs_health_check(store: Store, host: Host) -> bool:
    return store.host_state(host.name)["state"] == "unknown"


def record_job(store: Store, host: str, job: dict[str, Any]) -> None:
    """After any job: count infrastructure errors; LAVA-style, an infra error forces a health check."""
    st = store.host_state(host)
    if job["status"] in INFRA_STATUSES:
        streak = st["infra_streak"] + 1
        why = (job.get("log_tail") or "").strip().splitlines()[:1]
        if streak >= quarantine_after():
            store.set_host_state(host, "quarantined", f"{streak} infrastructure errors in a row"
                                 + (f"; last: {why[0][:160]}" if why else ""), streak)
        elif st["state"] not in OUT_OF_SERVICE:
            store.set_host_state(host, "unknown", "infrastructure error: health check before the next job", streak)
        else:
            store.set_host_state(host, st["state"], st["state_reason"], streak)
    elif st["infra_streak"] and st["state"] not in OUT_OF_SERVICE:
        store.set_host_state(host, st["state"], st["state_reason"], 0)


def record_health(store: Store, host: str, job: dict[str, Any]) -> bool:
    """A health job's verdict; returns whether the host may take jobs."""
    if job["status"] in INFRA_STATUSES:
        record_job(store, host, job)
        return False
    failed = [t["name"] for t in job.get("tests", []) if t["outcome"] in ("failed", "error")]
    if job["status"] in ("passed", "no_tests") and not failed:
        store.set_host_state(host, "good", "health check passed", 0)
        return True
    reason = f"health check failed: {', '.join(failed) or job['status']}"
    store.set_host_state(host, "bad", reason, 0)
    return False
