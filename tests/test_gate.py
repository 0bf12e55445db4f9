"""``orchestrator gate`` end to end: real git, real b4, real redis-server and Celery workers, real pytest.

The "kernel tree" is a small git repository made here; series are ``git format-patch --cover-letter
--thread --base`` output concatenated into an mbox, fed to b4 exactly as a CI bot would. The build
command is tests/data/gate/build.sh. Hosts are two simulated CPUs (tests/data/gate/sim.yaml:
Sapphire Rapids and Zen 4); the "kernel under test" reaches them through the tree's
``pmufarm-sim.yaml`` (uarch -> injected faults). The agent runs the suites of tests/data/gate/tree
(PMUFARM_TREE), except for one test that runs the project's own suites/filter.

The fast tests at the end check the comparison table on hand-made jobs.

All gates of this module share one state directory, so the baseline run by the first gate is
reused by the later ones on the same base commit (as on a farm).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SLOW = pytest.mark.slow

DATA = Path(__file__).resolve().parent / "data" / "gate"
BUILD = f"sh {DATA / 'build.sh'}"
INVENTORY = str(DATA / "sim.yaml")
SPR_CLASS = "intel-sapphirerapids-06-8f-sim"


def gate_cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``orchestrator gate`` as a user runs it (``python -m orchestrator.gate`` until cli.py registers it)."""
    from orchestrator.cli import main

    module = "orchestrator.cli" if "gate" in main.commands else "orchestrator.gate"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "PMUFARM_"))}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", module, "gate", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "Dev", "GIT_AUTHOR_EMAIL": "dev@example.org",
           "GIT_COMMITTER_NAME": "Dev", "GIT_COMMITTER_EMAIL": "dev@example.org"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


class Kernel:
    """A toy kernel tree; ``series()`` commits on a branch from a base and returns the mbox."""

    def __init__(self, root: Path) -> None:
        self.repo, self.root = root / "linux", root
        self.repo.mkdir(parents=True)
        git(self.repo, "init", "-q", "-b", "master")
        self.write({"drivers/kvm/pmu.c": "/* pmu.c */\nint pmu_filter(void)\n{\n\treturn 0;\n}\n",
                    "pmufarm-sim.yaml": "# simulated kernel: uarch glob -> injected faults\n{}\n",
                    "README": "toy kernel\n"})
        git(self.repo, "add", ".")
        git(self.repo, "commit", "-q", "-m", "base")
        git(self.repo, "tag", "base")
        self.base = git(self.repo, "rev-parse", "HEAD")

    def write(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            (self.repo / name).parent.mkdir(parents=True, exist_ok=True)
            (self.repo / name).write_text(text)

    def series(self, name: str, commits: list[tuple[str, dict[str, str]]], on: list[tuple[str, dict[str, str]]]
               = (), base: bool = True) -> Path:
        """Commit ``on`` (not part of the series), then ``commits``; format the latter as one threaded mbox."""
        mbox = self.root / f"{name}.mbx"
        if mbox.exists():
            return mbox
        git(self.repo, "checkout", "-q", "-b", name, "base")
        for msg, files in [*on, *commits]:
            self.write(files)
            git(self.repo, "add", ".")
            git(self.repo, "commit", "-q", "-m", msg)
        outdir = self.root / name
        git(self.repo, "format-patch", "-q", "--cover-letter", "--thread", *(["--base=base"] if base else []),
            "-o", str(outdir), f"HEAD~{len(commits)}")
        git(self.repo, "checkout", "-q", "master")
        mbox.write_text("".join(p.read_text() for p in sorted(outdir.glob("*.patch"))))
        return mbox

    def branch(self, name: str, commits: list[tuple[str, dict[str, str]]]) -> str:
        """Commit ``commits`` on branch ``name`` from base (the developer's branch before sending)."""
        if git(self.repo, "branch", "--list", name):
            return name
        git(self.repo, "checkout", "-q", "-b", name, "base")
        for msg, files in commits:
            self.write(files)
            git(self.repo, "add", ".")
            git(self.repo, "commit", "-q", "-m", msg)
        git(self.repo, "checkout", "-q", "master")
        return name

    def format_patch(self, branch: str, out: Path, *opts: str) -> list[Path]:
        """``git format-patch OPTS -o OUT base..BRANCH``: the files, in name order."""
        git(self.repo, "format-patch", "-q", *opts, "-o", str(out), f"base..{branch}")
        return sorted(out.glob("*.patch"))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Kernel:
    return Kernel(tmp_path_factory.mktemp("kernel"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("gatefarm")
    return {"FARM_STATE_DIR": str(d / "st"), "FARM_AGENT_STATE_DIR": str(d / "agent"),
            "PMUFARM_TREE": str(DATA / "tree")}


def run_gate(kernel: Kernel, env: dict[str, str], mbox: Path, out: Path, *extra: str,
             extra_env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], dict, str]:
    r = gate_cli("--series", str(mbox), "--tree", str(kernel.repo), "--build-cmd", BUILD, "--inventory", INVENTORY,
                 "--out", str(out), *extra, env={**env, **(extra_env or {})})
    report = json.loads((out / "gate.json").read_text()) if (out / "gate.json").exists() else {}
    md = (out / "gate.md").read_text() if (out / "gate.md").exists() else ""
    return r, report, md


def section(md: str, title: str) -> str:
    """The text of one '## <title>...' section of gate.md ('' when absent)."""
    parts = md.split("\n## ")
    return next((p for p in parts if p.startswith(title)), "")


def patchset_hash_by_shell(mbox: Path, tmp: Path) -> str:
    """KCIDB's recipe, independently: b4 am, git mailsplit, `sha256sum * | cut -c-64 | sha256sum`."""
    subprocess.run(["b4", "--offline-mode", "am", "-m", str(mbox), "-o", str(tmp / "b4")], check=True,
                   capture_output=True, stdin=subprocess.DEVNULL)
    mbx = next((tmp / "b4").glob("*.mbx"))
    (tmp / "split").mkdir()
    subprocess.run(["git", "mailsplit", f"-o{tmp / 'split'}", str(mbx)], check=True, capture_output=True)
    return subprocess.run("sha256sum * | cut -c-64 | sha256sum", shell=True, cwd=tmp / "split", check=True,
                          capture_output=True, text=True).stdout.split()[0]


CLEAN = [("kvm: pmu: tidy the filter helper", {"drivers/kvm/pmu.c": "/* pmu.c: tidied */\nint pmu_filter(void)\n"
                                                                    "{\n\treturn 0;\n}\n"})]
BREAKS_SPR = [
    ("kvm: pmu: rework the filter helper", {"drivers/kvm/pmu.c": "/* pmu.c */\nint pmu_filter(void)\n{\n"
                                                                  "\treturn 1;\n}\n"}),
    ("kvm: pmu: skip event filter reprogramming on SPR",
     {"pmufarm-sim.yaml": "# simulated kernel: uarch glob -> injected faults\nsapphirerapids: [filter_ignored]\n"}),
]


@pytest.fixture(scope="module")
def clean_gate(kernel: Kernel, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The first gate of the module: a harmless series; it runs (and stores) the baseline."""
    out = tmp_path_factory.mktemp("clean")
    return run_gate(kernel, env, kernel.series("clean", CLEAN), out / "out")


@SLOW
def test_clean_series_passes(clean_gate, kernel: Kernel) -> None:
    r, report, md = clean_gate
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["verdict"] == "pass" and "PASS" in md
    assert report["base"]["sha"] == kernel.base and "base-commit" in report["base"]["origin"]
    assert report["series"]["patch_count"] == 1
    assert [b["how"] for b in report["runs"]["baseline"]] == ["ran"]
    assert "None." in section(md, "Regressions")
    # Worktrees are gone; the user's tree is as it was.
    assert git(kernel.repo, "worktree", "list").count("\n") == 0
    assert git(kernel.repo, "rev-parse", "HEAD") == kernel.base


@SLOW
def test_regression_detected_on_one_cpu_model(clean_gate, kernel: Kernel, env: dict[str, str],
                                               tmp_path: Path) -> None:
    mbox = kernel.series("breaks-spr", BREAKS_SPR)
    r, report, md = run_gate(kernel, env, mbox, tmp_path / "out")
    assert r.returncode == 1, r.stdout + r.stderr
    regs = [i for i in report["items"] if i["category"] == "regression"]
    assert [(i["nodeid"].split("::")[-1], i["host_class"], i["hosts"]) for i in regs] == \
        [("test_denied_event_reads_zero", SPR_CLASS, ["gate-spr"])]
    assert regs[0]["reruns"] == ["failed", "failed"]          # the flake guard ran, and it stays red
    assert "test_denied_event_reads_zero" in section(md, "Regressions") and "zen4" not in section(md, "Regressions")
    # The baseline stored by the first gate was reused (same base, same suites, same build command).
    assert report["baseline_reused"] and [b["how"] for b in report["runs"]["baseline"]] == ["reused"]
    # Series identity: subject, count, KCIDB patchset hash, base.
    expected_hash = patchset_hash_by_shell(mbox, tmp_path)
    assert report["series"]["patchset_hash"] == expected_hash and expected_hash in md
    assert report["series"]["patch_count"] == 2 and "patches: 2" in md
    assert kernel.base in md
    # JUnit and KCIDB of the candidate run carry the patchset hash.
    cand = tmp_path / "out" / report["runs"]["candidate"]
    kcidb = json.loads((cand / "kcidb.json").read_text())
    assert kcidb["checkouts"][0]["patchset_hash"] == expected_hash
    assert kcidb["checkouts"][0]["git_commit_hash"] == kernel.base
    junit = (cand / "junit" / f"{SPR_CLASS}.xml").read_text()
    assert expected_hash in junit and "test_denied_event_reads_zero" in junit
    assert "regression: suites/gatecheck/test_gatecheck.py::test_denied_event_reads_zero" in r.stdout


@SLOW
def test_known_issue_is_not_counted(clean_gate, kernel: Kernel, env: dict[str, str], tmp_path: Path) -> None:
    known = tmp_path / "known.yaml"
    known.write_text("- test: '*test_denied_event_reads_zero'\n  uarch: sapphire*\n"
                     "  reason: filter rework pending upstream (KVM-1234)\n")
    mbox = kernel.series("breaks-spr", BREAKS_SPR)
    r, report, md = run_gate(kernel, env, mbox, tmp_path / "out", "--known-issues", str(known))
    assert r.returncode == 0, r.stdout + r.stderr
    assert [i["category"] for i in report["items"]] == ["known"]
    assert "KVM-1234" in section(md, "Known issues")
    assert report["runs"]["reruns"] == []  # known breakages are not re-run


@SLOW
def test_flaky_test_is_not_a_regression(clean_gate, kernel: Kernel, env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.mkdir()
    (script / "sapphirerapids").write_text("fail pass")  # candidate run fails, the first re-run passes
    mbox = kernel.series("clean", CLEAN)
    r, report, md = run_gate(kernel, env, mbox, tmp_path / "out", extra_env={"PMUFARM_GATE_SCRIPT_DIR": str(script)})
    assert r.returncode == 0, r.stdout + r.stderr
    flaky = [i for i in report["items"] if i["category"] == "flaky"]
    assert [(i["nodeid"].split("::")[-1], i["hosts"], i["reruns"]) for i in flaky] == \
        [("test_scripted", ["gate-spr"], ["passed"])]
    assert "test_scripted" in section(md, "Flaky") and "None." in section(md, "Regressions")
    assert len(report["runs"]["reruns"]) == 1


@SLOW
def test_series_that_does_not_apply_names_the_patch(kernel: Kernel, env: dict[str, str], tmp_path: Path) -> None:
    """The series was written on top of an unmerged commit: patch 2/2 conflicts on the base."""
    mbox = kernel.series("needs-unmerged", on=[("kvm: pmu: unmerged prerequisite", {"README": "prerequisite\n"})],
                         commits=[("kvm: pmu: harmless first", {"drivers/kvm/extra.c": "int x;\n"}),
                                  ("kvm: pmu: edit on top of the prerequisite", {"README": "prerequisite, edited\n"})])
    out = tmp_path / "out"
    r, report, md = run_gate(kernel, env, mbox, out)
    assert r.returncode == 2, r.stdout + r.stderr
    assert report["verdict"] == "apply-failed"
    assert "patch 2/2" in r.stderr and "edit on top of the prerequisite" in r.stderr
    assert "README" in report["detail"]
    assert "APPLY-FAILED" in md and "patch 2/2" in md
    assert git(kernel.repo, "worktree", "list").count("\n") == 0
    assert "runs" not in report  # no farm time spent


@SLOW
def test_build_failure_is_exit_2_with_log_tail(kernel: Kernel, env: dict[str, str], tmp_path: Path) -> None:
    mbox = kernel.series("breaks-build", [("kvm: pmu: oops", {"drivers/kvm/pmu.c": "#error oops\n"})])
    r, report, md = run_gate(kernel, env, mbox, tmp_path / "out")
    assert r.returncode == 2, r.stdout + r.stderr
    assert report["verdict"] == "build-failed" and "candidate build failed (exit 1)" in r.stderr
    assert "#error directive" in report["detail"] and "#error directive" in md
    assert (tmp_path / "out" / "build-candidate.log").exists()


@SLOW
def test_input_errors_are_one_line_exit_2(kernel: Kernel, env: dict[str, str], tmp_path: Path) -> None:
    # No base-commit trailer and no --base.
    mbox = kernel.series("no-base", CLEAN, base=False)
    r, report, _ = run_gate(kernel, env, mbox, tmp_path / "a")
    assert r.returncode == 2 and "base-commit" in r.stderr and "--base" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and report["verdict"] == "input-error"
    # --base names something the tree does not have.
    r, _, _ = run_gate(kernel, env, mbox, tmp_path / "b", "--base", "v99.0")
    assert r.returncode == 2 and "v99.0" in r.stderr and "not a commit" in r.stderr, r.stderr
    # A Message-ID while lore is unreachable (a proxy on a closed port: fails at once, offline).
    r, report, _ = run_gate(kernel, env, Path("<20260101.gate-test@pmufarm.invalid>"), tmp_path / "c",
                            extra_env={"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("orchestrator:")]
    assert len(errors) == 1 and "lore" in errors[0] and "Traceback" not in r.stderr


@SLOW
def test_real_filter_suite_catches_filter_ignored_on_spr_only(kernel: Kernel, tmp_path: Path) -> None:
    """The project's own suites/filter (installed tree), not the gate's test suite."""
    mbox = kernel.series("breaks-spr", BREAKS_SPR)
    env = {"FARM_STATE_DIR": str(tmp_path / "st"), "FARM_AGENT_STATE_DIR": str(tmp_path / "agent")}
    r, report, md = run_gate(kernel, env, mbox, tmp_path / "out", "--suite", "suites/filter", "--reruns", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    regs = [i for i in report["items"] if i["category"] == "regression"]
    assert regs and {i["host_class"] for i in regs} == {SPR_CLASS}
    assert any("deny_member" in i["nodeid"] for i in regs)


@SLOW
def test_infra_timeout_is_inconclusive_not_regression(clean_gate, kernel: Kernel, env: dict[str, str],
                                                      tmp_path: Path) -> None:
    """A candidate job killed by its timeout is exit 3 (inconclusive), never 1. Runs last: it makes the host
    'unknown' (health check before its next job)."""
    script = tmp_path / "script"
    script.mkdir()
    (script / "zen4").write_text("hang")
    r, report, md = run_gate(kernel, env, kernel.series("clean", CLEAN), tmp_path / "out", "--timeout", "4",
                             extra_env={"PMUFARM_GATE_SCRIPT_DIR": str(script)})
    assert r.returncode == 3, r.stdout + r.stderr
    assert report["verdict"] == "inconclusive"
    assert [(i["host"], i["suite"]) for i in report["inconclusive"]] == [("gate-zen4", "gatecheck")]
    assert "timeout" in report["inconclusive"][0]["why"]
    assert "Inconclusive" in md and "None." in section(md, "Regressions")


def _regressions(report: dict) -> list[tuple[str, str, tuple[str, ...]]]:
    return sorted((i["nodeid"].split("::")[-1], i["host_class"], tuple(i["hosts"]))
                  for i in report.get("items") or [] if i["category"] == "regression")


FIVE = [("kvm: pmu: rename the filter helper", {"drivers/kvm/pmu.c": "/* pmu.c */\nint pmu_filter_v2(void)\n"
                                                                      "{\n\treturn 0;\n}\n"}),
        ("kvm: pmu: add a counter helper", {"drivers/kvm/counter.c": "int pmu_counter(void) { return 0; }\n"}),
        ("kvm: pmu: skip event filter reprogramming on SPR",
         {"pmufarm-sim.yaml": "# simulated kernel: uarch glob -> injected faults\nsapphirerapids: [filter_ignored]\n"}),
        ("kvm: pmu: document the helpers", {"README": "toy kernel, documented\n"}),
        ("kvm: pmu: tidy the counter helper", {"drivers/kvm/counter.c": "int pmu_counter(void)\n{\n\treturn 0;\n}\n"})]


@SLOW
def test_five_patch_series_is_bisected_to_the_third(clean_gate, kernel: Kernel, env: dict[str, str],
                                                    tmp_path: Path) -> None:
    """Plain format-patch output in a directory (no cover letter, no thread, no base trailer): the third of
    five patches breaks the event filter on Sapphire Rapids; bisection names it in O(log n) builds, running
    only the regressed test on the host that regressed."""
    kernel.branch("five", FIVE)
    kernel.format_patch("five", tmp_path / "p")
    r, report, md = run_gate(kernel, env, tmp_path / "p", tmp_path / "out", "--base", "base")
    assert r.returncode == 1, r.stdout + r.stderr
    assert report["series"]["form"] == "git am order" and report["series"]["patch_count"] == 5
    b = report["bisect"]
    bad = b["first_bad"]
    assert bad["index"] == 3 and "skip event filter reprogramming on SPR" in bad["subject"], b
    assert [t.split("::")[-1] for t in bad["tests"]] == ["test_denied_event_reads_zero on gate-spr"]
    # The applied commit (git am made it, in the tree's object store) is the third patch, same diff:
    assert git(kernel.repo, "log", "-1", "--format=%s", bad["commit"]) == FIVE[2][0]
    assert git(kernel.repo, "diff", f"{bad['commit']}~1", bad["commit"]) == git(kernel.repo, "diff", "five~3", "five~2")
    assert 2 <= b["builds"] <= 3  # ceil(log2 5)
    assert {st["index"]: st["result"] for st in b["steps"]}.get(3) == "bad"
    from orchestrator.store import Store

    store = Store(Path(env["FARM_STATE_DIR"]) / "pmufarm.sqlite")
    step_jobs = [j for st in b["steps"] for rid in st["runs"] for j in store.jobs(rid) if j["suite"] == "gatecheck"]
    assert step_jobs and {j["host"] for j in step_jobs} == {"gate-spr"}
    assert {t["nodeid"].split("::")[-1] for j in step_jobs for t in j["tests"]} == {"test_denied_event_reads_zero"}
    assert "## First bad patch" in md and "patch 3/5" in section(md, "First bad patch")
    assert "first bad patch: 3/5" in r.stdout
    assert report["timing"]["to_first_bad"] >= report["timing"]["to_verdict"] > 0


@SLOW
def test_every_series_form_gives_the_mbox_verdict(clean_gate, kernel: Kernel, env: dict[str, str],
                                                  tmp_path: Path) -> None:
    """The threaded mbox with a cover letter is the reference; a developer's other forms must agree."""
    # --reruns 0: the flake guard is the verdict's business (tested above); here only the intake differs.
    ref_r, ref, _ = run_gate(kernel, env, kernel.series("breaks-spr", BREAKS_SPR), tmp_path / "ref", "--no-bisect",
                             "--reruns", "0")
    assert ref_r.returncode == 1 and _regressions(ref), ref_r.stdout + ref_r.stderr
    branch = kernel.branch("breaks-spr-dev", BREAKS_SPR)
    plain = kernel.format_patch(branch, tmp_path / "plain", "--base=base")
    cover = kernel.format_patch(branch, tmp_path / "cover", "--cover-letter", "--base=base")
    kernel.format_patch(branch, tmp_path / "threaded", "--cover-letter", "--thread", "--base=base")
    stdout_mbox = tmp_path / "stdout.mbox"
    stdout_mbox.write_text(git(kernel.repo, "format-patch", "--stdout", f"base..{branch}") + "\n")
    forms = {
        "one plain file per --series": (["--series", str(plain[0]), "--series", str(plain[1])], "git am order"),
        "shell-expanded *.patch with a cover": (["--series", *map(str, cover)], "git am order"),
        "directory, threaded, cover letter": (["--series", str(tmp_path / "threaded")], "b4"),
        "format-patch --stdout mbox, --base": (["--series", str(stdout_mbox), "--base", "base"], "git am order"),
        "git range": (["--range", f"base..{branch}"], "git range"),
        "git range in --series": (["--series", f"base..{branch}"], "git range"),
    }
    for name, (args, form) in forms.items():
        out = tmp_path / name.replace(" ", "_")
        r = gate_cli(*args, "--tree", str(kernel.repo), "--build-cmd", BUILD, "--inventory", INVENTORY,
                     "--out", str(out), "--no-bisect", "--reruns", "0", env=env)
        report = json.loads((out / "gate.json").read_text())
        assert r.returncode == 1, (name, r.stdout + r.stderr)
        assert report["series"]["form"] == form, name
        assert report["series"]["patch_count"] == 2 and report["base"]["sha"] == kernel.base, name
        assert _regressions(report) == _regressions(ref), name
        assert "bisect" not in report and any("--no-bisect" in n for n in report["notes"]), name


@SLOW
def test_base_option_wins_over_the_trailer(clean_gate, kernel: Kernel, env: dict[str, str], tmp_path: Path) -> None:
    """The series says base-commit: <base>; --base names a later commit: the gate tests on --base and says so."""
    base2 = git(kernel.repo, "rev-parse", kernel.branch("base2", [("docs: pmu notes",
                                                                    {"Documentation/pmu.rst": "PMU notes\n"})]))
    r, report, md = run_gate(kernel, env, kernel.series("clean", CLEAN), tmp_path / "out", "--base", "base2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["base"] == {"sha": base2, "origin": "--base base2"}
    line = f"--base base2 ({base2[:12]}) wins over the series' base-commit: trailer of the series {kernel.base[:12]}"
    assert line in r.stdout and line in report["notes"] and line in md


def test_garbage_series_is_one_line_exit_2(kernel: Kernel, env: dict[str, str], tmp_path: Path) -> None:
    """Not a patch, a bare diff, an empty directory, a range with no commits: exit 2, one line naming it."""
    (tmp_path / "notes.txt").write_text("hello\nthis is not a patch\n")
    (tmp_path / "bare.diff").write_text("--- a/README\n+++ b/README\n@@ -1 +1 @@\n-toy kernel\n+toy\n")
    (tmp_path / "mail.eml").write_text("From: Dev <dev@example.org>\nSubject: lunch?\n\nnoon?\n")
    (tmp_path / "empty").mkdir()
    cases = {"notes.txt": "not a patch", "bare.diff": "not a patch", "mail.eml": "not a patch",
             "empty": "no *.patch files", "base..base": "no commits", "missing.patch": "no such file",
             "base..no-such-branch": "not a range"}
    for name, why in cases.items():
        spec = name if ".." in name else str(tmp_path / name)
        r, report, _ = run_gate(kernel, env, spec, tmp_path / f"out-{name}")
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("orchestrator:")]
        assert r.returncode == 2 and len(errors) == 1, (name, r.stderr)
        assert name in errors[0] and why in errors[0] and "Traceback" not in r.stderr, (name, errors[0])
        assert report["verdict"] == "input-error"


def test_bisect_leaves_out_hosts_with_a_fixed_kernel(tmp_path: Path) -> None:
    """A provision: none host runs the same kernel at every step: bisecting there would blame patch 1."""
    from orchestrator.gate.bisect import bisect
    from orchestrator.gate.series import Patch, Series
    from orchestrator.gate.verdict import Item, render_markdown
    from orchestrator.inventory import Host
    from orchestrator.runner import RunOptions

    series = Series("s", tmp_path / "s.mbx", "subj", [Patch(i, f"p{i}", "0" * 64, tmp_path) for i in (1, 2, 3)], None)
    item = Item("regression", "cls", "zen4", "real-1", "s", "suites/s/test_x.py::t", "passed", "failed")

    def never(*_: object) -> str:
        raise AssertionError("nothing may be built or run")

    b = bisect(series, ["a", "b", "c"], tmp_path, [item], [Host(name="real-1", address="10.0.0.1")], 2, never,
               never, None, RunOptions(), never, lambda _m: None)
    assert b["first_bad"] is None and b["builds"] == 0
    assert "real-1" in b["message"] and "provision: none" in b["message"]
    md = render_markdown({"verdict": "regression", "exit_code": 1, "series": {"patch_count": 3}, "bisect": b})
    assert "fixed kernel" in section(md, "First bad patch")


def test_bisect_search_is_logarithmic() -> None:
    import math

    from orchestrator.gate.bisect import search

    for n in range(2, 17):
        for first in range(1, n + 1):
            asked: list[int] = []

            def test(k: int, first: int = first, asked: list[int] = asked) -> str:
                asked.append(k)
                return "bad" if k >= first else "good"

            assert search(n, test) == (first, first - 1, first)
            assert len(asked) <= math.ceil(math.log2(n)), (n, first, asked)
    # Untestable commits are skipped; when nothing in between builds, a range comes back.
    assert search(5, lambda k: {2: "untestable"}.get(k, "bad" if k >= 4 else "good")) == (4, 3, 4)
    assert search(5, lambda k: {2: "untestable"}.get(k, "bad" if k >= 3 else "good")) == (None, 1, 3)  # 2 or 3
    assert search(3, lambda k: "untestable") == (None, 0, 3)
    assert search(5, lambda k: "inconclusive") == (None, 0, 5)


# -- the comparison table, on hand-made jobs (fast) ------------------------------------------------------

def _job(host: str, status: str, outcomes: dict[str, str], uarch: str = "sapphirerapids") -> dict:
    facts = {"simulated": True, "cpu": {"vendor": "intel", "uarch": uarch, "family": 6, "model": 0x8F}, "errata": []}
    return {"host": host, "suite": "s", "status": status, "facts": facts,
            "log_tail": "boom" if status != "passed" else "",
            "tests": [{"nodeid": f"suites/s/test_x.py::{n}", "outcome": o, "message": f"{n} said {o}"}
                      for n, o in outcomes.items()]}


def test_compare_table() -> None:
    from orchestrator.gate.baseline import host_class
    from orchestrator.gate.verdict import KnownIssue, compare, decide

    base = _job("a", "failed", {"reg": "passed", "xf": "xfailed", "fix": "failed", "same": "failed", "skip": "passed",
                                "gone": "passed", "known": "passed", "flaky": "passed", "ok": "passed"})
    cand = _job("a", "failed", {"reg": "failed", "xf": "error", "fix": "passed", "same": "failed", "skip": "skipped",
                                "known": "failed", "flaky": "failed", "ok": "passed"})
    cls = host_class(cand["facts"])
    baselines = {(cls, "s"): base}
    known = [KnownIssue(test="*::known", uarch="sapphire*", reason="tracked")]
    reruns = {("a", "suites/s/test_x.py::flaky"): ["failed", "passed"],
              ("a", "suites/s/test_x.py::reg"): ["failed", "failed"],
              ("a", "suites/s/test_x.py::xf"): [None, None]}
    items, inc = compare(baselines, [cand], {}, known, reruns, 2, expected=[("a", "s"), ("b", "s")])
    got = {i.nodeid.split("::")[-1]: i.category for i in items}
    assert got == {"reg": "regression", "xf": "unconfirmed", "fix": "fix", "same": "unchanged", "skip": "regression",
                   "gone": "regression", "known": "known", "flaky": "flaky"}
    assert [(i.host, i.why.split(":")[0]) for i in inc] == [("b", "no candidate job")]
    assert decide(items, inc) == ("regression", 1)
    # Without the regressions: unconfirmed + a missing host -> inconclusive; all clean -> pass.
    rest = [i for i in items if i.category != "regression"]
    assert decide(rest, inc) == ("inconclusive", 3)
    assert decide([i for i in rest if i.category != "unconfirmed"], []) == ("pass", 0)
    # A class without a baseline, and an infra job, are inconclusive, never compared.
    other = _job("c", "passed", {"reg": "failed"}, uarch="zen4")
    infra = {**_job("d", "infra_error", {}), "log_tail": "probing facts failed"}
    items, inc = compare(baselines, [other, infra], {}, [])
    assert items == [] and [i.why.split(" for")[0] for i in inc] == ["no baseline", "candidate job infra_error: "
                                                                    "probing facts failed"]


def test_patchset_hash_is_kcidb_recipe() -> None:
    import hashlib

    from orchestrator.gate.series import patchset_hash

    digests = [hashlib.sha256(b"patch one").hexdigest(), hashlib.sha256(b"patch two").hexdigest()]
    expected = hashlib.sha256((digests[0] + "\n" + digests[1] + "\n").encode()).hexdigest()
    assert patchset_hash(digests) == expected and patchset_hash([]) == ""


def test_sim_map_faults_for_uarch(tmp_path: Path) -> None:
    from orchestrator.gate.build import faults_for, load_sim_map
    from orchestrator.gate.common import GateError

    (tmp_path / "pmufarm-sim.yaml").write_text("sapphirerapids: [filter_ignored]\n'zen*': [pmi_lost]\n'*': []\n")
    m = load_sim_map(tmp_path)
    assert faults_for(m, "sapphirerapids") == ["filter_ignored"] and faults_for(m, "zen4") == ["pmi_lost"]
    assert faults_for(m, "graniterapids") == [] and faults_for(None, "zen4") == []
    (tmp_path / "pmufarm-sim.yaml").write_text("zen4: [no_such_fault]\n")
    with pytest.raises(GateError, match="unknown fault 'no_such_fault'"):
        load_sim_map(tmp_path)


def test_upstream_suites_run_the_gate_tree_on_local_hosts(tmp_path: Path) -> None:
    """suites/kselftest_kvm judges a series by its own tree: provision_tree points local hosts' kernel_tree at
    the worktree the gate built; a remote host (which cannot see it) keeps its inventory value."""
    from orchestrator.gate.build import Build
    from orchestrator.gate.provision import SshOptions
    from orchestrator.gate.run import provision_tree
    from orchestrator.inventory import Host

    hosts = [Host(name="here"), Host(name="there", address="farm1.example", kernel_tree="/srv/linux")]
    build = Build(role="candidate", worktree=tmp_path, commit="0" * 40, cmd="true", duration=0.0,
                  log=tmp_path / "log", sim_faults=None)
    prov = provision_tree(tmp_path, hosts, build, 1.0, lambda *_: None, SshOptions())
    trees = {h.name: h.kernel_tree for h in prov.hosts}
    assert trees == {"here": str(tmp_path), "there": "/srv/linux"}
