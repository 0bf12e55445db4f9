"""A real Linux guest for guest-perf probes: initramfs builder and QEMU runner.

The image is built by the agent itself, from what the host has:

* an initramfs (cpio ``newc``, gzip), written here without the ``cpio`` tool: a static busybox
  (Debian ``busybox-static``, ``/bin/busybox``), the static workload ``perfload``
  (``agent/native/guest``), a ``/dev/console`` node and an ``/init`` script that runs the workload
  and prints its JSON between markers on the serial console, then reboots (QEMU runs with
  ``-no-reboot``, so the reboot ends QEMU);
* with ``with_perf=True``, a second image: the host's ``perf`` (Debian ``linux-perf``) and every
  library ``ldd`` lists for it, uncompressed, whose init (:data:`PERF_INIT_SCRIPT`) runs perf stat,
  perf record and perf test and prints each command's output between SECTION markers;
* a kernel: ``kernel=`` argument, env ``PMUFARM_GUEST_KERNEL``, the host's ``/boot/vmlinuz-*``, or
  one fetched into the cache by :func:`fetch_debian_kernel` (Debian ``linux-image-amd64``: the
  package is downloaded with ``apt-get download`` and only ``/boot/vmlinuz-*`` is extracted;
  nothing is installed). ``python -m agent.guestimage fetch-kernel`` does that.

Under TCG most of a bzImage boot is the real-mode loader and the xz decompressor, so when the
kernel's payload is xz/gzip and its vmlinux has the PVH entry note (Debian: CONFIG_PVH=y), the
vmlinux is extracted once into the cache and QEMU boots it directly (:func:`boot_image`): ~2 s
instead of ~4 s from QEMU start to the workload's result.

QEMU (Debian ``qemu-system-x86``) boots it with ``-accel kvm -cpu host`` where KVM can run a Linux
guest, else with ``-accel tcg -cpu max`` (see :func:`choose_accel`); the result records which.
Every run has a hard timeout; QEMU runs in its own process group, is killed on timeout or error,
and the temporary directory is removed.

Serial protocol (lines on ttyS0)::

    PMUFARM-READY                   init is up, the workload is about to run
    PMUFARM-WAIT                    (hold mode) init waits for one line on the serial input
    PMUFARM-JSON-BEGIN
    {...perfload JSON...}
    PMUFARM-JSON-END rc=<exit status of perfload>
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import os
import platform
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GUEST_SRC = REPO / "agent" / "native" / "guest"
BUILD_DIR = REPO / "agent" / "native" / "build"
PERFLOAD = BUILD_DIR / "perfload"

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
BUSYBOX_APPLETS = ("sh", "mount", "sed", "tr", "cat", "reboot", "poweroff", "sleep", "dmesg", "echo")
QEMU = "qemu-system-x86_64"
DEBIAN_KERNEL_PACKAGE = "linux-image-amd64"
APT_PACKAGES = ("busybox-static", "qemu-system-x86")  # what `make setup` must install

MARK_READY = "PMUFARM-READY"
MARK_WAIT = "PMUFARM-WAIT"
MARK_BEGIN = "PMUFARM-JSON-BEGIN"
MARK_END = "PMUFARM-JSON-END"

_END_RE = re.compile(rf"(^|[\r\n]){MARK_END} rc=-?\d+[\r\n]")

DEFAULT_TIMEOUT = 60.0
KEEP_IMAGES = 4
KVM_CHECK_TIMEOUT = 20.0

INIT_SCRIPT = f"""#!/bin/sh
# pmufarm guest init: run perfload with the args from the kernel command line, print its JSON
# between markers on the serial console, reboot (QEMU runs with -no-reboot: it exits).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp
args=$(sed -n 's/.*pmufarm_args=\\([^ ]*\\).*/\\1/p' /proc/cmdline | tr ',' ' ')
hold=$(sed -n 's/.*pmufarm_hold=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
# keep kernel messages off the console from here on: they would interleave with the JSON
echo 1 > /proc/sys/kernel/printk
echo {MARK_READY}
if [ -n "$hold" ]; then
    echo {MARK_WAIT}
    read -t "$hold" line
fi
/bin/perfload --where guest $args > /tmp/out.json 2> /tmp/err.txt
rc=$?
echo {MARK_BEGIN}
cat /tmp/out.json
echo {MARK_END} rc=$rc
cat /tmp/err.txt
reboot -f
sleep 5
"""


# Extra busybox applets the perf image's init uses.
PERF_APPLETS = ("timeout", "grep", "wc", "mkdir", "tail", "head", "ls", "env", "true", "rm", "uname", "id", "seq",
                "cut", "date")
MARK_SECTION_BEGIN = "PMUFARM-SECTION-BEGIN"
MARK_SECTION_END = "PMUFARM-SECTION-END"
PERF_ITERATIONS = 10_000_000     # the fixed workload of perf stat / perf record: loop(N), 3N instructions
PERF_RECORD_PERIOD = 100_000     # instructions:u per sample (hardware) and ns of cpu-clock (software)

# The perf image's init: each command's output goes to a file first (nothing interleaves on the
# console), then between SECTION markers with its exit status. ``pmufarm_perf_test=0`` on the
# command line leaves `perf test` out, ``pmufarm_perf_test_timeout=S`` bounds it (busybox timeout).
PERF_INIT_SCRIPT = f"""#!/bin/sh
# pmufarm perf guest init: perf stat, perf record (hardware and software events) and perf test,
# each section between markers on the serial console; then perfload's enum JSON; then reboot.
export PATH=/bin:/usr/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mkdir -p /tmp
echo 1 > /proc/sys/kernel/printk
echo -1 > /proc/sys/kernel/perf_event_paranoid
n=$(sed -n 's/.*pmufarm_iterations=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
n=${{n:-{PERF_ITERATIONS}}}
p={PERF_RECORD_PERIOD}
do_test=$(sed -n 's/.*pmufarm_perf_test=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
tlimit=$(sed -n 's/.*pmufarm_perf_test_timeout=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
only=$(sed -n 's/.*pmufarm_perf_tests=\\([0-9+]*\\).*/\\1/p' /proc/cmdline | tr '+' ' ')
echo {MARK_READY}
section() {{
    name=$1; shift
    "$@" > /tmp/section.out 2>&1
    rc=$?
    echo "{MARK_SECTION_BEGIN} $name"
    cat /tmp/section.out
    echo "{MARK_SECTION_END} $name rc=$rc"
}}
W="/bin/perfload --where guest --mode spin --iterations $n"
section version perf version
section stat perf stat -x , -e instructions:u,branches:u -- $W
section record_hw perf record -e instructions:u -c $p -o /tmp/hw.data -- $W
section record_sw perf record -e cpu-clock:u -c $p -o /tmp/sw.data -- $W
section report_sw perf report -i /tmp/sw.data --stdio --sort sym -q
if [ "$do_test" != 0 ]; then
    section test timeout ${{tlimit:-600}} perf test $only
    for t in $(grep 'FAILED!' /tmp/section.out | sed 's/^ *\\([0-9.]*\\):.*/\\1/'); do
        section "test_verbose $t" timeout 60 perf test -v "${{t%%.*}}"
    done
fi
/bin/perfload --where guest --mode enum > /tmp/out.json 2> /tmp/err.txt
rc=$?
echo {MARK_BEGIN}
cat /tmp/out.json
echo {MARK_END} rc=$rc
reboot -f
sleep 5
"""


class GuestImageError(RuntimeError):
    """Something the guest needs is missing (``missing`` names it) or could not be built."""

    def __init__(self, message: str, missing: str | None = None):
        super().__init__(message)
        self.missing = missing


# --------------------------------------------------------------------------------------------------
# Locating things


def cache_dir() -> Path:
    base = os.environ.get("PMUFARM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pmufarm")
    return Path(base)


def _is_static_elf(path: Path) -> bool:
    """An ELF with no PT_INTERP program header (runs without a dynamic loader)."""
    try:
        data = path.read_bytes()[:65536]
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return False
        if int.from_bytes(data[off:off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def find_busybox(explicit: str | os.PathLike | None = None) -> Path:
    candidates = [explicit] if explicit else [os.environ.get("PMUFARM_BUSYBOX"), *BUSYBOX_CANDIDATES]
    for cand in candidates:
        if cand and Path(cand).is_file() and _is_static_elf(Path(cand)):
            return Path(cand)
    raise GuestImageError("no static busybox (looked at " + ", ".join(c for c in candidates if c) +
                          "; Debian package busybox-static provides /bin/busybox)", missing="busybox-static")


def find_qemu() -> Path:
    path = shutil.which(QEMU)
    if not path:
        raise GuestImageError(f"{QEMU} not on PATH (Debian package qemu-system-x86)", missing="qemu-system-x86")
    return Path(path)


def find_kernel(explicit: str | os.PathLike | None = None) -> Path:
    """The guest kernel: argument, env PMUFARM_GUEST_KERNEL, /boot, then the fetched cache."""
    tried: list[str] = []
    for cand in (explicit, os.environ.get("PMUFARM_GUEST_KERNEL")):
        if cand:
            if Path(cand).is_file() and os.access(cand, os.R_OK):
                return Path(cand)
            raise GuestImageError(f"guest kernel {cand} is not a readable file", missing="kernel")
    release = platform.release()
    own = Path(f"/boot/vmlinuz-{release}")
    tried.append(str(own))
    if own.is_file() and os.access(own, os.R_OK):
        return own
    for pattern in ("/boot/vmlinuz-*", str(cache_dir() / "kernel" / "boot" / "vmlinuz-*")):
        tried.append(pattern)
        hits = sorted(p for p in glob.glob(pattern) if os.access(p, os.R_OK))
        if hits:
            return Path(hits[-1])
    raise GuestImageError(
        "no guest kernel (tried " + ", ".join(tried) + "; set PMUFARM_GUEST_KERNEL or run "
        f"`python -m agent.guestimage fetch-kernel` to extract Debian's {DEBIAN_KERNEL_PACKAGE} into the cache)",
        missing="kernel")


def fetch_debian_kernel(dest: Path | None = None, package: str = DEBIAN_KERNEL_PACKAGE) -> Path:
    """Download Debian's kernel package with ``apt-get download`` and extract only its vmlinuz.

    ``linux-image-amd64`` is a metapackage: its ``Depends`` names the real image package. Nothing
    is installed into /boot; the kernel lands in ``<cache>/kernel/boot/vmlinuz-<version>``.
    """
    dest = dest or cache_dir() / "kernel"
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "tar"):
        if not shutil.which(tool):
            raise GuestImageError(f"fetching a kernel needs {tool}", missing=tool)
    deps = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True, check=False)
    real = package
    for line in deps.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            real = line.split(":", 1)[1].strip().strip("<>")
            break
    with tempfile.TemporaryDirectory(prefix="pmufarm-kernel-") as tmp:
        debs = [apt_download(real, Path(tmp), missing="kernel")]
        extract = Path(tmp) / "x"
        extract.mkdir()
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE) as deb:
            tar = subprocess.run(["tar", "-x", "-C", str(extract), "--wildcards", "./boot/vmlinuz-*"],
                                 stdin=deb.stdout, capture_output=True, text=True, check=False)
            deb.wait()
        kernels = sorted((extract / "boot").glob("vmlinuz-*"))
        if tar.returncode != 0 or not kernels:
            raise GuestImageError(f"no vmlinuz in {debs[0].name}: {tar.stderr.strip()[-400:]}", missing="kernel")
        (dest / "boot").mkdir(parents=True, exist_ok=True)
        target = dest / "boot" / kernels[-1].name
        shutil.copy2(kernels[-1], target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)
        (dest / "SOURCE").write_text(f"{real} from Debian via apt-get download ({debs[0].name})\n")
    return target


def apt_download(package: str, into: Path, missing: str) -> Path:
    """``apt-get download PACKAGE`` into ``into`` (nothing is installed); the .deb's path."""
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise GuestImageError(f"fetching {package} needs {tool}", missing=tool)
    os.chmod(into, 0o755)  # apt's _apt user downloads into it
    dl = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True, text=True, check=False)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if dl.returncode != 0 or not debs:
        raise GuestImageError(f"apt-get download {package} failed: {dl.stderr.strip()[-400:]}", missing=missing)
    return debs[-1]


def _elf_has_pvh_note(data: bytes) -> bool:
    """A 64-bit ELF with the XEN_ELFNOTE_PHYS32_ENTRY note (type 18, name "Xen"): QEMU boots it PVH."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    for i in range(int.from_bytes(data[0x38:0x3A], "little")):
        ph = data[phoff + i * phentsize: phoff + (i + 1) * phentsize]
        if int.from_bytes(ph[0:4], "little") != 4:  # PT_NOTE
            continue
        off, size = int.from_bytes(ph[8:16], "little"), int.from_bytes(ph[32:40], "little")
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, ntype = (int.from_bytes(data[pos + k:pos + k + 4], "little") for k in (0, 4, 8))
            name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def boot_image(kernel: Path) -> tuple[Path, str]:
    """``(path QEMU boots, how)``: the kernel's own vmlinux ELF when it can be booted PVH, else the bzImage.

    A bzImage's payload is the compressed vmlinux; under TCG the decompressor and the real-mode
    loader cost about 2 s of a 4 s boot. When the payload is xz or gzip (Python's stdlib decodes
    both) and the ELF carries the PVH entry note (CONFIG_PVH=y, as in Debian's kernels), the
    decompressed vmlinux is cached and QEMU boots it directly. Env ``PMUFARM_GUEST_PVH=0`` disables.
    """
    if os.environ.get("PMUFARM_GUEST_PVH", "1") == "0":
        return kernel, "bzImage (PVH disabled)"
    data = kernel.read_bytes()
    if data[:4] == b"\x7fELF":
        return kernel, "elf" + (" pvh" if _elf_has_pvh_note(data) else "")
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return kernel, "as given (not a bzImage)"
    setup_sects = data[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    off = pm_start + int.from_bytes(data[0x248:0x24C], "little")
    length = int.from_bytes(data[0x24C:0x250], "little")
    payload = data[off:off + length]
    digest = hashlib.sha256(data).hexdigest()[:16]
    target = cache_dir() / "kernel" / f"vmlinux-{digest}"
    if target.is_file():
        return target, "pvh (cached vmlinux)"
    try:
        if payload[:6] == b"\xfd7zXZ\x00":
            import lzma

            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload[:2] == b"\x1f\x8b":
            import zlib

            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        else:
            return kernel, f"bzImage (payload compression {payload[:4].hex()} not decodable here)"
    except (OSError, ValueError, EOFError) as exc:
        return kernel, f"bzImage (payload does not decompress: {exc})"
    if not _elf_has_pvh_note(elf):
        return kernel, "bzImage (vmlinux has no PVH entry note)"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(elf)
    tmp.replace(target)
    return target, "pvh (vmlinux extracted from the bzImage)"


def build_perfload(force: bool = False) -> Path:
    """``make -C agent/native/guest`` unless the binary is newer than its source."""
    src = GUEST_SRC / "perfload.c"
    if not force and PERFLOAD.is_file() and PERFLOAD.stat().st_mtime >= src.stat().st_mtime:
        return PERFLOAD
    if not shutil.which("make") or not shutil.which(os.environ.get("CC", "gcc")):
        raise GuestImageError("building perfload needs make and gcc", missing="gcc")
    r = subprocess.run(["make", "-s", "-C", str(GUEST_SRC)], capture_output=True, text=True, check=False)
    if r.returncode != 0 or not PERFLOAD.is_file():
        raise GuestImageError(f"make -C {GUEST_SRC} failed: {(r.stderr or r.stdout).strip()[-800:]}")
    return PERFLOAD


# --------------------------------------------------------------------------------------------------
# initramfs (cpio newc, gzip)


@dataclass
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _newc(entries: Iterable[_Entry]) -> bytes:
    out = io.BytesIO()
    ino = 300000

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for e in [*entries, _Entry("TRAILER!!!", 0)]:
        ino += 1
        name = e.name.encode() + b"\0"
        fields = [ino, e.mode, 0, 0, 2 if e.mode & 0o040000 else 1, 0, len(e.data), 0, 0,
                  e.rdev[0], e.rdev[1], len(name), 0]
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        out.write(header + name)
        pad(len(header) + len(name))
        out.write(e.data)
        pad(len(e.data))
    return out.getvalue()


def initramfs_bytes(perfload: Path, busybox: Path, init_script: str = INIT_SCRIPT,
                    extra: dict[str, Path] | None = None, applets: Iterable[str] = BUSYBOX_APPLETS,
                    compress: bool = True) -> bytes:
    """``extra``: guest path -> host file (parent directories are added). ``compress=False`` writes a
    plain cpio: the kernel unpacks it without a decompressor, which under TCG is the cheaper way
    to carry tens of MB (perf and its libraries)."""
    dirs = ["bin", "dev", "proc", "sys", "tmp"]
    for guest in extra or {}:
        parts = guest.strip("/").split("/")[:-1]
        dirs += ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    entries = [_Entry(d, 0o040755) for d in dict.fromkeys(dirs)]
    entries.append(_Entry("dev/console", 0o020600, rdev=(5, 1)))
    entries.append(_Entry("dev/ttyS0", 0o020660, rdev=(4, 64)))
    entries.append(_Entry("bin/busybox", 0o100755, busybox.read_bytes()))
    entries += [_Entry(f"bin/{a}", 0o120777, b"busybox") for a in dict.fromkeys(applets)]
    entries.append(_Entry("bin/perfload", 0o100755, perfload.read_bytes()))
    for guest, host in (extra or {}).items():
        entries.append(_Entry(guest.strip("/"), 0o100755, host.read_bytes()))
    entries.append(_Entry("init", 0o100755, init_script.encode()))
    data = _newc(entries)
    return gzip.compress(data, compresslevel=6, mtime=0) if compress else data


def build_initramfs(perfload: Path | None = None, busybox: Path | None = None, out_dir: Path | None = None,
                    init_script: str = INIT_SCRIPT, with_perf: bool = False) -> Path:
    """Write (or reuse, keyed by content) ``initramfs-<sha>.cpio.gz`` and return its path.

    ``with_perf``: the perf image (:data:`PERF_INIT_SCRIPT` unless another script is given):
    the host's ``perf`` and its ldd closure next to perfload, uncompressed (``perf-<sha>.cpio``).
    """
    perfload = perfload or build_perfload()
    busybox = busybox or find_busybox()
    extra: dict[str, Path] = {}
    applets: Iterable[str] = BUSYBOX_APPLETS
    if with_perf:
        extra = perf_files()
        applets = (*BUSYBOX_APPLETS, *PERF_APPLETS)
        if init_script is INIT_SCRIPT:
            init_script = PERF_INIT_SCRIPT
    h = hashlib.sha256()
    for part in (perfload.read_bytes(), busybox.read_bytes(), init_script.encode(), " ".join(applets).encode()):
        h.update(hashlib.sha256(part).digest())
    for guest, host in sorted(extra.items()):
        h.update(guest.encode() + hashlib.sha256(host.read_bytes()).digest())
    out_dir = out_dir or cache_dir() / "initramfs"
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix, suffix = ("perf-", ".cpio") if with_perf else ("initramfs-", ".cpio.gz")
    path = out_dir / f"{prefix}{h.hexdigest()[:16]}{suffix}"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(initramfs_bytes(perfload, busybox, init_script, extra, applets, compress=not with_perf))
        tmp.replace(path)
        # keep the cache small: the newest few images (older perfload builds) stay, the rest go
        with contextlib.suppress(OSError):
            old = sorted(out_dir.glob(f"{prefix}*{suffix}"), key=lambda f: f.stat().st_mtime, reverse=True)
            for stale in old[KEEP_IMAGES:]:
                if stale != path:
                    stale.unlink()
    return path


# --------------------------------------------------------------------------------------------------
# perf in the guest


def find_perf(explicit: str | os.PathLike | None = None) -> Path:
    """The host's perf ELF (Debian ``linux-perf``): argument, env PMUFARM_GUEST_PERF, /usr/bin/perf,
    then /usr/bin/perf_* (where /usr/bin/perf is Debian's version-dispatching wrapper script)."""
    cands = [explicit] if explicit else [os.environ.get("PMUFARM_GUEST_PERF"), "/usr/bin/perf",
                                         *sorted(glob.glob("/usr/bin/perf_[0-9]*"), reverse=True)]
    for cand in cands:
        if cand and Path(cand).is_file():
            with open(cand, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    return Path(cand)
    raise GuestImageError("no perf binary (looked at " + ", ".join(c for c in cands if c) +
                          "; Debian package linux-perf provides it)", missing="linux-perf")


def ldd_closure(binary: Path) -> dict[str, Path]:
    """Guest path -> host file for every shared library ``binary`` loads, and its loader (``ldd``)."""
    if not shutil.which("ldd"):
        raise GuestImageError("listing perf's libraries needs ldd (Debian libc-bin)", missing="libc-bin")
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if "not a dynamic executable" in (r.stdout + r.stderr):
        return {}
    files: dict[str, Path] = {}
    for line in r.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise GuestImageError(f"{binary}: library {line.split()[0]} not found (ldd)", missing=line.split()[0])
        path = line.split("=>", 1)[1].strip() if "=>" in line else line
        path = path.split(" (", 1)[0].strip()
        if path.startswith("/"):  # linux-vdso has no file
            files[path] = Path(path).resolve()
    if r.returncode != 0 or not files:
        raise GuestImageError(f"ldd {binary} failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return files


def perf_files(perf: Path | None = None) -> dict[str, Path]:
    perf = perf or find_perf()
    return {"usr/bin/perf": perf, **{k.lstrip("/"): v for k, v in ldd_closure(perf).items()}}


# --------------------------------------------------------------------------------------------------
# Acceleration


_ACCEL_CACHE: dict[str, tuple[str, str]] = {}


def kvm_usable_quick() -> tuple[bool, str]:
    """Fast static check: /dev/kvm exists and is read-writable by us."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm absent"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm not read-writable by this user"
    return True, "/dev/kvm usable"


def choose_accel(kernel: Path, initrd: Path, requested: str = "auto") -> tuple[str, str]:
    """``(accel, why)``. ``auto``: KVM if a real boot of this kernel under KVM reaches init.

    QEMU on KVM may fail to boot a Linux guest on some hosts (nested setups) while the same image
    boots under TCG: the only reliable check is trying. The result is cached per process and
    kernel; env ``PMUFARM_GUEST_ACCEL=kvm|tcg`` skips the check.
    """
    if requested == "auto":
        requested = os.environ.get("PMUFARM_GUEST_ACCEL") or "auto"
    if requested in ("kvm", "tcg"):
        return requested, f"requested accel={requested}"
    if requested != "auto":
        raise ValueError(f"accel must be auto, kvm or tcg, not {requested!r}")
    key = str(kernel)
    if key in _ACCEL_CACHE:
        return _ACCEL_CACHE[key]
    ok, why = kvm_usable_quick()
    if not ok:
        result = ("tcg", f"KVM not usable: {why}")
    else:
        trial = run_guest(kernel=kernel, initrd=initrd, accel="kvm", args=["--mode", "enum"],
                          timeout=KVM_CHECK_TIMEOUT, stop_after_ready=True)
        if trial.ready:
            result = ("kvm", f"a KVM guest reached init in {trial.boot_s:.2f}s")
        else:
            lines = [line.strip() for line in trial.console_tail(8).splitlines() if line.strip()]
            first = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no output")
            result = ("tcg", f"QEMU with KVM cannot boot a Linux guest here: {trial.error}: {first[:160]}")
    _ACCEL_CACHE[key] = result
    return result


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class GuestRun:
    accel: str
    accel_reason: str = ""
    kernel: str = ""
    boot: str = ""                          # what QEMU booted: the PVH vmlinux or the bzImage
    initrd: str = ""
    cmdline: str = ""
    qemu_cmd: list[str] = field(default_factory=list)
    ready: bool = False
    result: dict[str, Any] | None = None    # perfload JSON
    workload_rc: int | None = None
    error: str | None = None                # boot failure, timeout, unparsable output
    timed_out: bool = False
    qemu_rc: int | None = None
    boot_s: float | None = None             # QEMU start -> PMUFARM-READY
    result_s: float | None = None           # QEMU start -> PMUFARM-JSON-END (the workload's result is in)
    total_s: float = 0.0                    # QEMU start -> QEMU gone
    console: str = ""
    hook_result: Any = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)   # perf image: name -> {rc, output}

    def console_tail(self, lines: int = 25) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("console")
        d["console_tail"] = self.console_tail()
        return d


def qemu_command(kernel: Path, initrd: Path, accel: str, cmdline: str, memory_mb: int = 256,
                 qemu: Path | None = None) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    return [str(qemu or find_qemu()), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-m", str(memory_mb), "-smp", "1", *cpu,
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def run_guest(kernel: Path | str | None = None, initrd: Path | None = None, accel: str = "auto",
              args: list[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
              hold: float | None = None, while_running: Callable[[GuestRun], Any] | None = None,
              stop_after_ready: bool = False, memory_mb: int = 256, extra_cmdline: str = "") -> GuestRun:
    """Boot the guest, run ``perfload --where guest ARGS`` in it, return what came back.

    ``hold``: init waits (up to ``hold`` seconds) for a line on the serial input after READY;
    ``while_running(run)`` is called right after READY while the guest (and its VM) lives, its
    return value lands in ``hook_result``, then the guest is released. ``stop_after_ready``: kill
    QEMU once init is up (used by the KVM check). Never raises for a guest failure: ``error`` says
    what happened and ``console`` holds the serial output. Raises :class:`GuestImageError` when a
    prerequisite (QEMU, kernel, busybox, perfload) is missing.
    """
    qemu = find_qemu()
    kernel = find_kernel(kernel)
    initrd = initrd or build_initramfs()
    why = ""
    if accel == "auto":
        accel, why = choose_accel(kernel, initrd)
    parts = ["console=ttyS0", "panic=-1", "nmi_watchdog=0", "rdinit=/init"]
    if args:
        bad = [a for a in args if " " in a or "+" in a]
        if bad:
            raise ValueError(f"guest args may not contain ' ' or '+': {bad}")
        # one kernel parameter: args joined by ',', a ',' inside an arg (--mode a,b) becomes '+'
        parts.append("pmufarm_args=" + ",".join(a.replace(",", "+") for a in args))
    if hold is not None or while_running is not None:
        parts.append(f"pmufarm_hold={int(hold or timeout)}")
    if extra_cmdline:
        parts.append(extra_cmdline)
    cmdline = " ".join(parts)
    boot, how = boot_image(kernel)
    cmd = qemu_command(boot, initrd, accel, cmdline, memory_mb, qemu)
    run = GuestRun(accel=accel, accel_reason=why, kernel=str(kernel), boot=f"{boot} ({how})", initrd=str(initrd),
                   cmdline=cmdline, qemu_cmd=cmd)
    tmp = tempfile.mkdtemp(prefix="pmufarm-guest-")
    start = time.monotonic()
    deadline = start + timeout
    buf = bytearray()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=tmp, start_new_session=True)
    sel = selectors.DefaultSelector()
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        sel.register(proc.stdout, selectors.EVENT_READ)
        released = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                run.timed_out = True
                run.error = f"timeout after {timeout:.0f}s " + (
                    "(guest never reached init)" if not run.ready else "(workload did not finish)")
                break
            eof = False
            for _key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = proc.stdout.read(65536)
                if not chunk:
                    eof = True
                else:
                    buf += chunk
            text = buf.decode("utf-8", "replace")
            if not run.ready and MARK_READY in text:
                run.ready = True
                run.boot_s = time.monotonic() - start
                if stop_after_ready:
                    break
            if run.ready and while_running is not None and not released and MARK_WAIT in text:
                try:
                    run.hook_result = while_running(run)
                finally:
                    released = True
                    with contextlib.suppress(BrokenPipeError, OSError):
                        proc.stdin.write(b"go\n")
                        proc.stdin.flush()
            if run.result_s is None and _END_RE.search(text):
                run.result_s = time.monotonic() - start
                # the workload is done; give QEMU a moment to exit on its own (reboot -f)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                with contextlib.suppress(OSError, ValueError):
                    rest = proc.stdout.read()
                    if rest:
                        buf += rest
                break
            if eof or proc.poll() is not None:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    rest = proc.stdout.read()
                    if rest:
                        buf += rest
                break
    finally:
        sel.close()
        _kill_group(proc)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        run.qemu_rc = proc.returncode
        run.total_s = time.monotonic() - start
        shutil.rmtree(tmp, ignore_errors=True)
    run.console = buf.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    if not run.ready and run.error is None:
        run.error = f"QEMU exited with status {run.qemu_rc} before the guest's init signalled {MARK_READY}"
    if not stop_after_ready:
        _parse_result(run)
    return run


def _parse_sections(run: GuestRun) -> None:
    """``SECTION-BEGIN name`` .. ``SECTION-END name rc=N`` blocks (the perf image's commands)."""
    name, body = None, []
    for line in run.console.splitlines():
        if line.startswith(MARK_SECTION_BEGIN + " "):
            name, body = line[len(MARK_SECTION_BEGIN) + 1:].strip(), []
        elif name is not None and line.startswith(f"{MARK_SECTION_END} {name} rc="):
            rc = line.rsplit("rc=", 1)[1].strip()
            run.sections[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else None, "output": "\n".join(body)}
            name = None
        elif name is not None:
            body.append(line)
    if name is not None:  # the guest died inside a command: keep what it printed, no rc
        run.sections[name] = {"rc": None, "output": "\n".join(body)}


def _parse_result(run: GuestRun) -> None:
    _parse_sections(run)
    lines = run.console.splitlines()
    begin = next((i for i, line in enumerate(lines) if line.strip() == MARK_BEGIN), None)
    end = next((i for i, line in enumerate(lines) if line.startswith(MARK_END)), None)
    if begin is None or end is None or end < begin:
        if run.error is None:
            run.error = f"guest printed no workload result (QEMU exit status {run.qemu_rc})"
        return
    with contextlib.suppress(ValueError):
        run.workload_rc = int(lines[end].split("rc=", 1)[1])
    body = "\n".join(lines[begin + 1:end]).strip()
    try:
        run.result = json.loads(body)
    except ValueError as exc:
        run.error = f"workload output is not JSON ({exc}); rc={run.workload_rc}"
        return
    if not isinstance(run.result, dict):
        run.error, run.result = "workload output is not a JSON object", None
    elif run.workload_rc not in (0, None):
        run.error = f"perfload exited {run.workload_rc} in the guest"


def run_host(args: list[str] | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Run ``perfload --where host ARGS`` on this machine (the bare-metal reference)."""
    binary = build_perfload()
    r = subprocess.run([str(binary), "--where", "host", *(args or [])], capture_output=True, text=True,
                       timeout=timeout, check=False)
    if r.returncode != 0:
        raise GuestImageError(f"perfload exited {r.returncode} on the host: {r.stderr.strip()[-400:]}")
    return json.loads(r.stdout)


# --------------------------------------------------------------------------------------------------
# CLI: python -m agent.guestimage {fetch-kernel|build|run|accel}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m agent.guestimage", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch-kernel", help=f"apt-get download {DEBIAN_KERNEL_PACKAGE}, extract vmlinuz to the cache")
    sub.add_parser("build", help="build perfload and the initramfs; print their paths")
    runp = sub.add_parser("run", help="boot the guest once and print the run as JSON")
    runp.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    runp.add_argument("--kernel")
    runp.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    runp.add_argument("--console", action="store_true", help="print the whole serial console to stderr")
    runp.add_argument("args", nargs="*", help="perfload arguments (after --)")
    ns = ap.parse_args(argv)
    try:
        if ns.cmd == "fetch-kernel":
            try:
                print(f"guest kernel already present: {find_kernel()}")
                return 0
            except GuestImageError:
                pass
            print(fetch_debian_kernel())
            return 0
        if ns.cmd == "build":
            print(json.dumps({"perfload": str(build_perfload()), "initramfs": str(build_initramfs()),
                              "kernel": str(find_kernel())}))
            return 0
        run = run_guest(kernel=ns.kernel, accel=ns.accel, args=ns.args, timeout=ns.timeout)
        if ns.console:
            print(run.console, file=sys.stderr)
        print(json.dumps(run.summary(), indent=1))
        return 0 if run.error is None else 1
    except GuestImageError as exc:
        print(f"guestimage: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
