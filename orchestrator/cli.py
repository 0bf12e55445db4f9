"""``orchestrator``: submit suites to the farm, follow runs, render reports."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator.runner import (
    EXIT_FAIL,
    EXIT_INFRA,
    EXIT_INPUT,
    EXIT_OK,
    RunError,
    RunOptions,
    execute_run,
    job_exit_code,
    resume_run,
    write_run_reports,
)

if TYPE_CHECKING:  # imported where used: `orchestrator --help` should not pay for pydantic
    from orchestrator.inventory import Host
    from orchestrator.store import Store

DEFAULT_INVENTORY = "inventory/local.yaml"


def default_state_dir() -> Path:
    base = os.environ.get("FARM_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME", os.path.expanduser("~/.local/state")), "pmufarm")
    return Path(base)


class Ctx:
    def __init__(self, state_dir: Path, reports_dir: Path) -> None:
        self.state_dir, self.reports_dir = state_dir, reports_dir
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            from orchestrator.store import Store

            self._store = Store(self.state_dir / "pmufarm.sqlite")
        return self._store


def fail(code: int, message: str) -> None:
    click.echo(f"orchestrator: {message}", err=True)
    sys.exit(code)


class LazyGroup(click.Group):
    """Subcommands with heavy modules (gate, deploy, broker) are imported only when run or asked for their
    own help: `orchestrator --help` and `submit` do not pay for them, and a broken one breaks only itself."""

    lazy: dict[str, tuple[str, str, str]] = {  # name -> (module, attribute, short help shown by --help)
        "broker-acl": ("orchestrator.broker", "broker_acl", "Generate a farm broker password: Redis ACL (default "
                       "user off, user 'farm') and the URL file."),
        "deploy": ("orchestrator.deploy", "deploy", "Install the agent at this revision on farm hosts and start "
                   "their workers (SSH, in parallel)."),
        "gate": ("orchestrator.gate", "gate", "Test a patch series against its base on every selected CPU model; "
                 "exit 0/1/2/3."),
    }

    def invoke(self, ctx: click.Context) -> Any:
        """A store that cannot be opened or written is one line and exit 3 for every command, never a traceback."""
        import sqlite3

        from orchestrator.store import StoreError, describe_error

        try:
            return super().invoke(ctx)
        except StoreError as exc:
            fail(EXIT_INFRA, str(exc))
        except sqlite3.Error as exc:
            obj = ctx.find_object(Ctx)
            path = obj.state_dir / "pmufarm.sqlite" if obj else Path("pmufarm.sqlite")
            fail(EXIT_INFRA, describe_error(path, exc) + " (an unfinished run stays 'running' and resumable)")

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attr, _ = self.lazy[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from click.utils import make_default_short_help

        rows = []
        width = formatter.width - 6 - max(map(len, self.list_commands(ctx)))
        for name in self.list_commands(ctx):
            if name in self.lazy and name not in self.commands:
                rows.append((name, make_default_short_help(self.lazy[name][2], width)))
            elif (cmd := super().get_command(ctx, name)) is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pmufarm", message="%(prog)s (pmufarm) %(version)s")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Store, private Redis and logs [env FARM_STATE_DIR; default ~/.local/state/pmufarm].")
@click.option("--reports-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True)
@click.pass_context
def main(ctx: click.Context, state_dir: Path | None, reports_dir: Path) -> None:
    """pmufarm: validate the KVM mediated vPMU across a farm of hosts."""
    ctx.obj = Ctx(state_dir or default_state_dir(), reports_dir)


def _load_hosts(inventory: str, hosts: str | None, select: tuple[str, ...], ctx: Ctx) -> list[Host]:
    from orchestrator.inventory import InventoryError, load_inventory, parse_select, select_hosts

    try:
        inv = load_inventory(inventory)
        wanted = parse_select(select)
        chosen = select_hosts(inv, hosts, wanted, facts_for=lambda hs: _flat_facts_for(hs, ctx))
    except InventoryError as exc:
        fail(EXIT_INPUT, str(exc))
    if not chosen:
        fail(EXIT_INPUT, f"no host of {inventory} matches --hosts/--select")
    return chosen


def _flat_facts_for(hosts: list[Host], ctx: Ctx) -> dict[str, dict[str, Any]]:
    """Facts for --select: probed locally for local and simulated hosts, else the last stored probe."""
    from agent.facts import flat_facts
    from agent.tasks import host_facts

    stored = ctx.store.host_facts()
    out = {}
    for h in hosts:
        if h.driver == "model" or h.address == "local":
            facts = host_facts(h.entry())
            ctx.store.record_facts(h.name, facts)
        elif h.name in stored:
            facts = stored[h.name]["facts"]
        else:
            continue
        out[h.name] = flat_facts(facts)
    return out


def _check_suites(suites: tuple[str, ...]) -> list[str]:
    from agent.suites import SuiteRefused, resolve_suite  # not agent.tasks: no Celery import yet

    names: list[str] = []
    for s in suites:
        try:
            name, path = resolve_suite(s)
        except SuiteRefused as exc:
            fail(EXIT_INPUT, str(exc))
        if not any(path.rglob("test_*.py")) and not any(path.rglob("*_test.py")):
            fail(EXIT_INPUT, f"suite {s!r}: no test files (test_*.py) under {path}; an empty suite proves nothing")
        if name not in names:
            names.append(name)
    return names


def seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """A duration option: finite and > 0 (a NaN or negative bound would be charged to the hosts as lost jobs)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value:g} is not a positive number of seconds")
    return value


@main.command()
@click.argument("suites", nargs=-1, required=True)
@click.option("--inventory", default=DEFAULT_INVENTORY, show_default=True, help="Inventory file or directory.")
@click.option("--hosts", help="Comma-separated host names.")
@click.option("--select", multiple=True, metavar="KEY=VALUE", help="Match labels and probed facts (repeatable).")
@click.option("--timeout", default=1800.0, show_default=True, callback=seconds,
              help="Hard limit per suite run, seconds.")
@click.option("--expires", default=600.0, show_default=True, callback=seconds,
              help="Drop a job no agent has taken after this many seconds (a dead host).")
@click.option("--no-wait", is_flag=True, help="Print the run id and return (needs FARM_BROKER_URL).")
@click.pass_obj
def submit(ctx: Ctx, suites: tuple[str, ...], inventory: str, hosts: str | None, select: tuple[str, ...],
           timeout: float, expires: float, no_wait: bool) -> None:
    """Run SUITES such as suites/isolation on the selected hosts; write reports/<run-id>/."""
    names = _check_suites(suites)
    chosen = _load_hosts(inventory, hosts, select, ctx)
    opts = RunOptions(timeout=timeout, expires=expires, no_wait=no_wait)
    _terminate_like_ctrl_c()
    try:
        run_id = execute_run(ctx.store, ctx.state_dir, chosen, names, str(inventory), opts, click.echo)
    except RunError as exc:
        fail(exc.code, str(exc))
    except KeyboardInterrupt:
        click.echo("\ninterrupted: the run is left as 'interrupted'; the local farm was stopped", err=True)
        sys.exit(130)
    if no_wait:
        click.echo(run_id)
        return
    sys.exit(_write_and_summarise(ctx, run_id))


def _terminate_like_ctrl_c() -> None:
    """SIGTERM/SIGHUP (a CI job cancelled, a closed terminal) clean up like Ctrl-C: run marked, farm stopped."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def _write_and_summarise(ctx: Ctx, run_id: str) -> int:
    try:
        paths, jobs = write_run_reports(ctx.store, run_id, ctx.reports_dir)
    except RunError as exc:
        fail(exc.code, str(exc))
    except OSError as exc:  # the results are safe in the store; only their rendering failed
        fail(EXIT_INFRA, f"run {run_id}: cannot write reports under {ctx.reports_dir}: {exc.strerror or exc} "
                         f"({exc.filename}); the results are stored: `orchestrator report {run_id}` writes them")
    from orchestrator.reports.naming import not_tested_reason
    from orchestrator.reports.summary import verdict

    counts = _counts([t for j in jobs for t in j["tests"]])
    click.echo(f"run {run_id}: {verdict(jobs)[0]}: "
               + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test results"))
    for j in jobs:
        if j["status"] in ("infra_error", "timeout", "error"):
            click.echo(f"  {j['host']} {j['suite']}: {j['status']}: {(j['log_tail'] or '').strip()[:200]}")
        elif why := not_tested_reason(j):
            click.echo(f"  {j['host']} {j['suite']}: not tested here: {why}")
    click.echo(f"reports: {paths.get('summary', ctx.reports_dir / run_id)}")
    return job_exit_code(jobs)


@main.command()
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of the table.")
@click.pass_obj
def runs(ctx: Ctx, limit: int, as_json: bool) -> None:
    """List recent runs."""
    if as_json:
        click.echo(json.dumps([{**r, "counts": ctx.store.counts(r["id"])} for r in ctx.store.runs(limit)],
                              indent=2, default=str))
        return
    for r in ctx.store.runs(limit):
        counts = ctx.store.counts(r["id"])
        click.echo(f"{r['id']}  {r['status']:<11} {','.join(r['suites']):<24} "
                   + " ".join(f"{k}={n}" for k, n in sorted(counts.items())))


@main.command()
@click.argument("run_id", required=False)
@click.option("--wait", is_flag=True, help="Follow an unfinished run to its end (after an orchestrator restart).")
@click.option("--json", "as_json", is_flag=True, help="The run and its jobs as JSON instead of the table.")
@click.pass_obj
def status(ctx: Ctx, run_id: str | None, wait: bool, as_json: bool) -> None:
    """Show a run's jobs (default: the latest run); picks an unfinished run up again from the store."""
    run_id = run_id or ctx.store.latest_run_id()
    run = ctx.store.run(run_id) if run_id else None
    if not run:
        fail(EXIT_INPUT, f"no run {run_id!r} in {ctx.store.path}" if run_id else "no runs yet")
    assert run is not None and run_id is not None
    if run["status"] == "running":
        try:
            if resume_run(ctx.store, run_id, wait, echo=click.echo):
                _write_and_summarise(ctx, run_id)
        except RunError as exc:
            fail(exc.code, str(exc))
        run = ctx.store.run(run_id) or run
    jobs = ctx.store.jobs(run["id"])
    if as_json:
        from orchestrator.reports.naming import not_tested_reason

        click.echo(json.dumps({**run, "jobs": [
            {k: j.get(k) for k in ("host", "suite", "attempt", "status", "started", "finished", "exit_code")}
            | {"counts": _counts(j["tests"]), "not_tested": not_tested_reason(j)} for j in jobs]},
            indent=2, default=str))
    else:
        click.echo(f"run {run['id']} ({run['status']}), suites {', '.join(run['suites'])}")
    for j in [] if as_json else jobs:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(_counts(j["tests"]).items()))
        click.echo(f"  {j['host']:<20} {j['suite']:<12} attempt {j['attempt']}  {j['status']:<11} {counts}")
    sys.exit(status_exit_code(run["status"], [j for j in jobs if j["suite"] != "health"]))


def status_exit_code(run_status: str, jobs: list[dict[str, Any]]) -> int:
    """`status` exits as `submit` did: a finished run by its jobs; an interrupted or broken one is never 0
    (it found failures: 1, else 3); a run still going is 0 (`--no-wait` printed its id with 0 too)."""
    if run_status == "running":
        return EXIT_OK
    code = job_exit_code(jobs)
    return code if run_status == "done" or code == EXIT_FAIL else EXIT_INFRA


def _counts(tests: list[dict[str, Any]]) -> dict[str, int]:
    from orchestrator.dispatch import outcome_counts

    return outcome_counts(tests)


@main.command()
@click.argument("run_id")
@click.pass_obj
def report(ctx: Ctx, run_id: str) -> None:
    """Render reports/<RUN_ID>/ again from the store."""
    if not ctx.store.run(run_id):
        fail(EXIT_INPUT, f"no run {run_id!r} in {ctx.store.path}")
    sys.exit(_write_and_summarise(ctx, run_id))


@main.command()
@click.option("--inventory", default=DEFAULT_INVENTORY, show_default=True)
@click.option("--probe", is_flag=True, help="Probe local and simulated hosts now instead of showing stored facts.")
@click.option("--release", "release", metavar="NAME", help="Return a quarantined/bad/maintenance host to service.")
@click.option("--maintenance", "maintenance", metavar="NAME", help="Take a host out of service by hand.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def hosts(ctx: Ctx, inventory: str, probe: bool, release: str | None, maintenance: str | None, as_json: bool) -> None:
    """Hosts with state (online, busy, offline, quarantined, maintenance, bad), last seen, facts and verdict."""
    from orchestrator.inventory import InventoryError, load_inventory

    try:
        inv = load_inventory(inventory)
    except InventoryError as exc:
        fail(EXIT_INPUT, str(exc))
    names = {h.name for h in inv}
    for name, state, why in ((release, "unknown", "released by hand: health check before the next job"),
                             (maintenance, "maintenance", "set by hand")):
        if name:
            if name not in names:
                fail(EXIT_INPUT, f"--{'release' if state == 'unknown' else 'maintenance'}: unknown host {name!r} "
                                 f"(inventory {inventory} has: {', '.join(sorted(names))})")
            ctx.store.set_host_state(name, state, why, 0)
            click.echo(f"host {name}: {state} ({why})")
    if release or maintenance:
        return
    if probe:
        _flat_facts_for([h for h in inv if h.driver == "model" or h.address == "local"], ctx)
    rows = host_rows(ctx.store, inv)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("host", "state", "last seen", "driver", "cpu", "uarch", "mediated")
    for r in rows:
        med = r["mediated_pmu"] or "not probed"
        if r["reasons"]:
            med += ": " + "; ".join(r["reasons"])
        out_of_service = r["state"] in ("quarantined", "maintenance", "bad")
        state = r["state"] + (f" ({r['state_reason']})" if r["state_reason"] and out_of_service else "")
        t.add_row(r["name"] + (" (sim)" if r["simulated"] else ""), state, _ago(r["last_seen_s"]), r["driver"],
                  r["cpu"] or "-", r["uarch"] or "-", med)
    Console(width=200).print(t)


def host_rows(store: Store, inv: list[Host]) -> list[dict[str, Any]]:
    """One row per host: stored facts and state, merged with live heartbeats when a farm broker is set."""
    import time

    stored = store.host_facts()
    live: dict[str, dict[str, Any]] = {}
    now = time.time()
    broker = os.environ.get("FARM_BROKER_URL")
    if broker:
        from agent.heartbeat import broker_time, read_state, redis_from_url

        try:
            client = redis_from_url(broker)
            live = read_state(client)
            now = broker_time(client)  # beats carry the broker's clock: no two machines' clocks compared
        except Exception as exc:  # noqa: BLE001 - an unreachable broker still lets us show stored state
            click.echo(f"orchestrator: broker unreachable, showing stored state only: {type(exc).__name__}", err=True)
    rows = []
    for h in inv:
        st = stored.get(h.name, {})
        hb = (live.get(h.name) or {}).get("heartbeat")
        facts = (live.get(h.name) or {}).get("facts") or st.get("facts") or {}
        cpu, med = facts.get("cpu") or {}, facts.get("mediated_pmu") or {}
        age = (now - float(hb["bts"]) if "bts" in hb else time.time() - float(hb["ts"])) if hb else None
        state = st.get("state", "unknown")
        if state not in ("quarantined", "maintenance", "bad"):
            if age is None or age > 2 * float(hb.get("interval", 10)):
                state = "offline"
            else:
                state = "busy" if (live.get(h.name) or {}).get("busy") else "online"
        rows.append({"name": h.name, "address": h.address, "driver": h.driver, "state": state,
                     "state_reason": st.get("state_reason", ""), "infra_streak": st.get("infra_streak", 0),
                     "last_seen_s": age, "probed": st.get("seen"), "uarch": cpu.get("uarch"), "cpu": _cpu_id(cpu),
                     "simulated": facts.get("simulated"), "mediated_pmu": med.get("status"),
                     "reasons": med.get("reasons", []), "facts": facts})
    return rows


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _cpu_id(cpu: dict[str, Any]) -> str:
    if not cpu.get("vendor"):
        return ""
    stepping = cpu.get("stepping")
    return f"{cpu['vendor']} {cpu.get('family', 0):#x}/{cpu.get('model', 0):#x}" + (
        f"/{stepping}" if stepping is not None else "")


@main.command()
@click.option("--run", "run_id", help="Run id (default: the latest run).")
@click.option("--kernel", help="Latest run whose hosts ran this kernel release.")
@click.option("--suite", help="Only this suite.")
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json", "csv"]), default="md", show_default=True)
@click.pass_obj
def matrix(ctx: Ctx, run_id: str | None, kernel: str | None, suite: str | None, fmt: str) -> None:
    """Print the compatibility matrix: tests x microarchitectures."""
    from orchestrator.reports import build_matrix, render_matrix

    store = ctx.store
    if kernel and not run_id:
        run_id = next((r["id"] for r in store.runs(1000) if any(
            (j["facts"].get("kernel") or {}).get("release") == kernel for j in store.jobs(r["id"], False))), None)
        if not run_id:
            fail(EXIT_INPUT, f"no stored run has a host on kernel {kernel!r}")
    run_id = run_id or store.latest_run_id()
    if not run_id or not store.run(run_id):
        fail(EXIT_INPUT, f"no run {run_id!r} in {store.path}" if run_id else "no runs yet")
    assert run_id is not None
    click.echo(render_matrix(build_matrix(store.jobs(run_id), suite), fmt))


@main.command()
@click.option("--suite", "suites", multiple=True, help="Suite(s) to check (default: all).")
@click.option("--uarch", "uarchs", multiple=True, help="Simulated uarch(es) (default: all of sim.yaml).")
@click.option("--fault", "faults", multiple=True, help="Fault id(s) (default: the whole catalogue).")
@click.option("--json", "as_json", is_flag=True, help="The full result as JSON instead of the table.")
@click.pass_obj
def sensitivity(ctx: Ctx, suites: tuple[str, ...], uarchs: tuple[str, ...], faults: tuple[str, ...],
                as_json: bool) -> None:
    """Inject every fault into simulated hosts; show which tests catch it (non-zero if one is missed)."""
    from orchestrator.sensitivity import exit_code, render_table, run_sensitivity

    names = _check_suites(suites) if suites else []
    work = ctx.state_dir / "sensitivity"
    result = run_sensitivity(names or None, list(uarchs) or None, list(faults) or None, work)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else render_table(result))
    sys.exit(exit_code(result))



@main.command()
@click.option("--layout", "layouts", multiple=True, help="Emulated PMU layout(s) (default: all).")
@click.option("--probe", "probes", multiple=True, help="Probe(s) (default: the whole catalogue).")
@click.option("--all", "show_all", is_flag=True, help="Also print the declared differences.")
def crosscheck(layouts: tuple[str, ...], probes: tuple[str, ...], show_all: bool) -> None:
    """Model vs the real harness on the emulated PMU: print disagreements (non-zero if one is undeclared)."""
    from orchestrator.crosscheck import render, run_crosscheck

    try:
        result = run_crosscheck(list(layouts) or None, list(probes) or None)
    except ValueError as exc:
        fail(2, str(exc))
    click.echo(render(result, show_declared=show_all))
    sys.exit(1 if result.undeclared else 0)

if __name__ == "__main__":
    main()
