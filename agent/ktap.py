"""KTAP (kselftest, KUnit) and TAP 13/14 (kvm-unit-tests' ``run_tests.sh -t``) as test results.

One small parser, because no maintained PyPI parser follows KTAP's nesting: ``tap.py`` (3.2.1)
parses TAP 13 line by line and treats indented result lines as unknown text; ``pytap13`` and
``taptaptap`` are unmaintained and flat too. What it follows (torvalds/linux
Documentation/dev-tools/ktap.rst, KTAP version 1):

* version lines ``KTAP version 1`` / ``TAP version 13|14``; plan ``1..N`` (first or last);
  ``1..0 # SKIP reason`` skips the whole program;
* result lines ``ok|not ok <n> [- ]<name> [# <DIRECTIVE> [reason]]``, directives SKIP, TODO,
  XFAIL, TIMEOUT, ERROR (case-insensitive);
* nesting by indentation (2 spaces per level in KTAP, 4 in older KUnit output): a subtest's lines
  come first, its parent's result line (one level out) closes it;
* diagnostic lines ``# ...`` and any unknown line are kept, in order, as the next result's text;
  a TAP 13 YAML block (``---`` .. ``...``) after a result belongs to that result;
* ``Bail out!`` stops the stream.

A stream that ends early -- fewer points than planned, no plan at all, a subtest never closed by
its parent's result line -- is not complete, and :func:`flatten` turns that into an ``error``
result: a crash mid-output never reads as a pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

VERSION_RE = re.compile(r"^(K?TAP) version (\d+)\s*$")
PLAN_RE = re.compile(r"^1\.\.(\d+)\s*(?:#\s*(.*))?$")
RESULT_RE = re.compile(r"^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*)$")
BAIL_RE = re.compile(r"^Bail out!\s*(.*)$", re.IGNORECASE)
DIRECTIVE_RE = re.compile(r"^(.*?)\s*(?<!\\)#\s*(SKIP|TODO|XFAIL|TIMEOUT|ERROR)\b\s*(.*)$", re.IGNORECASE)

# outcome vocabulary of the result rows (contracts §5)
OUTCOMES = ("passed", "failed", "skipped", "xfailed", "xpassed", "error")


@dataclass
class TapPoint:
    number: int | None
    name: str
    ok: bool
    directive: str | None = None       # SKIP TODO XFAIL TIMEOUT ERROR, upper case
    reason: str = ""                   # the text after the directive
    diagnostics: list[str] = field(default_factory=list)
    subtests: TapStream | None = None

    @property
    def outcome(self) -> str:
        d = self.directive
        if d == "SKIP":
            return "skipped"
        if d in ("TODO", "XFAIL"):
            # TODO: a known failure (TAP); XFAIL: "expected to fail, and did" (KTAP)
            return "xpassed" if self.ok and d == "TODO" else "xfailed"
        if d in ("TIMEOUT", "ERROR"):
            return "error"
        return "passed" if self.ok else "failed"


@dataclass
class TapStream:
    """One level of a KTAP document: the top or a subtest's body."""

    indent: int = 0
    version: str | None = None
    plan: int | None = None
    skip_all: str | None = None        # ``1..0 # SKIP reason``
    points: list[TapPoint] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)   # diagnostics not yet claimed by a result
    bail_out: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems and self.bail_out is None

    def check_plan(self) -> None:
        if self.plan is None and not self.points and self.skip_all is None:
            self.problems.append("no plan and no test points (output ended before any result)")
        elif self.plan is None:
            self.problems.append(f"no plan line after {len(self.points)} test point(s) "
                                 "(output ended before the trailing plan)")
        elif len(self.points) < self.plan:
            self.problems.append(f"stream ended after {len(self.points)} of {self.plan} planned test points")
        elif len(self.points) > self.plan:
            self.problems.append(f"{len(self.points)} test points but the plan says {self.plan}")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _result(text: str) -> TapPoint | None:
    m = RESULT_RE.match(text)
    if not m:
        return None
    rest = m.group(3)
    directive, reason = None, ""
    d = DIRECTIVE_RE.match(rest)
    if d:
        rest, directive, reason = d.group(1), d.group(2).upper(), d.group(3).strip()
    elif "#" in rest:  # a plain ``# text`` after the name is diagnostic data (KTAP)
        rest, _, reason = rest.partition(" #")
        reason = reason.strip()
    return TapPoint(number=int(m.group(2)) if m.group(2) else None, name=rest.strip(), ok=m.group(1) == "ok",
                    directive=directive, reason=reason)


def parse(text: str) -> TapStream:
    """Parse a KTAP/TAP document; never raises (malformed input ends up in ``problems``)."""
    top = TapStream(indent=0)
    stack = [top]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    i = 0
    while i < len(lines):
        raw = lines[i].rstrip()
        i += 1
        if not raw.strip():
            continue
        ind, body = _indent(raw), raw.strip()
        structural = VERSION_RE.match(body) or PLAN_RE.match(body) or RESULT_RE.match(body)
        if structural and ind > stack[-1].indent:
            # a deeper structural line opens a subtest (its version line, or its first plan/result)
            stack.append(TapStream(indent=ind))
        if structural and ind < stack[-1].indent:
            # a shallower line: close every deeper level; only a result line may close one
            closed = None
            while len(stack) > 1 and ind < stack[-1].indent:
                inner = stack.pop()
                inner.check_plan()
                if closed is not None:  # a level nested in ``inner`` that nobody closed
                    inner.problems.append("a nested subtest had no result line of its own")
                closed = inner
            if not RESULT_RE.match(body):
                stack[-1].problems.append(f"subtest output ended without its result line (next: {body!r})")
                stack[-1].points.append(TapPoint(None, "(unclosed subtest)", False, "ERROR",
                                                 "subtest ended without a result line", subtests=closed))
                closed = None
            pending_sub = closed
        else:
            pending_sub = None
        cur = stack[-1]
        if m := VERSION_RE.match(body):
            if cur.version is not None or cur.points:
                cur.pending.append(body)  # a repeated version line is just text
            else:
                cur.version = f"{m.group(1)} {m.group(2)}"
        elif m := PLAN_RE.match(body):
            if cur.plan is not None:
                cur.problems.append(f"second plan line {body!r}")
            cur.plan = int(m.group(1))
            note = (m.group(2) or "").strip()
            if cur.plan == 0 and note:
                cur.skip_all = re.sub(r"^SKIP\b\s*", "", note, flags=re.IGNORECASE).strip(" -") or note
        elif (point := _result(body)) is not None:
            point.diagnostics, cur.pending = cur.pending, []
            point.subtests = pending_sub
            if point.number is not None and point.number != len(cur.points) + 1:
                cur.problems.append(f"test point {point.number} out of sequence (expected {len(cur.points) + 1})")
            # a TAP 13 YAML block right after a result belongs to it
            if i < len(lines) and lines[i].strip() == "---":
                block = []
                i += 1
                while i < len(lines) and lines[i].strip() != "...":
                    block.append(lines[i].rstrip())
                    i += 1
                i += 1
                point.diagnostics.extend(block)
            cur.points.append(point)
        elif m := BAIL_RE.match(body):
            for level in stack:
                level.bail_out = m.group(1).strip() or "(no reason given)"
            break
        else:
            cur.pending.append(body)
    # end of input: every level still open is truncated
    while len(stack) > 1:
        inner = stack.pop()
        inner.check_plan()
        stack[-1].problems.append("stream ended inside a subtest (no result line closed it)")
        stack[-1].points.append(TapPoint(None, "(unclosed subtest)", False, "ERROR",
                                         "stream ended inside a subtest", subtests=inner))
    if top.bail_out is None:
        top.check_plan()
    return top


# --------------------------------------------------------------------------------------------------
# Flat results


@dataclass
class TapResult:
    """One test point as a result row: ``name`` is the path through the nesting, joined by ``/``."""

    name: str
    outcome: str
    message: str = ""
    diagnostics: list[str] = field(default_factory=list)


def _message(point: TapPoint) -> str:
    head = (f"{point.directive}: {point.reason}" if point.reason else point.directive) if point.directive \
        else point.reason
    if point.ok and point.directive != "TODO":
        return head
    tail = "\n".join(point.diagnostics[-40:])
    return "\n".join(x for x in (head, tail) if x)


def _name(point: TapPoint) -> str:
    return point.name or (f"#{point.number}" if point.number is not None else "(unnamed)")


def flatten(stream: TapStream, prefix: str = "") -> list[TapResult]:
    """Leaves of the tree as results; a parent with subtests is represented by its leaves, plus an
    ``error`` row for each level that did not complete (truncated, bailed out, badly planned)."""
    out: list[TapResult] = []
    for point in stream.points:
        name = f"{prefix}{_name(point)}"
        sub = point.subtests
        if sub is not None and (sub.points or not sub.complete):
            leaves = flatten(sub, name + "/")
            out.extend(leaves)
            if not point.ok and point.directive is None and all(r.outcome != "failed" for r in leaves):
                # the parent failed though no subtest did: that verdict is a result of its own
                out.append(TapResult(name, "failed", _message(point) or "failed (no subtest failed)",
                                     point.diagnostics))
        else:
            out.append(TapResult(name, point.outcome, _message(point), point.diagnostics))
    where = prefix.rstrip("/") or "stream"
    if stream.bail_out is not None:
        out.append(TapResult(f"{prefix}(bail out)", "error", f"Bail out! {stream.bail_out}",
                             stream.pending[-40:]))
    elif stream.problems:
        out.append(TapResult(f"{prefix}(incomplete)", "error",
                             f"{where}: " + "; ".join(stream.problems), stream.pending[-40:]))
    return out


# --------------------------------------------------------------------------------------------------
# A kselftest program: its TAP plus its exit status

# tools/testing/selftests/kselftest.h: KSFT_PASS 0, KSFT_FAIL 1, KSFT_XFAIL 2, KSFT_XPASS 3,
# KSFT_SKIP 4; KVM's TEST_ASSERT exits 254 after printing "==== Test Assertion Failure ====" to
# stderr (selftests/kvm/lib/assert.c), a failed TEST_REQUIRE exits KSFT_SKIP via ksft_exit_skip.
KSFT_EXIT = {0: "passed", 1: "failed", 2: "xfailed", 3: "xpassed", 4: "skipped"}


def program_results(program: str, stdout: str, returncode: int | None, stderr: str = "",
                    timed_out: bool = False) -> list[TapResult]:
    """Results of one kselftest binary run directly (not under run_kselftest.sh).

    Points it printed become results named ``<program>/<point>``. A program that printed no points
    (KVM's older PMU tests assert and exit without per-test lines) is one result named after it,
    judged by its exit status. A crash, signal or timeout is an ``error``, whatever was printed.
    """
    stream = parse(stdout)
    err_tail = "\n".join(stderr.strip().splitlines()[-40:])
    if stream.skip_all is not None and not stream.points and returncode in (0, 4):
        return [TapResult(program, "skipped", stream.skip_all)]  # the kernel's own reason
    if timed_out or returncode is None:
        return [*[r for r in flatten(stream, program + "/") if not r.name.endswith("(incomplete)")],
                TapResult(program, "error", "timed out" + (f"\n{err_tail}" if err_tail else ""))]
    if returncode < 0 or returncode > 128 and returncode != 254:
        sig = -returncode if returncode < 0 else returncode - 128
        return [*[r for r in flatten(stream, program + "/") if not r.name.endswith("(incomplete)")],
                TapResult(program, "error", f"killed by signal {sig}" + (f"\n{err_tail}" if err_tail else ""))]
    if not stream.points:
        outcome = KSFT_EXIT.get(returncode, "failed")
        text = err_tail or "\n".join(stream.pending[-40:])
        msg = "" if outcome == "passed" else f"exit status {returncode}" + (f"\n{text}" if text else "")
        return [TapResult(program, outcome, msg)]
    results = flatten(stream, program + "/")
    if returncode not in (0, 4) and not any(r.outcome in ("failed", "error") for r in results):
        # every point passed but the program failed afterwards (an assert after the last point)
        results.append(TapResult(program, "failed", f"exit status {returncode} after its test points"
                                 + (f"\n{err_tail}" if err_tail else "")))
    return results
