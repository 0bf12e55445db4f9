"""Upstream test suites the farm runs as they are: the KVM PMU selftests and kvm-unit-tests.

Where the code under test comes from (first hit wins; the suites report which):

* the kernel tree: ``--kernel-tree`` (pytest option), env ``PMUFARM_KERNEL_TREE``, the host
  entry's ``kernel_tree`` (inventory, or the gate's candidate tree), then the Debian
  ``linux-source-6.12`` tree unpacked by :func:`fetch_linux_source` into the cache;
* kvm-unit-tests: ``--kvm-unit-tests``, env ``PMUFARM_KVM_UNIT_TESTS``, the host entry's
  ``kvm_unit_tests``. It is not packaged by any registry reachable here, so there is no fallback.

Only the PMU selftests are built (``make`` with explicit targets of
``tools/testing/selftests/kvm``), out of tree: kernel headers go to ``make O=<cache> headers`` and
objects to ``OUTPUT=<cache>``, so the source tree is only read. The build directory is keyed by
the tree's path; ``make`` rebuilds what changed (a candidate tree after ``git am``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.guestimage import GuestImageError, apt_download, cache_dir

# The PMU selftests KVM developers run (torvalds/linux tools/testing/selftests/kvm/x86[_64]/);
# svm_pmu_host_guest_test is newer than 6.12, the others are in it.
PMU_SELFTESTS = ("pmu_counters_test", "pmu_event_filter_test", "vmx_pmu_caps_test", "svm_pmu_host_guest_test")
# kvm-unit-tests x86/unittests.cfg sections for the PMU
KVM_UNIT_TESTS = ("pmu", "pmu_lbr", "pmu_pebs")

LINUX_SOURCE_PACKAGE = os.environ.get("PMUFARM_LINUX_SOURCE_PACKAGE", "linux-source-6.12")
# What `make headers` and the selftests build read; the rest of the 1.4 GB tree is left packed.
SOURCE_PARTS = ("Makefile", "Kbuild", "Kconfig", "arch/Kconfig", "scripts/", "include/", "arch/x86/",
                "tools/", "usr/")
SOURCE_SKIP = ("tools/perf/",)
SELFTEST_TIMEOUT = float(os.environ.get("PMUFARM_SELFTEST_TIMEOUT", "300"))


class UpstreamError(RuntimeError):
    """A tree or checkout is missing or does not build; the message names what and where."""


# --------------------------------------------------------------------------------------------------
# Where things are


def first_source(option: str | None, env: str, host: dict | None, field_name: str) -> tuple[str | None, str]:
    """``(path, where it came from)`` for an upstream checkout; ``(None, tried)`` when none is set."""
    for value, where in ((option, f"--{field_name.replace('_', '-')}"), (os.environ.get(env), env),
                         ((host or {}).get(field_name), f"host entry field {field_name!r}")):
        if value:
            return str(value), where
    return None, f"--{field_name.replace('_', '-')}, env {env} and the host entry's {field_name!r} are unset"


def debian_tree() -> Path:
    return cache_dir() / LINUX_SOURCE_PACKAGE


def kvm_selftests_dir(tree: Path) -> tuple[Path, str]:
    """``(tools/testing/selftests/kvm, arch dir)``: ``x86_64`` up to 6.12, ``x86`` after the rename."""
    kvm = tree / "tools" / "testing" / "selftests" / "kvm"
    if not (kvm / "Makefile").is_file():
        raise UpstreamError(f"{tree}: no tools/testing/selftests/kvm/Makefile (not a kernel tree?)")
    for arch in ("x86", "x86_64"):
        if any((kvm / arch / f"{t}.c").is_file() for t in PMU_SELFTESTS):
            return kvm, arch
    raise UpstreamError(f"{kvm}: none of {', '.join(PMU_SELFTESTS)} under x86/ or x86_64/")


def present_selftests(tree: Path) -> dict[str, bool]:
    kvm, arch = kvm_selftests_dir(tree)
    return {t: (kvm / arch / f"{t}.c").is_file() for t in PMU_SELFTESTS}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder/extractor at a time per cache entry (two suites may start together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _wanted(member: str, top: str) -> bool:
    rel = member[len(top) + 1:] if member.startswith(top + "/") else ""
    if not rel or any(rel.startswith(s) for s in SOURCE_SKIP):
        return False
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in SOURCE_PARTS)


def fetch_linux_source(dest: Path | None = None, package: str = LINUX_SOURCE_PACKAGE) -> Path:
    """Debian's kernel source package, downloaded (``apt-get download``, nothing installed) and
    unpacked into the cache, only the parts the selftests build reads. Idempotent."""
    dest = dest or cache_dir() / package
    stamp = dest / ".pmufarm-complete"
    if stamp.is_file():
        return dest
    with _locked(dest.with_name(dest.name + ".lock")):
        if stamp.is_file():
            return dest
        with tempfile.TemporaryDirectory(prefix="pmufarm-src-", dir=dest.parent) as tmp:
            try:
                deb = apt_download(package, Path(tmp), missing=package)
            except GuestImageError as exc:
                raise UpstreamError(str(exc)) from None
            # the .deb holds /usr/src/<package>.tar.xz; pull that out, then the wanted members
            xz = Path(tmp) / "src.tar.xz"
            with open(xz, "wb") as out, subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                                        stdout=subprocess.PIPE) as proc:
                assert proc.stdout is not None
                with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
                    for member in outer:
                        if member.name.endswith(".tar.xz") and "/usr/src/" in member.name:
                            shutil.copyfileobj(outer.extractfile(member), out)  # type: ignore[arg-type]
                            break
            deb.unlink()
            if xz.stat().st_size == 0:
                raise UpstreamError(f"{deb.name}: no /usr/src/*.tar.xz inside")
            unpacked = Path(tmp) / "tree"
            unpacked.mkdir()
            # xz with threads is faster than Python's lzma (which is the fallback); members filtered by name
            xzcat = subprocess.Popen(["xz", "-T0", "-dc", str(xz)], stdout=subprocess.PIPE) \
                if shutil.which("xz") else None
            try:
                with (tarfile.open(fileobj=xzcat.stdout, mode="r|") if xzcat else
                      tarfile.open(xz, mode="r|xz")) as src:
                    for member in src:
                        top = member.name.split("/", 1)[0]
                        if _wanted(member.name, top):
                            src.extract(member, unpacked, filter="tar")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise UpstreamError(f"{package}: unpacking {xz.name} failed: {exc}") from None
            finally:
                if xzcat:
                    xzcat.wait()
            tops = [p for p in unpacked.iterdir() if p.is_dir()]
            if (xzcat and xzcat.returncode != 0) or len(tops) != 1:
                raise UpstreamError(f"{package}: unpacking {xz.name} failed "
                                    f"(xz exit {xzcat.returncode if xzcat else '-'}, {len(tops)} top directories)")
            if dest.exists():
                shutil.rmtree(dest)
            tops[0].rename(dest)
            (dest / "SOURCE").write_text(f"{deb.name} from Debian via apt-get download; only "
                                         f"{' '.join(SOURCE_PARTS)} unpacked\n")
            stamp.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return dest


# --------------------------------------------------------------------------------------------------
# Building the PMU selftests


@dataclass
class SelftestBuild:
    tree: Path
    out: Path
    arch: str
    programs: dict[str, Path] = field(default_factory=dict)   # built binaries
    absent: list[str] = field(default_factory=list)          # not in this tree
    seconds: float = 0.0
    log: str = ""


def build_dir(tree: Path) -> Path:
    key = hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "kselftest-kvm" / key


def _make(args: list[str], cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))
    return subprocess.run(["make", "-s", f"-j{jobs}", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _make_failure(r: subprocess.CompletedProcess[str]) -> str:
    """make's first ``error`` line first (reports show one line), then the tail of its output."""
    text = (r.stderr or r.stdout or "").strip()
    first = next((ln.strip() for ln in text.splitlines() if "error" in ln.lower()), f"exit status {r.returncode}")
    return f"{first}\n{text[-1500:]}"


def build_pmu_selftests(tree: Path | str) -> SelftestBuild:
    """Build the PMU selftests present in ``tree`` into the cache (incremental), or raise
    :class:`UpstreamError` with the tail of make's output."""
    tree = Path(tree)
    if not shutil.which("make") or not shutil.which(os.environ.get("CC", "gcc")):
        raise UpstreamError("building the KVM selftests needs make and gcc")
    kvm, arch = kvm_selftests_dir(tree)
    present = present_selftests(tree)
    out = build_dir(tree)
    build = SelftestBuild(tree=tree, out=out, arch=arch, absent=[t for t, ok in present.items() if not ok])
    start = time.monotonic()
    with _locked(out / ".lock"):
        (out / "tree").write_text(f"{tree.resolve()}\n")
        headers = _make([f"O={out / 'kbuild'}", "headers"], cwd=tree)
        if headers.returncode != 0:
            raise UpstreamError(f"{tree}: make headers failed: {_make_failure(headers)}")
        targets = [str(out / "sel" / arch / t) for t, ok in present.items() if ok]
        r = _make([f"OUTPUT={out / 'sel'}", f"KHDR_INCLUDES=-isystem {out / 'kbuild' / 'usr' / 'include'}",
                   *targets], cwd=kvm)
        build.log = (r.stdout + r.stderr)[-3000:]
        if r.returncode != 0:
            raise UpstreamError(f"{kvm}: make {' '.join(Path(t).name for t in targets)} failed: "
                                f"{_make_failure(r)}")
    build.programs = {Path(t).name: Path(t) for t in targets}
    build.seconds = time.monotonic() - start
    return build


@dataclass
class ProgramRun:
    program: str
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    seconds: float


def run_program(path: Path, timeout: float = SELFTEST_TIMEOUT, args: list[str] | None = None) -> ProgramRun:
    """Run one selftest binary in its own process group; the whole group dies on timeout."""
    start = time.monotonic()
    proc = subprocess.Popen([str(path), *(args or [])], cwd=path.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return ProgramRun(path.name, out, err, None if timed_out else proc.returncode, timed_out,
                      time.monotonic() - start)


# --------------------------------------------------------------------------------------------------
# kvm-unit-tests


ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
# runtime.bash's per-test verdict line, printed only without -t: "SKIP pmu (reason)", "FAIL pmu (...)"
VERDICT_RE = re.compile(r"^(PASS|FAIL|SKIP)\s+(\S+)\s*(?:\((.*)\))?\s*$")


def kvm_unit_tests_ready(checkout: Path) -> Path:
    """The checkout, configured and built (``./configure && make`` when ``config.mak`` or the PMU
    flat files are missing); raises :class:`UpstreamError` naming what failed."""
    if not (checkout / "run_tests.sh").is_file() or not (checkout / "x86" / "unittests.cfg").is_file():
        raise UpstreamError(f"{checkout}: not a kvm-unit-tests checkout (no run_tests.sh or x86/unittests.cfg)")
    if not (checkout / "config.mak").is_file():
        r = subprocess.run(["./configure"], cwd=checkout, capture_output=True, text=True, timeout=300, check=False)
        if r.returncode != 0:
            raise UpstreamError(f"{checkout}: ./configure failed: {_make_failure(r)}")
    if not all((checkout / "x86" / f"{t}.flat").is_file() for t in KVM_UNIT_TESTS):
        r = _make([], cwd=checkout)
        if r.returncode != 0:
            raise UpstreamError(f"{checkout}: make failed: {_make_failure(r)}")
    return checkout


def kvm_unit_results(test: str, tap_stdout: str, log_text: str, plain_stdout: str = "") -> list[Any]:
    """Results of ``run_tests.sh -t TEST``: one per TAP point (each report() line of the test).

    run_tests.sh -t turns the test's PASS/FAIL/SKIP report lines into TAP points and sends its own
    per-test verdict (a skip by the unittests.cfg ``check``, a timeout, a QEMU crash) to /dev/null
    (kvm-unit-tests run_tests.sh, process_test_output). So: a test with no points is judged by the
    verdict line of a plain ``run_tests.sh TEST`` (``plain_stdout``); a test whose log
    (logs/TEST.log) has no ``SUMMARY:`` line did not finish, whatever it reported before.
    """
    from agent import ktap

    stream = ktap.parse(tap_stdout)
    results = ktap.flatten(stream)
    log_lines = log_text.splitlines()
    for r in results:
        # -t output carries no diagnostics: the report line is the point's name, the context is in the log
        text = r.name[len(test) + 2:] if r.name.startswith(f"{test}: ") else r.name
        if r.outcome == "skipped" and r.message in ("", "SKIP"):
            r.message = text
        elif r.outcome == "failed" and not r.message:
            at = next((i for i, ln in enumerate(log_lines) if ln.strip() == f"FAIL: {text}"), None)
            context = log_lines[max(0, at - 20):at] if at is not None else []
            r.message = "\n".join([f"FAIL: {text}", *context])  # the verdict first, then what the test printed
    if stream.points:
        if "SUMMARY:" not in log_text:
            tail = "\n".join(log_text.strip().splitlines()[-20:])
            results.append(ktap.TapResult(f"{test}: (incomplete)", "error",
                                          f"{test} ended without its SUMMARY line (crash or timeout)\n{tail}"))
        return results
    for line in plain_stdout.splitlines():
        m = VERDICT_RE.match(ANSI_RE.sub("", line).strip())
        if m and m.group(2) == test:
            verdict, why = m.group(1), (m.group(3) or "").strip()
            outcome = {"PASS": "passed", "SKIP": "skipped"}.get(verdict, "failed")
            if outcome == "failed" and ("timeout" in why or "terminated on SIG" in why):
                outcome = "error"
            return [ktap.TapResult(test, outcome, why or verdict)]
    tail = "\n".join((log_text or plain_stdout).strip().splitlines()[-20:])
    return [ktap.TapResult(test, "error", f"run_tests.sh reported nothing for {test}\n{tail}")]


def run_kvm_unit_test(checkout: Path, test: str, timeout: float = SELFTEST_TIMEOUT,
                      env: dict[str, str] | None = None) -> list[Any]:
    """``./run_tests.sh -t TEST`` in the checkout (and the plain form when it printed no point)."""
    from agent import ktap

    full = {**os.environ, **(env or {})}
    try:
        tap = subprocess.run(["./run_tests.sh", "-t", test], cwd=checkout, capture_output=True, text=True,
                             timeout=timeout, env=full, check=False, start_new_session=True)
    except subprocess.TimeoutExpired:
        return [ktap.TapResult(test, "error", f"run_tests.sh -t {test} timed out after {timeout:g}s")]
    log = checkout / "logs" / f"{test}.log"
    log_text = log.read_text(errors="replace") if log.is_file() else ""
    plain = ""
    if not ktap.parse(tap.stdout).points:
        with contextlib.suppress(subprocess.TimeoutExpired):
            plain = subprocess.run(["./run_tests.sh", test], cwd=checkout, capture_output=True, text=True,
                                   timeout=timeout, env=full, check=False, start_new_session=True).stdout
    return kvm_unit_results(test, tap.stdout, log_text, plain)


# --------------------------------------------------------------------------------------------------
# pytest glue shared by suites/kselftest_kvm and suites/kvm_unit_tests


def host_entry(config: Any) -> dict[str, Any]:
    """The inventory host entry the agent handed to pytest (``--pmufarm-host``, contracts §4)."""
    path = config.getoption("pmufarm_host", None) or os.environ.get("PMUFARM_HOST_FILE")
    if not path:
        return {}
    try:
        host = json.loads(Path(path).read_text()).get("host")
    except (OSError, ValueError, AttributeError):
        return {}  # the plugin reports a bad host file itself
    return host if isinstance(host, dict) else {}


def not_real_kvm(host: dict[str, Any], suite: str) -> str | None:
    """Upstream tests drive the host's real KVM: on a host whose driver is not ``kvm`` (simulated
    ``model``, VMM-``emulated``) they would report this machine under that host's name."""
    driver = host.get("driver", "kvm")
    if driver == "kvm":
        return None
    return (f"suites/{suite} runs upstream tests against the host's real KVM; host {host.get('name', '?')} "
            f"uses driver {driver}, which they cannot run on")


def point_params(results: list[Any]) -> list[Any]:
    """One ``pytest.param`` per upstream result; the id is the point's name ("::" would split a node
    id, so it becomes ":"), which keeps re-runs by node id (the gate's flake guard) working."""
    import pytest

    return [pytest.param(r, id=r.name.replace("::", ":")) for r in results]


def judge_setup(request: Any, result: Any) -> Any:
    """Setup half of an upstream point: an ``error`` point errors here (pytest reports an error,
    not a failure); an ``xpassed`` point gets a non-strict xfail marker so passing reports XPASS."""
    import pytest

    request.node.user_properties.append(("upstream_point", result.name))
    if result.outcome == "error":
        pytest.fail(result.message or "error", pytrace=False)
    if result.outcome == "xpassed":
        request.node.add_marker(pytest.mark.xfail(reason=result.message or "TODO", strict=False))
    return result


def judge_call(result: Any) -> None:
    """Call half: the upstream verdict as the pytest outcome, with its own words."""
    import pytest

    if result.outcome == "skipped":
        pytest.skip(result.message or "skipped (no reason given)")
    if result.outcome == "failed":
        pytest.fail(result.message or "failed (no diagnostics)", pytrace=False)
    if result.outcome == "xfailed":
        pytest.xfail(result.message or "expected failure")


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.upstream fetch-linux-source | build-selftests [TREE]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["fetch-linux-source"]:
            print(fetch_linux_source())
            return 0
        if argv[:1] == ["build-selftests"]:
            tree = Path(argv[1]) if len(argv) > 1 else fetch_linux_source()
            b = build_pmu_selftests(tree)
            for name, path in b.programs.items():
                print(f"{name}\t{path}")
            print(f"built in {b.seconds:.1f}s; not in this tree: {', '.join(b.absent) or '-'}", file=sys.stderr)
            return 0
    except UpstreamError as exc:
        print(f"agent.upstream: {exc}", file=sys.stderr)
        return 2
    print("usage: python -m agent.upstream fetch-linux-source | build-selftests [TREE]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
