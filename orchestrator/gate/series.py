"""Series intake: an mbox file or a lore Message-ID -> an am-ready mbox, its patches and its identity.

Both paths go through b4 so the series is threaded, ordered and de-duplicated the way maintainers see
it: ``b4 --offline-mode am -m FILE -o DIR`` for a file (never touches the network), ``b4 am -o DIR
MSGID`` for a Message-ID (needs lore; when lore is unreachable the gate fails with one line, exit 2).

Identity recorded for every gate run:

* ``subject``: the cover letter's subject, else the first patch's;
* ``patches``: ``[{"index", "subject", "sha256"}]`` in application order, and their count;
* ``patchset_hash``: KCIDB's definition (kcidb doc/submitter_guide.md): sha256 over the
  newline-terminated lowercase hex sha256 of each patch, in order -- what
  ``sha256sum *.patch | cut -c-64 | sha256sum`` prints. A "patch" is one message of b4's am-ready
  mbox exactly as ``git mailsplit`` writes it for ``git am`` (headers b4 kept + body + diff, without
  the mbox ``From `` separator). Review trailers that b4 collects from replies are part of the
  message, so a series re-fetched after new ``Reviewed-by:`` lines gets a new hash (it is a new
  patch file in the KCIDB sense); the same mbox always hashes the same;
* ``base_commit``: the ``base-commit:`` trailer that ``git format-patch --base`` writes (cover
  letter or last patch), when present.

A series whose ``[PATCH n/m]`` numbering has holes is refused (b4 would hand over the patches it
has, and the gate would then test a different series than the one posted).
"""

from __future__ import annotations

import email
import email.header
import email.policy
import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.gate.common import GateError

B4_TIMEOUT = 300
BASE_RE = re.compile(rb"^base-commit:\s*([0-9a-f]{7,64})\s*$", re.MULTILINE)
NUM_RE = re.compile(r"\[[^\]]*?\b(\d+)/(\d+)\s*\]")
MSGID_RE = re.compile(r"^<?[^<>\s@/]+@[^<>\s@/]+>?$")


@dataclass
class Patch:
    index: int
    subject: str
    sha256: str
    path: Path

    def label(self, total: int) -> str:
        return f"patch {self.index}/{total} {self.subject!r}"


@dataclass
class Series:
    source: str
    mbx: Path
    subject: str
    patches: list[Patch]
    base_commit: str | None
    message_id: str | None = None
    cover: Path | None = None
    b4_log: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.patches)

    @property
    def patchset_hash(self) -> str:
        return patchset_hash([p.sha256 for p in self.patches])

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "subject": self.subject, "patch_count": self.count,
                "patchset_hash": self.patchset_hash, "base_commit": self.base_commit,
                "message_id": self.message_id,
                "patches": [{"index": p.index, "subject": p.subject, "sha256": p.sha256} for p in self.patches]}


def patchset_hash(patch_sha256s: list[str]) -> str:
    """KCIDB ``patchset_hash``: sha256 of the newline-terminated per-patch sha256 hex digests ("" if none)."""
    if not patch_sha256s:
        return ""
    return hashlib.sha256("".join(f"{h}\n" for h in patch_sha256s).encode()).hexdigest()


def b4_command() -> list[str]:
    """b4 installed next to this Python (the project's dependency), else the one on PATH."""
    beside = Path(sys.executable).parent / "b4"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("b4")
    if found:
        return [found]
    raise GateError(2, "input-error", "b4 is not installed (pip install b4, or Debian's b4 package)")


def looks_like_msgid(text: str) -> bool:
    return bool(MSGID_RE.match(text.strip()))


def _decode(value: str | None) -> str:
    if not value:
        return ""
    parts = email.header.decode_header(value)
    text = "".join(p.decode(c or "utf-8", "replace") if isinstance(p, bytes) else p for p, c in parts)
    return " ".join(text.split())


def _headers(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def intake(spec: str, workdir: Path, offline_hint: bool = False) -> Series:
    """Run b4 on ``spec`` (an mbox path or a Message-ID) into ``workdir``; raise GateError(2) on bad input."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "b4"
    path = Path(spec)
    if path.exists():
        if not path.is_file():
            raise GateError(2, "input-error", f"--series {spec}: not a file")
        path = path.resolve()
        cmd = [*b4_command(), "--offline-mode", "am", "-m", str(path), "-o", str(out)]
        what, msgid = f"mbox {path}", None
    elif looks_like_msgid(spec):
        msgid = spec.strip().strip("<>")
        cmd = [*b4_command(), "am", "-o", str(out), msgid]
        what = f"message-id {msgid}"
    else:
        raise GateError(2, "input-error", f"--series {spec!r}: no such file, and not a Message-ID (id@host)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=B4_TIMEOUT,
                              cwd=workdir)
    except subprocess.TimeoutExpired:
        raise GateError(2, "input-error", f"b4 am {what}: no answer within {B4_TIMEOUT}s "
                                          "(lore unreachable?)") from None
    log = (proc.stdout or "") + (proc.stderr or "")
    mbxs = sorted(out.glob("*.mbx")) if out.is_dir() else []
    if proc.returncode != 0 or not mbxs:
        last = _last_meaningful(log)
        if msgid is not None:
            raise GateError(2, "input-error", f"b4 am {msgid}: could not fetch the series from lore "
                                              f"({last or f'exit {proc.returncode}'}); pass an mbox file instead")
        hint = " (are the patches threaded, with Message-Ids? git format-patch --thread)" \
            if re.search(r"message-id|stdin|no messages|not found", log, re.I) else ""
        raise GateError(2, "input-error", f"b4 am {what}: {last or f'exit {proc.returncode}'}{hint}")
    if len(mbxs) > 1:
        raise GateError(2, "input-error", f"b4 am {what}: produced several series ({', '.join(m.name for m in mbxs)})")
    mbx = mbxs[0]
    covers = sorted(out.glob("*.cover"))
    cover = covers[0] if covers else None
    patches = split_patches(mbx, workdir / "patches")
    if not patches:
        raise GateError(2, "input-error", f"{what}: the series holds no patches")
    check_numbering(patches, what)
    subject = _decode(_headers(cover.read_bytes()).get("Subject")) if cover else ""
    if not subject or "*** SUBJECT HERE ***" in subject:
        subject = patches[0].subject  # no cover letter, or format-patch's placeholder left in it
    base = find_base_commit([*([cover] if cover else []), mbx, *([path] if path.exists() else [])])
    return Series(source=spec, mbx=mbx, subject=subject, patches=patches, base_commit=base, message_id=msgid,
                  cover=cover, b4_log=log)


def _last_meaningful(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not ln.startswith("Running in OFFLINE")]
    errs = [ln for ln in lines if re.search(r"error|fail|not found|unable|could not|no messages", ln, re.I)]
    return (errs or lines or [""])[-1][:200]


def split_patches(mbx: Path, outdir: Path) -> list[Patch]:
    """``git mailsplit`` the am-ready mbox; one Patch per message, hashed as git am will read it."""
    outdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["git", "mailsplit", "-o" + str(outdir), str(mbx)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GateError(2, "input-error", f"git mailsplit {mbx}: {proc.stderr.strip()[:300]}")
    patches = []
    for i, f in enumerate(sorted(p for p in outdir.iterdir() if p.name.isdigit()), 1):
        raw = f.read_bytes()
        subject = _decode(_headers(raw).get("Subject")) or f"(no subject, message {i})"
        patches.append(Patch(index=i, subject=subject, sha256=hashlib.sha256(raw).hexdigest(), path=f))
    return patches


def check_numbering(patches: list[Patch], what: str) -> None:
    nums = [NUM_RE.search(p.subject) for p in patches]
    if not all(nums):
        return  # unnumbered single patches ("[PATCH] x") are fine
    totals = {int(m.group(2)) for m in nums if m}
    have = [int(m.group(1)) for m in nums if m]
    if len(totals) != 1:
        raise GateError(2, "input-error", f"{what}: patches disagree on the series length ({sorted(totals)})")
    total = totals.pop()
    missing = [n for n in range(1, total + 1) if n not in have]
    if missing:
        raise GateError(2, "input-error", f"{what}: series incomplete: missing patch "
                                          f"{', '.join(f'{n}/{total}' for n in missing)}")


def find_base_commit(files: list[Path]) -> str | None:
    for f in files:
        try:
            m = BASE_RE.search(f.read_bytes())
        except OSError:
            continue
        if m:
            return m.group(1).decode()
    return None
