"""Agent liveness in Redis: a heartbeat per host from the worker's main process, busy state from tasks.

Keys (all in the broker's Redis):
- ``pmufarm:heartbeat`` hash: host -> {"ts", "bts", "node", "pid", "interval", "revision"}; written every
  ``FARM_HEARTBEAT_INTERVAL`` seconds by a thread of the worker's main process. A SIGSTOPped or
  killed worker stops writing, which is how the orchestrator tells a wedged host from a slow suite.
  ``bts`` is the broker's clock (Redis ``TIME``) at the beat: liveness compares only broker times,
  never the agent's wall clock with the orchestrator's (``ts`` is the agent's, for display).
- ``pmufarm:stop:<task id>``: set by the orchestrator when it gives an attempt up; the task polls it
  and kills its suite (Celery's revoke needs remote control, which agents keep off).

Why not Celery's own liveness: worker-heartbeat events and ``inspect ping`` both need the worker's
remote control / event channels, which a farm agent disables (anyone holding the broker password could
shut it down through them), and event timestamps are the worker's wall clock.
- ``pmufarm:busy`` hash: host -> {"run_id", "suite", "attempt", "since"}; set by the task itself.
- ``pmufarm:facts`` hash: host -> facts JSON, published once when the worker starts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any
from urllib.parse import unquote, urlparse

import redis

HEARTBEAT_KEY, BUSY_KEY, FACTS_KEY = "pmufarm:heartbeat", "pmufarm:busy", "pmufarm:facts"
log = logging.getLogger("pmufarm.agent")


STOP_PREFIX = "pmufarm:stop:"


def interval() -> float:
    return float(os.environ.get("FARM_HEARTBEAT_INTERVAL", "10"))


def agent_clock() -> float:
    """The agent's wall clock. FARM_TEST_CLOCK_SKEW (seconds) shifts it: the boundary a test uses to fake
    an agent whose clock disagrees with the orchestrator's. Liveness must not depend on it."""
    return time.time() + float(os.environ.get("FARM_TEST_CLOCK_SKEW", "0"))


def broker_time(client: redis.Redis) -> float:
    """The broker's clock (Redis TIME), the one clock every farm party reads alike."""
    sec, usec = client.time()
    return float(sec) + float(usec) / 1e6


def broker_now(url: str) -> float | None:
    try:
        return broker_time(_client(url))
    except redis.RedisError:
        return None


def request_stop(client: redis.Redis, task_id: str, ttl: float = 7 * 86400) -> None:
    client.set(STOP_PREFIX + task_id, "1", ex=max(int(ttl), 1))


def stop_requested(url: str, task_id: str) -> bool:
    try:
        return bool(_client(url).exists(STOP_PREFIX + task_id))
    except redis.RedisError:
        return False  # broker away: keep running, the orchestrator judges the job when it is back


_clients: dict[str, redis.Redis] = {}


def _client(url: str) -> redis.Redis:
    """One pooled client per URL and process (tasks call in often; connections are not free)."""
    if url not in _clients:
        _clients[url] = redis_from_url(url)
    return _clients[url]


def redis_from_url(url: str) -> redis.Redis:
    """A redis-py client for a Celery broker URL (redis://, rediss://, redis+socket://)."""
    if url.startswith("redis+socket://"):
        parsed = urlparse(url.replace("redis+socket://", "unix://", 1))
        return redis.Redis(unix_socket_path=parsed.path, password=unquote(parsed.password) if parsed.password else None,
                           socket_timeout=5, socket_connect_timeout=5)
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


class Heartbeat(threading.Thread):
    def __init__(self, hosts: list[str], broker_url: str, node: str) -> None:
        super().__init__(daemon=True, name="pmufarm-heartbeat")
        self.hosts, self.node = hosts, node
        self.client = redis_from_url(broker_url)
        self.stop_event = threading.Event()

    def beat(self) -> None:
        record = json.dumps({"ts": agent_clock(), "bts": broker_time(self.client), "node": self.node,
                             "pid": os.getpid(), "interval": interval(),
                             "revision": os.environ.get("PMUFARM_REVISION")})
        self.client.hset(HEARTBEAT_KEY, mapping={h: record for h in self.hosts})

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:  # broker restarting: keep trying, the orchestrator will notice
                log.warning("heartbeat: %s", exc)
            self.stop_event.wait(interval())


def publish_facts(broker_url: str, host: str, facts: dict[str, Any]) -> None:
    _client(broker_url).hset(FACTS_KEY, host, json.dumps(facts))


def set_busy(broker_url: str, host: str, job: dict[str, Any] | None) -> None:
    client = _client(broker_url)
    if job is None:
        client.hdel(BUSY_KEY, host)
    else:
        client.hset(BUSY_KEY, host, json.dumps({**job, "since": agent_clock()}))


def read_state(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """host -> {"heartbeat": {...} | None, "busy": {...} | None, "facts": {...} | None}."""
    out: dict[str, dict[str, Any]] = {}
    for key, field in ((HEARTBEAT_KEY, "heartbeat"), (BUSY_KEY, "busy"), (FACTS_KEY, "facts")):
        for host, value in client.hgetall(key).items():
            out.setdefault(host.decode(), {"heartbeat": None, "busy": None, "facts": None})[field] = json.loads(value)
    return out
