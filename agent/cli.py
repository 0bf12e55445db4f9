"""``agent``: the farm-host side. Probe facts, run probes through a driver, serve a worker queue."""

from __future__ import annotations

import os
import socket
import sys

import click

MAX_CPUID_DUMP = 8 << 20


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pmufarm", message="%(prog)s (pmufarm) %(version)s")
def main() -> None:
    """pmufarm agent: runs on every farm host."""


@main.command()
@click.option("--cpuid-dump", type=click.Path(dir_okay=False), help="Decode a CPUID dump (`cpuid -r` or "
              "'leaf subleaf eax ebx ecx edx' lines) instead of this CPU.")
def probe(cpuid_dump: str | None) -> None:
    """Print this host's facts (CPU, PMU, KVM, kernel, mediated-vPMU verdict) as JSON."""
    from agent.facts import probe_main

    if cpuid_dump:
        # A dump is a few KiB (`cpuid -r` of a 512-CPU box is ~2 MiB): refuse a wrong file before reading it whole.
        size = os.path.getsize(cpuid_dump) if os.path.exists(cpuid_dump) else 0
        if size > MAX_CPUID_DUMP:
            raise click.BadParameter(f"{cpuid_dump}: {size} bytes is not a CPUID dump (limit "
                                     f"{MAX_CPUID_DUMP >> 20} MiB)", param_hint="--cpuid-dump")
    sys.exit(probe_main(cpuid_dump, True))


@main.command("list")
def list_probes() -> None:
    """List the probes of the harness protocol."""
    from agent.protocol import PROBES

    for spec in PROBES.values():
        click.echo(f"{spec.name:22} {'pmu ' if spec.needs_pmu else 'none'} {spec.summary}")


@main.command()
@click.argument("probe_name")
@click.argument("args", nargs=-1)
@click.option("--driver", type=click.Choice(["kvm", "model", "emulated"]), default="kvm", show_default=True)
@click.option("--uarch", help="Microarchitecture id of a simulated host (driver model).")
@click.option("--layout", help="Register layout of the emulated PMU (driver emulated: intel, intel-v5, amd).")
@click.option("--fault", "faults", multiple=True, help="Inject a named fault (drivers model and emulated).")
def run(probe_name: str, args: tuple[str, ...], driver: str, uarch: str | None, layout: str | None,
        faults: tuple[str, ...]) -> None:
    """Run PROBE with k=v arguments through a driver; print one JSON object (exit 0 ok, 4 unsupported, 1 error)."""
    from agent.drivers import make_driver
    from agent.tasks import host_facts

    host: dict = {"name": "cli", "driver": driver}
    if driver == "model":
        if not uarch:
            raise click.UsageError("--driver model needs --uarch (see inventory/microarch.yaml)")
        host["model"] = {"uarch": uarch, "faults": list(faults)}
    elif driver == "emulated":
        if not layout:
            raise click.UsageError("--driver emulated needs --layout (see inventory/emulated.yaml)")
        host["emulated"] = {"layout": layout, "faults": list(faults)}
    try:
        params = dict(a.split("=", 1) for a in args)
    except ValueError:
        raise click.UsageError(f"arguments must be k=v, got {' '.join(args)!r}") from None
    try:
        facts = host_facts(host)
        result = make_driver(host, facts).run(probe_name, **params)
    except ValueError as exc:
        click.echo(f"agent run: {exc}", err=True)
        sys.exit(2)
    click.echo(result.to_json())
    sys.exit(result.exit_code)


@main.command()
@click.option("--host", "hosts", multiple=True, required=True,
              help="Inventory host name(s) this worker serves; each gets queue host.<name>.")
@click.option("--concurrency", "-c", default=1, show_default=True,
              help="Prefork processes. 1 per real host: suites own the PMU.")
@click.option("--publish-facts/--no-publish-facts", default=True, show_default=True,
              help="Publish this machine's facts for the host (off for workers serving simulated hosts).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--events", "-E", is_flag=True, help="Send task events (for `celery events` and Flower).")
def worker(hosts: tuple[str, ...], concurrency: int, publish_facts: bool, loglevel: str, events: bool) -> None:
    """Serve the farm queue of HOST (needs FARM_BROKER_URL); heartbeats every FARM_HEARTBEAT_INTERVAL s."""
    from celery import signals

    from agent import heartbeat
    from agent.celery_app import host_queue, make_app

    try:
        app = make_app()
    except RuntimeError as exc:
        raise click.UsageError(str(exc)) from None
    node = f"{hosts[0]}@{socket.gethostname()}"
    # In-flight messages under this agent's own keys, not kombu's shared "unacked" hash: with per-host broker
    # users (orchestrator broker-acl --inventory) no agent can read another host's messages.
    own = hosts[0]
    app.conf.broker_transport_options = {**(app.conf.broker_transport_options or {}), "unacked_key": f"unacked.{own}",
                                         "unacked_index_key": f"unacked_index.{own}",
                                         "unacked_mutex_key": f"unacked_mutex.{own}"}
    beat = heartbeat.Heartbeat(list(hosts), app.conf.broker_url, node)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        for h in hosts:
            heartbeat.set_busy(app.conf.broker_url, h, None)  # a previous life of this agent may have died busy
        beat.start()  # first: the local farm waits for this beat before it sends the job
        if publish_facts:
            from agent.facts import collect_facts

            for h in hosts:
                heartbeat.publish_facts(app.conf.broker_url, h, collect_facts())

    @signals.worker_process_init.connect(weak=False)
    def _child(**_: object) -> None:
        from agent.tasks import _die_with_parent

        _die_with_parent()  # a pool process must not outlive a killed worker and finish a job twice

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(**_: object) -> None:
        beat.stop_event.set()

    import agent.facts  # noqa: F401 - before the pool forks: its process then probes facts without importing them

    _restrict_remote_control()
    queues = ",".join(host_queue(h) for h in hosts)
    app.worker_main(["worker", "-Q", queues, "-n", node, "--pool", "prefork",
                     "-c", str(concurrency), "-l", loglevel, "--without-mingle", "--without-gossip",
                     *(["-E"] if events else [])])

# Read-only remote control commands an agent answers: deploy checks a worker with ping and active_queues.
REMOTE_INSPECT = ("ping", "active_queues", "active", "reserved", "scheduled", "registered", "clock")


def _restrict_remote_control() -> None:
    """Anyone holding the broker password can broadcast Celery control commands; an agent answers only the
    read-only ones above (no shutdown, no add/cancel_consumer, no revoke/terminate, no conf or memdump),
    unless FARM_REMOTE_CONTROL=1 on the agent enables them all."""
    if os.environ.get("FARM_REMOTE_CONTROL") == "1":
        return
    from celery.worker import control

    for name in [n for n in control.Panel.data if n not in REMOTE_INSPECT]:
        del control.Panel.data[name]


if __name__ == "__main__":
    main()
