"""Reading CPUID: live through /dev/cpu/N/cpuid (or the ``cpuid`` tool), or from a saved dump.

A *leaves* mapping is ``{(leaf, subleaf): (eax, ebx, ecx, edx)}`` with 32-bit unsigned values.

Dump formats accepted by :func:`parse_cpuid_dump` (the format is decided per line):

* ``cpuid -r`` (Debian package ``cpuid``)::

      CPU 0:
         0x0000000a 0x00: eax=0x07300805 ebx=0x00000000 ecx=0x00000000 edx=0x00008603

  (``cpuid -r -1`` prints ``CPU:`` instead of ``CPU 0:``). Only the first CPU block is used.
* plain: ``leaf subleaf eax ebx ecx edx`` separated by blanks, each number ``0x``-prefixed hex or
  decimal (no leading zeros, so bare hex is rejected rather than misread); ``#`` starts a comment.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

Leaves = dict[tuple[int, int], tuple[int, int, int, int]]

PLAIN_SHAPE = "leaf subleaf eax ebx ecx edx"
_U32 = 0xFFFFFFFF

_CPU_HEADER = re.compile(r"^\s*CPU(?:\s+(\d+))?\s*:\s*$", re.IGNORECASE)
_RAW_LINE = re.compile(
    r"^\s*(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s*:\s*"
    r"eax=(0x[0-9a-f]+)\s+ebx=(0x[0-9a-f]+)\s+ecx=(0x[0-9a-f]+)\s+edx=(0x[0-9a-f]+)\s*$",
    re.IGNORECASE,
)
# Decimal numbers may not have leading zeros: "07300805" is far more likely hex without its 0x.
_NUMBER = re.compile(r"^(0x[0-9a-f]+|0|[1-9][0-9]*)$", re.IGNORECASE)


def bit(value: int | None, n: int) -> bool | None:
    """Bit ``n`` of a register value, ``None`` when the register is unknown."""
    return None if value is None else bool(value >> n & 1)


class CpuidDumpError(ValueError):
    """A dump could not be parsed. ``str(err)`` is one line: ``FILE:LINE: what``."""


class CpuidUnavailable(OSError):
    """Live CPUID could not be read (no /dev/cpu/N/cpuid access and no ``cpuid`` tool)."""


def _shorten(text: str, limit: int = 80) -> str:
    text = text.strip().replace("\t", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_cpuid_dump(text: str, filename: str = "<dump>") -> Leaves:
    """Parse a ``cpuid -r`` or plain dump; raise :class:`CpuidDumpError` naming file and line."""
    leaves: Leaves = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if _CPU_HEADER.match(line):
            if leaves:
                break  # only the first CPU of a multi-CPU dump is used
            continue
        m = _RAW_LINE.match(line)
        if m:
            values = [int(g, 16) for g in m.groups()]
        else:
            tokens = line.split()
            bad_tokens = [t for t in tokens if not _NUMBER.match(t)]
            if len(tokens) != 6 or bad_tokens:
                if bad_tokens and "eax=" not in line:
                    hint = f" ({bad_tokens[0]!r} is not a 0x-hex or decimal number)"
                elif len(tokens) != 6 and not bad_tokens:
                    hint = f" ({len(tokens)} numbers)"
                else:
                    hint = " (not a 'cpuid -r' line either)"
                raise CpuidDumpError(
                    f"{filename}:{lineno}: expected '{PLAIN_SHAPE}', got {_shorten(raw)!r}{hint}")
            values = [int(t, 0) if t.lower().startswith("0x") else int(t, 10) for t in tokens]
        bad = [n for n, v in zip(PLAIN_SHAPE.split(), values, strict=True) if v > _U32]
        if bad:
            raise CpuidDumpError(f"{filename}:{lineno}: {bad[0]} does not fit in 32 bits: {_shorten(raw)!r}")
        key = (values[0], values[1])
        if key in leaves:
            raise CpuidDumpError(
                f"{filename}:{lineno}: duplicate leaf {key[0]:#x} subleaf {key[1]:#x}: {_shorten(raw)!r}")
        leaves[key] = (values[2], values[3], values[4], values[5])
    if not leaves:
        raise CpuidDumpError(f"{filename}:0: no CPUID leaves found")
    return leaves


def load_cpuid_dump(path: str | Path) -> Leaves:
    """Read and parse a dump file; a missing/unreadable file is a one-line :class:`CpuidDumpError`."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CpuidDumpError(f"{path}:0: cannot read dump: {exc.strerror or exc}") from None
    return parse_cpuid_dump(text, str(path))


def format_cpuid_dump(leaves: Leaves, comment: str | None = None) -> str:
    """Render leaves in the plain format (round-trips through :func:`parse_cpuid_dump`)."""
    out = []
    if comment:
        out += [f"# {c}" for c in comment.splitlines()]
    out.append(f"# {PLAIN_SHAPE}")
    for (leaf, sub), regs in sorted(leaves.items()):
        out.append(f"0x{leaf:08x} 0x{sub:02x} " + " ".join(f"0x{r:08x}" for r in regs))
    return "\n".join(out) + "\n"


# --- live ----------------------------------------------------------------------------------------

# Leaves read live: every basic and extended leaf (subleaf 0) up to the enumerated maximum,
# plus these subleaf ranges. Caps guard against garbage maxima.
_MAX_BASIC_CAP = 0x3F
_MAX_EXT_CAP = 0x8000003F
_EXTRA_SUBLEAVES = {0x7: None, 0x23: 3}  # None: subleaf count from EAX of subleaf 0


def _read_dev(cpu: int) -> Leaves:
    path = f"/dev/cpu/{cpu}/cpuid"
    fd = os.open(path, os.O_RDONLY)
    try:
        def q(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
            data = os.pread(fd, 16, leaf | (sub << 32))
            if len(data) != 16:
                raise OSError(f"short read from {path} for leaf {leaf:#x}")
            return struct.unpack("<4I", data)

        leaves: Leaves = {}
        max_basic = min(q(0)[0], _MAX_BASIC_CAP)
        for leaf in range(0, max_basic + 1):
            leaves[(leaf, 0)] = q(leaf)
            if leaf in _EXTRA_SUBLEAVES:
                last = _EXTRA_SUBLEAVES[leaf]
                if last is None:
                    last = min(leaves[(leaf, 0)][0], 8)
                for sub in range(1, last + 1):
                    leaves[(leaf, sub)] = q(leaf, sub)
        max_ext = q(0x80000000)[0]
        if max_ext >= 0x80000000:
            for leaf in range(0x80000000, min(max_ext, _MAX_EXT_CAP) + 1):
                leaves[(leaf, 0)] = q(leaf)
        return leaves
    finally:
        os.close(fd)


def read_cpuid_live(cpu: int = 0) -> tuple[Leaves, str]:
    """Return ``(leaves, source)``; source names where the values came from.

    Tries ``/dev/cpu/N/cpuid`` (pread at offset ``leaf | subleaf << 32``), then ``cpuid -r -1``
    (which executes the instruction itself). Raises :class:`CpuidUnavailable` if both fail.
    """
    errors = []
    try:
        return _read_dev(cpu), f"/dev/cpu/{cpu}/cpuid"
    except OSError as exc:
        errors.append(f"/dev/cpu/{cpu}/cpuid: {exc.strerror or exc}")
    tool = shutil.which("cpuid")
    if tool:
        try:
            out = subprocess.run([tool, "-r", "-1"], capture_output=True, text=True, timeout=30, check=True)
            return parse_cpuid_dump(out.stdout, "cpuid -r -1"), "cpuid -r -1"
        except (OSError, subprocess.SubprocessError, CpuidDumpError) as exc:
            errors.append(f"cpuid -r -1: {exc}")
    else:
        errors.append("cpuid tool not installed")
    raise CpuidUnavailable("; ".join(errors))
