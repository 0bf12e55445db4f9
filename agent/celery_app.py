"""The one Celery app of the farm, shared by agents (workers) and the orchestrator (dispatch).

Configured from the environment:
- ``FARM_BROKER_URL``: ``redis://``, ``rediss://`` or ``redis+socket://`` (required).
- ``FARM_RESULT_BACKEND``: defaults to the broker URL.
- ``FARM_TASK_TIME_LIMIT``: hard limit in seconds (default 6 h); the soft limit is 60 s less.
- ``FARM_VISIBILITY_TIMEOUT``: Redis visibility timeout (default 1 h).

Long-task setting (stack.md §1.3): option (a), early ack + ``worker_disable_prefetch``.
With ``acks_late`` a suite longer than the visibility timeout is redelivered and runs again, in a
loop (celery#5935); suites touch hardware state and their results must land exactly once, so the
message is acked on receipt and only fetched when the single prefork process is free. A run lost to a
crash is detected and resubmitted by the orchestrator with attempt+1, which keeps retries in one
place that knows the job's history.
"""

from __future__ import annotations

import os

from celery import Celery

RUN_SUITE = "pmufarm.run_suite"
PROBE_FACTS = "pmufarm.probe_facts"


def host_queue(name: str) -> str:
    return f"host.{name}"


def make_app(broker_url: str | None = None, backend_url: str | None = None) -> Celery:
    broker = broker_url or os.environ.get("FARM_BROKER_URL")
    if not broker:
        raise RuntimeError("FARM_BROKER_URL is not set (redis://, rediss:// or redis+socket://)")
    # "redis+socket://" also names Celery's Redis result backend over a unix socket.
    backend = backend_url or os.environ.get("FARM_RESULT_BACKEND") or broker
    hard = int(os.environ.get("FARM_TASK_TIME_LIMIT", 6 * 3600))
    visibility = int(os.environ.get("FARM_VISIBILITY_TIMEOUT", 3600))
    app = Celery("pmufarm", broker=broker, backend=backend, include=["agent.tasks"])
    transport = {"visibility_timeout": visibility}
    if "FARM_UNACKED_RESTORE_INTERVAL" in os.environ:
        # Lets the exactly-once test shrink kombu's restore cadence next to a short visibility timeout.
        interval = float(os.environ["FARM_UNACKED_RESTORE_INTERVAL"])
        transport |= {"unacked_restore_interval": interval, "unacked_restore_throttle": interval}
    app.conf.update(
        task_acks_late=False,
        worker_disable_prefetch=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_extended=True,
        result_expires=7 * 86400,
        task_time_limit=hard,
        task_soft_time_limit=max(hard - 60, 1),
        worker_soft_shutdown_timeout=10,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # A broker restart mid-run must not lose a finished suite's result.
        result_backend_always_retry=True,
        result_backend_max_retries=30,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # A "task-sent" event when the orchestrator queues a job: `celery events` and Flower show a job
        # before an agent takes it (and one for a host with no agent at all). Workers send the rest
        # when started with `agent worker -E`.
        task_send_sent_event=True,
    )
    _setup_signing(app)
    return app


def _setup_signing(app: Celery) -> None:
    """Optional Celery message signing (stack.md §1.9): every side, orchestrator too, needs a key and cert."""
    key, cert, store = (os.environ.get(k) for k in
                        ("FARM_SECURITY_KEY", "FARM_SECURITY_CERTIFICATE", "FARM_SECURITY_CERT_STORE"))
    if not (key or cert or store):
        return
    if not (key and cert and store):
        raise RuntimeError("message signing needs FARM_SECURITY_KEY, FARM_SECURITY_CERTIFICATE and "
                           "FARM_SECURITY_CERT_STORE")
    # accept_content must be exactly ["auth"]: setup_security() refuses a mix.
    app.conf.update(task_serializer="auth", accept_content=["auth"], result_serializer="json",
                    result_accept_content=["json"], security_key=key, security_certificate=cert,
                    security_cert_store=store, security_digest="sha256")
    app.setup_security()


def __getattr__(name: str) -> Celery:
    """``celery -A agent.celery_app inspect ping`` (and ``events``, Flower) load ``app`` from here: built on
    first use from FARM_BROKER_URL, so importing this module needs no broker."""
    if name == "app":
        globals()["app"] = built = make_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
