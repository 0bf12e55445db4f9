"""Series intake: every form a developer has -> an am-ready mbox, its patches and its identity.

Forms (``--series`` may be given several times; ``--range`` is the same as a range in ``--series``):

* **mbox / patch files / a directory of ``git format-patch`` output** (with or without a cover
  letter, threaded or not): every message is checked to be a patch mail (``From:`` + ``Subject:``
  headers and a diff; a leading message without a diff, or ``[PATCH 0/n]``, is the cover letter).
  When the messages are threaded (each has a ``Message-Id`` and all but the first reply to the
  thread, as ``git format-patch --thread`` or a mail client writes them), b4 takes the series
  (``b4 --offline-mode am -m``: ordering, de-duplication, trailers, never the network). Otherwise
  (plain ``git format-patch``, no Message-Ids: b4 cannot thread them) the patches go to ``git am``
  in ``[PATCH n/m]`` order, else in the order given (a directory: file-name order, which is
  format-patch's own).
* **a lore Message-ID**: ``b4 am -o DIR MSGID`` (needs lore; unreachable -> one line, exit 2).
* **a git range** ``BASE..HEAD`` of the ``--tree``: its commits as ``git format-patch`` writes them
  (merges refused), based on ``BASE`` unless ``--base`` says otherwise.

Anything else (a file that is no patch mail, a bare diff, an empty directory) is one line naming the
file, exit 2.

Identity recorded for every gate run:

* ``subject``: the cover letter's subject, else the first patch's;
* ``patches``: ``[{"index", "subject", "sha256"}]`` in application order, and their count;
* ``patchset_hash``: KCIDB's definition (kcidb doc/submitter_guide.md): sha256 over the
  newline-terminated lowercase hex sha256 of each patch, in order -- what
  ``sha256sum *.patch | cut -c-64 | sha256sum`` prints. A "patch" is one message of the am-ready
  mbox exactly as ``git mailsplit`` writes it for ``git am`` (headers + body + diff, without the
  mbox ``From `` separator). Review trailers that b4 collects from replies are part of the message,
  so a series re-fetched after new ``Reviewed-by:`` lines gets a new hash (it is a new patch file in
  the KCIDB sense); the same input always hashes the same;
* ``base_commit``: the ``base-commit:`` trailer that ``git format-patch --base`` writes (cover
  letter or last patch), or the start of a range, when present (``--base`` wins over it).

A series whose ``[PATCH n/m]`` numbering has holes is refused (the gate would otherwise test a
different series than the one posted).
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
MBOX_FROM = b"From pmufarm Mon Sep 17 00:00:00 2001\n"
BASE_RE = re.compile(rb"^base-commit:\s*([0-9a-f]{7,64})\s*$", re.MULTILINE)
NUM_RE = re.compile(r"\[[^\]]*?\b(\d+)/(\d+)\s*\]")
MSGID_RE = re.compile(r"^<?[^<>\s@/]+@[^<>\s@/]+>?$")
DIFF_RE = re.compile(rb"^(diff --git |--- \S.*\n\+\+\+ \S)", re.MULTILINE)
HEADER_RE = re.compile(rb"^(?:[!-9;-~]+:[^\n]*\n(?:[ \t][^\n]*\n)*)+\n", re.DOTALL)


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
    form: str = "b4"  # how the patches were taken: b4, git am order, git range
    base_origin: str = "base-commit: trailer of the series"

    @property
    def count(self) -> int:
        return len(self.patches)

    @property
    def patchset_hash(self) -> str:
        return patchset_hash([p.sha256 for p in self.patches])

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "form": self.form, "subject": self.subject, "patch_count": self.count,
                "patchset_hash": self.patchset_hash, "base_commit": self.base_commit,
                "message_id": self.message_id,
                "patches": [{"index": p.index, "subject": p.subject, "sha256": p.sha256} for p in self.patches]}


def bare_subject(subject: str) -> str:
    """The subject without its ``[PATCH v2 3/5]``-style tags: what the commit is called."""
    return re.sub(r"^\s*(\[[^\]]*\]\s*)+", "", subject) or subject


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


def intake(specs: str | list[str], workdir: Path, tree: Path | None = None) -> Series:
    """Take the series in any form (module docstring) into ``workdir``; raise GateError(2) on bad input."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise GateError(2, "input-error", "no series: give --series (mbox, patch files, a directory, a "
                                          "Message-ID or BASE..HEAD) or --range")
    workdir.mkdir(parents=True, exist_ok=True)
    if len(specs) == 1 and not Path(specs[0]).exists():
        spec = specs[0]
        if ".." in spec and tree is not None:
            return _intake_range(spec, tree, workdir)
        if looks_like_msgid(spec):
            msgid = spec.strip().strip("<>")
            return _b4_am([*b4_command(), "am", "-o", str(workdir / "b4"), msgid], spec, f"message-id {msgid}",
                          workdir, msgid=msgid)
        raise GateError(2, "input-error", f"--series {spec!r}: no such file, not a Message-ID (id@host) "
                                          "and not a git range (BASE..HEAD)")
    messages = [m for f in _expand(specs) for m in _read_messages(f, workdir)]
    return _intake_messages(messages, " ".join(specs), workdir)


@dataclass
class _Message:
    file: Path
    raw: bytes
    subject: str
    headers: email.message.Message

    @property
    def has_diff(self) -> bool:
        return bool(DIFF_RE.search(self.raw))

    @property
    def is_cover(self) -> bool:
        m = NUM_RE.search(self.subject)
        return bool(m and m.group(1) == "0") or not self.has_diff


def _expand(specs: list[str]) -> list[Path]:
    """Paths in the order given; a directory contributes its ``*.patch`` files in name order."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in (".patch", ".eml", ".mbx"))
            if not found:
                raise GateError(2, "input-error", f"--series {spec}: directory holds no *.patch files "
                                                  "(git format-patch -o DIR)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise GateError(2, "input-error", f"--series {spec}: no such file or directory")
    out: list[Path] = []
    for f in files:
        if f.resolve() not in {o.resolve() for o in out}:
            out.append(f)
    return out


def _read_messages(path: Path, workdir: Path) -> list[_Message]:
    """The patch mails of one file (an mbox, or a single mail without the mbox ``From `` line)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GateError(2, "input-error", f"--series {path}: cannot read: {exc.strerror}") from None
    if not raw.startswith(b"From "):
        if not HEADER_RE.match(raw):
            raise GateError(2, "input-error", f"--series {path}: not a patch (no mail headers; a bare diff has "
                                              "no author or subject: use git format-patch)")
        raw = MBOX_FROM + raw  # a single mail: make it a one-message mbox
    root = workdir / "split"
    root.mkdir(parents=True, exist_ok=True)
    split = root / str(len(list(root.iterdir())))
    split.mkdir()
    src = split / "input"
    src.write_bytes(raw)
    proc = subprocess.run(["git", "mailsplit", f"-o{split}", str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GateError(2, "input-error", f"--series {path}: not a patch mbox ({proc.stderr.strip()[:120]})")
    out = []
    for f in sorted(p for p in split.iterdir() if p.name.isdigit()):
        body = f.read_bytes()
        headers = _headers(body)
        if not headers.get("From") or not headers.get("Subject"):
            raise GateError(2, "input-error", f"--series {path}: not a patch (a message without From:/Subject: "
                                              "headers)")
        out.append(_Message(path, body, _decode(headers.get("Subject")), headers))
    if not out:
        raise GateError(2, "input-error", f"--series {path}: not a patch (no messages)")
    return out


def _write_mbox(path: Path, messages: list[_Message]) -> None:
    """Messages as git mailsplit left them (each still starts with its mbox ``From `` line)."""
    path.write_bytes(b"".join((m.raw if m.raw.startswith(b"From ") else MBOX_FROM + m.raw).rstrip(b"\n") + b"\n\n"
                              for m in messages))


def _threaded(messages: list[_Message]) -> bool:
    """b4 can thread them: every message has a Message-Id, every one after the first replies to the thread."""
    if not all(m.headers.get("Message-Id") for m in messages):
        return False
    return all(m.headers.get("In-Reply-To") or m.headers.get("References") for m in messages[1:])


def _intake_messages(messages: list[_Message], source: str, workdir: Path) -> Series:
    covers = [m for m in messages if m.is_cover]
    for m in covers:
        if m is not messages[0] and not NUM_RE.search(m.subject):
            raise GateError(2, "input-error", f"--series {m.file}: not a patch (message {m.subject!r} has no diff)")
    if len(covers) == len(messages):
        raise GateError(2, "input-error", f"--series {source}: not a patch (no message holds a diff)")
    if _threaded(messages):
        mbox = workdir / "input.mbx"
        _write_mbox(mbox, messages)
        series = _b4_am([*b4_command(), "--offline-mode", "am", "-m", str(mbox), "-o", str(workdir / "b4")],
                        source, f"mbox {source}", workdir)
        series.base_commit = series.base_commit or find_base_commit([m.raw for m in messages])
        return series
    # Plain format-patch output: git am order ([PATCH n/m] when every patch has it, else as given).
    patches = [m for m in messages if not m.is_cover]
    nums = [NUM_RE.search(m.subject) for m in patches]
    if all(nums):
        patches = [m for _, m in sorted(zip([int(n.group(1)) for n in nums if n], patches, strict=True),
                                       key=lambda x: x[0])]
    mbx = workdir / "series.mbx"
    _write_mbox(mbx, patches)
    split = split_patches(mbx, workdir / "patches")
    check_numbering(split, f"series {source}")
    cover = next((m for m in messages if m.is_cover), None)
    subject = cover.subject if cover else ""
    if not subject or "*** SUBJECT HERE ***" in subject:
        subject = split[0].subject
    return Series(source=source, mbx=mbx, subject=subject, patches=split,
                  base_commit=find_base_commit([m.raw for m in messages]), form="git am order")


def _intake_range(spec: str, tree: Path, workdir: Path) -> Series:
    """``BASE..HEAD`` of the tree: its commits as format-patch writes them, based on BASE."""
    base_ref, _, head_ref = spec.partition("..")
    if not base_ref or not head_ref or head_ref.startswith("."):
        raise GateError(2, "input-error", f"--series {spec!r}: a range is BASE..HEAD (two dots)")
    shas = []
    for ref in (base_ref, head_ref):
        proc = _git(tree, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        if proc.returncode != 0:
            raise GateError(2, "input-error", f"--series {spec}: no such file, and not a range of {tree} "
                                              f"({ref} is not a commit there)")
        shas.append(proc.stdout.strip())
    if _git(tree, "rev-list", "--merges", spec).stdout.strip():
        raise GateError(2, "input-error", f"range {spec}: holds merge commits (a series is a line of patches)")
    if not _git(tree, "rev-list", spec).stdout.strip():
        raise GateError(2, "input-error", f"range {spec}: no commits")
    proc = _git(tree, "format-patch", "--stdout", "--no-signature", spec)
    if proc.returncode != 0:
        raise GateError(2, "input-error", f"range {spec}: git format-patch failed: {proc.stderr.strip()[:200]}")
    mbox = workdir / "range.mbox"
    mbox.write_text(proc.stdout)
    series = _intake_messages(_read_messages(mbox, workdir), spec, workdir)
    series.base_commit, series.base_origin, series.form = shas[0], f"start of range {spec}", "git range"
    return series


def _git(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _b4_am(cmd: list[str], source: str, what: str, workdir: Path, msgid: str | None = None) -> Series:
    out = workdir / "b4"
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
        raise GateError(2, "input-error", f"b4 am {what}: {last or f'exit {proc.returncode}'}")
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
    base = find_base_commit([f.read_bytes() for f in [*([cover] if cover else []), mbx]])
    return Series(source=source, mbx=mbx, subject=subject, patches=patches, base_commit=base, message_id=msgid,
                  cover=cover, b4_log=log, form="b4")


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


def find_base_commit(texts: list[bytes]) -> str | None:
    for text in texts:
        m = BASE_RE.search(text)
        if m:
            return m.group(1).decode()
    return None
