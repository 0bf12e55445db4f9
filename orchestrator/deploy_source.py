"""What ``orchestrator deploy`` ships: the project's tree at one revision and an offline wheelhouse.

Revision: ``git rev-parse HEAD`` of the source repository (or ``--rev``), shipped with ``git archive``.
A work tree with uncommitted changes is refused unless ``allow_dirty``: then the tracked and untracked
(not ignored) files are snapshotted through a temporary index (``git write-tree``; HEAD, the index and
the refs are untouched) and the revision is ``<head12>-dirty-<tree12>``, which still identifies the
content exactly, so re-deploying the same dirty tree is recognised as unchanged.

Wheelhouse: farm hosts usually have no route to PyPI. The orchestrator collects every wheel the revision
needs (its ``[project] dependencies`` plus ``[build-system] requires``) once per target interpreter,
caches it under ``<state>/wheelhouse/<key>/`` and ships only the wheels a host lacks; hosts install with
``pip install --no-index --find-links``. Same interpreter tag as the orchestrator (implementation,
major.minor, machine, and the host's glibc at least ours): ``pip wheel`` (also builds sdist-only deps);
otherwise ``pip download --only-binary=:all:`` for the host's platform tags.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class SourceError(RuntimeError):
    pass


def _git(repo: Path, *args: str, env: dict[str, str] | None = None, text: bool = True) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=text,
                       env=dict(os.environ, **(env or {})))
    if r.returncode != 0:
        err = r.stderr if text else r.stderr.decode(errors="replace")
        raise SourceError(f"git {' '.join(args[:2])}: {err.strip().splitlines()[-1] if err.strip() else r.returncode}")
    return r.stdout.strip() if text else r.stdout


@dataclass(frozen=True)
class Revision:
    repo: Path
    treeish: str   # what git archive ships: a commit or a tree id
    name: str      # the deployed revision as hosts report it

    def archive(self) -> bytes:
        """``git archive`` of the revision as a gzip'd tar (bytes)."""
        r = subprocess.run(["git", "-C", str(self.repo), "archive", "--format=tar.gz", self.treeish],
                           capture_output=True)
        if r.returncode != 0:
            raise SourceError(f"git archive {self.treeish}: {r.stderr.decode(errors='replace').strip()}")
        return r.stdout

    def read(self, path: str) -> str | None:
        try:
            return _git(self.repo, "show", f"{self.treeish}:{path}")
        except SourceError:
            return None

    def has(self, path: str) -> bool:
        try:
            _git(self.repo, "cat-file", "-e", f"{self.treeish}:{path}")
            return True
        except SourceError:
            return False


def resolve_revision(repo: Path, rev: str | None = None, allow_dirty: bool = False) -> Revision:
    try:
        top = Path(_git(repo, "rev-parse", "--show-toplevel"))
    except SourceError as exc:
        raise SourceError(f"{repo}: not a git work tree ({exc})") from None
    if rev:
        commit = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
        return Revision(repo, commit, commit)
    try:
        head: str | None = _git(repo, "rev-parse", "--verify", "HEAD^{commit}")
    except SourceError:
        head = None
    dirty = head is None or bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    if not dirty:
        return Revision(repo, head, head)  # type: ignore[arg-type]
    if not allow_dirty:
        why = "has no commit yet" if head is None else "has uncommitted changes"
        raise SourceError(f"{top} {why}: commit first, pass --rev, or --allow-dirty to ship a snapshot")
    with tempfile.TemporaryDirectory() as tmp:
        index = os.path.join(tmp, "index")
        env = {"GIT_INDEX_FILE": index}
        if head:
            _git(repo, "read-tree", head, env=env)
        _git(repo, "add", "-A", ".", env=env)
        tree = _git(repo, "write-tree", env=env)
    return Revision(repo, tree, f"{(head or 'nohead')[:12]}-dirty-{tree[:12]}")


# ---------------------------------------------------------------- requirements and wheelhouse

def requirements(rev: Revision) -> list[str]:
    """``[project] dependencies`` + ``[build-system] requires`` of the revision's pyproject.toml."""
    text = rev.read("pyproject.toml")
    if text is None:
        raise SourceError(f"revision {rev.name} has no pyproject.toml")
    data = tomllib.loads(text)
    reqs = list(data.get("project", {}).get("dependencies", []))
    reqs += list(data.get("build-system", {}).get("requires", []))
    return reqs


@dataclass(frozen=True)
class Interp:
    """A Python interpreter's install target: implementation, X.Y, machine, glibc version."""
    impl: str
    version: str
    machine: str
    glibc: str

    @classmethod
    def local(cls) -> Interp:
        lib, ver = platform.libc_ver()
        return cls(sys.implementation.name, f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine(),
                   ver if lib == "glibc" else "")

    @classmethod
    def parse(cls, line: str) -> Interp:
        m = re.fullmatch(r"(\w+) (\d+\.\d+) (\S+)(?: (\S*))?", line.strip())
        if not m:
            raise SourceError(f"cannot parse the host's Python description {line!r}")
        return cls(m[1], m[2], m[3], m[4] or "")

    @property
    def tag(self) -> str:
        return f"{self.impl}{self.version.replace('.', '')}-{self.machine}-glibc{self.glibc or 'none'}"

    def served_by_local(self) -> bool:
        """Wheels built here install there (same tag; the host's glibc is not older than ours)."""
        here = Interp.local()
        if (self.impl, self.version, self.machine) != (here.impl, here.version, here.machine):
            return False
        return _ver(self.glibc) >= _ver(here.glibc) if here.glibc else True


# The remote one-liner that prints what Interp.parse reads.
INTERP_PROBE = ("import sys,platform;l=platform.libc_ver();print(sys.implementation.name,"
                "'%d.%d'%sys.version_info[:2],platform.machine(),l[1] if l[0]=='glibc' else '')")


def _ver(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (0,)


def wheelhouse(state_dir: Path, reqs: list[str], target: Interp, log: Callable[[str], None] = print) -> Path:
    """The cached wheelhouse for ``reqs`` on ``target`` (built on first use; safe to share across threads
    only after it exists: callers serialise the first build)."""
    key = hashlib.sha256(json.dumps([sorted(reqs), target.tag]).encode()).hexdigest()[:16]
    out = state_dir / "wheelhouse" / f"{target.tag}-{key}"
    if (out / ".complete").exists():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=".wh-", dir=state_dir))
    try:
        if target.served_by_local():
            log(f"building wheelhouse for {target.tag} (pip wheel, {len(reqs)} requirements)")
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(tmp), *reqs]
        else:
            log(f"downloading wheelhouse for {target.tag} (pip download --only-binary)")
            glibc = target.glibc.replace(".", "_") or "2_17"
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--dest", str(tmp), "--only-binary=:all:",
                   "--python-version", target.version, "--implementation", "cp" if target.impl == "cpython" else "py",
                   "--platform", f"manylinux_{glibc}_{target.machine}", "--platform", f"manylinux2014_{target.machine}",
                   "--platform", "any", *reqs]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise SourceError(f"wheelhouse for {target.tag} failed: {' / '.join(tail)}")
        (tmp / ".complete").write_text(json.dumps({"requirements": reqs, "target": target.tag}))
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race; its copy is equally good
            if not (out / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return out


def wheel_files(house: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(house.glob("*.whl"))}


def tar_members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        return tf.getnames()
