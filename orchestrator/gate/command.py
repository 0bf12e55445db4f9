"""``orchestrator gate``: does this patch series regress PMU virtualization on any CPU model?

Registered by ``orchestrator/cli.py`` with ``main.add_command(gate)``; until then
``python -m orchestrator.gate gate ...`` runs the same command under the same group options.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from orchestrator.gate.build import DEFAULT_BUILD_CMD
from orchestrator.gate.run import GateOptions, run_gate

EXIT_HELP = """Exit status: 0 pass, 1 regression, 2 input / apply-failed / build-failed, 3 inconclusive
(infrastructure). gate.md, gate.json, the series mbox, build logs and the candidate run's JUnit/KCIDB
reports are written to --out."""


def _state(ctx: click.Context) -> tuple[Path, Path, Any]:
    obj = ctx.obj
    if obj is not None and hasattr(obj, "state_dir"):
        return obj.state_dir, obj.reports_dir, obj.store
    from orchestrator.store import Store

    base = os.environ.get("FARM_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME", os.path.expanduser("~/.local/state")), "pmufarm")
    state = Path(base)
    return state, Path("reports"), Store(state / "pmufarm.sqlite")


@click.command(epilog=EXIT_HELP)
@click.option("--series", "series", multiple=True, metavar="MBOX|PATCH|DIR|MESSAGE-ID|BASE..HEAD",
              help="The series: an mbox or patch file(s) (repeatable; extra paths after the options count too), "
                   "a directory of git format-patch output, a lore Message-ID (b4, needs the network) or a git "
                   "range of --tree.")
@click.option("--range", "git_range", metavar="BASE..HEAD", help="The series as a git range of --tree.")
@click.option("--base", metavar="REF", help="Base commit; wins over the series' 'base-commit:' trailer.")
@click.option("--tree", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The kernel git tree (worktrees are made in the state dir; the tree itself is not touched).")
@click.option("--build-cmd", default=DEFAULT_BUILD_CMD, show_default=True, help="Run with bash -c in the worktree.")
@click.option("--build-timeout", default=7200.0, show_default=True, help="Seconds per build.")
@click.option("--inventory", default="inventory/local.yaml", show_default=True, help="Inventory file or directory.")
@click.option("--hosts", help="Comma-separated host names.")
@click.option("--select", multiple=True, metavar="KEY=VALUE", help="Match labels and probed facts (repeatable).")
@click.option("--suite", "suites", multiple=True, help="Suite(s) to run (default: every suite of the tree).")
@click.option("--reruns", default=2, show_default=True, help="Re-run a newly failing test up to N times (flakes).")
@click.option("--known-issues", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML list of {test: glob, uarch: glob?, reason}: expected breakages, not counted.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory [default: <reports-dir>/<gate-id>].")
@click.option("--timeout", default=1800.0, show_default=True, help="Hard limit per suite run, seconds.")
@click.option("--expires", default=600.0, show_default=True, help="Drop a job no agent took after this many seconds.")
@click.option("--provision-timeout", default=900.0, show_default=True,
              help="kexec/reboot hosts: seconds for the agent to come back on the new kernel.")
@click.option("--known-hosts", "known_hosts", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="kexec/reboot hosts: known_hosts file(s) their SSH host keys must be in "
                   "[default ~/.ssh/known_hosts]; unknown keys are refused.")
@click.option("--identity", "identities", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="kexec/reboot hosts: SSH private key file(s) [default: ssh-agent and ~/.ssh keys].")
@click.option("--fresh-baseline", is_flag=True, help="Always run the baseline, never reuse stored results.")
@click.option("--no-bisect", is_flag=True,
              help="On a regression, do not look for the first bad patch of a multi-patch series.")
@click.argument("more_series", nargs=-1, metavar="[PATCH]...", type=click.Path(path_type=str))
@click.pass_context
def gate(ctx: click.Context, series: tuple[str, ...], git_range: str | None, more_series: tuple[str, ...],
         base: str | None, tree: Path, build_cmd: str, build_timeout: float,
         inventory: str, hosts: str | None, select: tuple[str, ...], suites: tuple[str, ...], reruns: int,
         known_issues: Path | None, out: Path | None, timeout: float, expires: float, provision_timeout: float,
         known_hosts: tuple[Path, ...], identities: tuple[str, ...], fresh_baseline: bool,
         no_bisect: bool) -> None:
    """Test a patch series against its base on every selected CPU model; exit 0/1/2/3.

    `--series out/*.patch` works as the shell expands it: the paths after the first are taken as more
    patch files of the same series."""
    specs = [*series, *more_series, *([git_range] if git_range else [])]
    if not specs or (git_range and (series or more_series)):
        click.echo("orchestrator: gate: give the series once: --series (files, a directory, a Message-ID, "
                   "BASE..HEAD) or --range BASE..HEAD", err=True)
        sys.exit(2)
    state_dir, reports_dir, store = _state(ctx)
    opts = GateOptions(series=specs, tree=tree, bisect=not no_bisect, known_hosts=known_hosts,
                       identities=identities, base=base, build_cmd=build_cmd,
                       build_timeout=build_timeout,
                       inventory=inventory, hosts=hosts, select=select, suites=suites, reruns=reruns,
                       known_issues=known_issues, out=out, timeout=timeout, expires=expires,
                       provision_timeout=provision_timeout, fresh_baseline=fresh_baseline)
    try:
        result = run_gate(opts, store, state_dir, reports_dir, click.echo)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: worktrees removed, local farm stopped", err=True)
        sys.exit(130)
    r = result.report
    line = f"gate: {result.verdict.upper()} (exit {result.exit_code})"
    if r.get("message"):
        line += f": {r['message']}"
    if result.exit_code in (0, 1):
        click.echo(line)
        regressions = [i for i in r.get("items") or [] if i["category"] == "regression"]
        for item in regressions[:20]:
            click.echo(f"  regression: {item['nodeid']} on {item['host_class']} "
                       f"({item['baseline']} -> {item['candidate']})")
        if len(regressions) > 20:
            click.echo(f"  ... and {len(regressions) - 20} more in gate.md")
        bad = (r.get("bisect") or {}).get("first_bad")
        if bad:
            click.echo(f"first bad patch: {bad['index']}/{r['series']['patch_count']} {bad['subject']!r} "
                       f"(breaks {', '.join(bad['tests'])})")
        elif r.get("bisect"):
            click.echo(f"bisect: {r['bisect']['message']}")
    else:
        click.echo(f"orchestrator: {line}", err=True)
    click.echo(f"report: {result.out / 'gate.md'}")
    sys.exit(result.exit_code)
