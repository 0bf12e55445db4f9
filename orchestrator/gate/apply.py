"""Apply a series onto the kernel tree: ``git worktree add`` at the base, ``git am --3way`` inside it.

The user's tree is never touched beyond its worktree list: every gate works in detached worktrees
under the state directory, removed (``git worktree remove --force`` + ``prune``) when the gate ends,
whatever the outcome.

A series that does not apply is a verdict (``apply-failed``, exit 2) naming the failing patch by
index and subject, with git's own lines (conflicting files); ``git am --abort`` is run before the
worktree goes. After a successful ``git am`` the gate checks that exactly one commit per patch
landed on top of the base, so a series can never be silently half-applied.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from orchestrator.gate.common import GateError
from orchestrator.gate.series import Series

GIT_ENV = {"GIT_COMMITTER_NAME": "pmufarm gate", "GIT_COMMITTER_EMAIL": "gate@pmufarm.invalid",
           "GIT_AUTHOR_NAME": "pmufarm gate", "GIT_AUTHOR_EMAIL": "gate@pmufarm.invalid",
           "GIT_TERMINAL_PROMPT": "0"}


def git(repo: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def tree_identity(tree: Path) -> dict[str, str]:
    """Name and (https) URL of the kernel tree for reports."""
    out = {"tree": tree.resolve().name}
    url = git(tree, "config", "--get", "remote.origin.url", check=False).stdout.strip()
    if url:
        out["url"] = url
    return out


def check_tree(tree: Path) -> Path:
    if not tree.is_dir():
        raise GateError(2, "input-error", f"--tree {tree}: no such directory")
    proc = git(tree, "rev-parse", "--show-toplevel", check=False)
    if proc.returncode != 0:
        raise GateError(2, "input-error", f"--tree {tree}: not a git repository")
    return Path(proc.stdout.strip())


def resolve_base(tree: Path, series: Series, base_ref: str | None) -> tuple[str, str, list[str]]:
    """(full sha, where it came from, notes). ``--base`` wins over what the series names (its
    ``base-commit:`` trailer, or the start of a range), with a note when the two differ."""
    notes: list[str] = []
    if base_ref:
        wanted, origin = base_ref, f"--base {base_ref}"
    elif series.base_commit:
        wanted, origin = series.base_commit, series.base_origin
    else:
        raise GateError(2, "input-error", "no base: the series has no 'base-commit:' trailer "
                                          "(git format-patch --base) and --base REF was not given")
    sha = _rev(tree, wanted)
    if sha is None:
        raise GateError(2, "input-error", f"base {wanted} ({origin}) is not a commit in {tree} "
                                          "(fetch it first)")
    if base_ref and series.base_commit and not sha.startswith(series.base_commit):
        notes.append(f"--base {base_ref} ({sha[:12]}) wins over the series' {series.base_origin} "
                     f"{series.base_commit[:12]}")
    return sha, origin, notes


def _rev(tree: Path, ref: str) -> str | None:
    proc = git(tree, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


class Worktrees:
    """Detached worktrees of ``tree`` under ``root``; ``close()`` removes every one of them."""

    def __init__(self, tree: Path, root: Path) -> None:
        self.tree, self.root = tree, root
        self.paths: list[Path] = []

    def add(self, name: str, sha: str) -> Path:
        path = self.root / name
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.paths.append(path)
        proc = git(self.tree, "worktree", "add", "--detach", "--force", str(path), sha, check=False)
        if proc.returncode != 0:
            raise GateError(2, "input-error", f"git worktree add {path} {sha[:12]}: {_first_error(proc)}")
        return path

    def close(self) -> None:
        for path in self.paths:
            git(self.tree, "worktree", "remove", "--force", str(path), check=False)
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
        self.paths.clear()
        git(self.tree, "worktree", "prune", check=False)

    def __enter__(self) -> Worktrees:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.lower().startswith(("error", "fatal"))]
    return (errs or lines or [f"exit {proc.returncode}"])[0].strip()[:300]


def apply_series(worktree: Path, series: Series, base_sha: str) -> list[str]:
    """``git am --3way`` the series; returns the applied commit shas (oldest first)."""
    total = series.count
    proc = git(worktree, "am", "--3way", "--keep-cr", str(series.mbx), check=False, timeout=1800)
    if proc.returncode != 0:
        index = _failing_index(worktree, proc)
        output = (proc.stdout + proc.stderr).strip()
        git(worktree, "am", "--abort", check=False)
        if index is not None and 1 <= index <= total:
            what = series.patches[index - 1].label(total)
        else:
            what = "a patch (git am did not say which)"
        conflicts = [ln.strip() for ln in output.splitlines()
                     if re.match(r"\s*(error: patch failed|CONFLICT|error: .*does not exist|"
                                 r"error: .*does not match|Patch failed at|fatal:)", ln)]
        raise GateError(2, "apply-failed", f"series does not apply on {base_sha[:12]}: {what} failed"
                        + (f" ({conflicts[0]})" if conflicts else ""), detail=output[-3000:])
    commits = git(worktree, "rev-list", "--reverse", f"{base_sha}..HEAD").stdout.split()
    if len(commits) != total:
        raise GateError(2, "apply-failed", f"git am applied {len(commits)} commit(s) for {total} patch(es) "
                                           f"on {base_sha[:12]}: refusing to test a partly applied series")
    return commits


def _failing_index(worktree: Path, proc: subprocess.CompletedProcess[str]) -> int | None:
    """Which patch git am stopped at: rebase-apply/next, else 'Patch failed at 0002 ...'."""
    gp = git(worktree, "rev-parse", "--git-path", "rebase-apply", check=False).stdout.strip()
    if gp:
        nxt = (Path(gp) if Path(gp).is_absolute() else worktree / gp) / "next"
        try:
            return int(nxt.read_text().strip())
        except (OSError, ValueError):
            pass
    m = re.search(r"Patch failed at (\d+)", proc.stdout + proc.stderr)
    return int(m.group(1)) if m else None
