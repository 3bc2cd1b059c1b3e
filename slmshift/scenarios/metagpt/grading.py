"""Per-call grading for the metagpt scenario, offline (`MetaGPTScenario.grade_call`) and in an episode.

What each call kind is graded on (a `Check`: valid, correct, reason):

    prd, tasks   valid = the JSON matches its pydantic schema; correct = valid (the schema is the whole check)
    design       valid = schema; correct = the signature names the function to write
    summary      valid = schema; correct = status/send_to agree with the test run, when `context` carries
                 {"tests_passed": bool} (the episode passes it); None without it
    code, debug  valid = the reply holds Python that parses and defines the function; correct = HumanEval's own
                 tests pass on it in the sandbox (`grade_code`: a positive end signal, never exit status)
    tests        valid = asserts that parse and call the function; correct = they pass on HumanEval's
                 reference solution in the sandbox (tests that fail the reference are wrong tests)

Everything here is synchronous and never raises on model output; sandbox runs take up to the limits' wall time
(callers on an event loop use `asyncio.to_thread`).
"""

from __future__ import annotations

import re
from typing import Any

from slmshift.platform.sandbox import SandboxLimits, run_python
from slmshift.scenarios.metagpt.data import Problem, answer_key_paths, grade_code
from slmshift.scenarios.metagpt.schemas import SCHEMAS, Check, RunSummary, check_json, check_tests, extract_code

__all__ = ["check_design", "check_summary", "grade_output", "KINDS"]

KINDS = ("prd", "design", "tasks", "code", "debug", "tests", "summary")


def check_design(text: str, entry_point: str) -> Check:
    c = check_json(text, SCHEMAS["design"])
    if not c.valid:
        return c
    # the name itself, called: `f_impl(` or `my_f(` is another function
    named = re.search(rf"(?<![\w.]){re.escape(entry_point)}\s*\(", c.value.signature) is not None
    return Check(True, named, "" if named else f"the signature does not name `{entry_point}`", c.value)


def check_summary(text: str, passed: bool | None) -> Check:
    """The QA run summary; `passed` is the real test outcome (None: unknown, so correctness is not judged)."""
    c = check_json(text, RunSummary)
    if not c.valid or passed is None:
        return c
    s: RunSummary = c.value
    right = (s.status == "PASS") == passed and (s.send_to == "NoOne") == passed
    return Check(True, right, "" if right else f"summary says {s.status}/{s.send_to} but the tests "
                 f"{'passed' if passed else 'failed'}", s)


def _tests_passed(context: Any) -> bool | None:
    value = context.get("tests_passed") if isinstance(context, dict) else None
    return value if isinstance(value, bool) else None


def grade_output(problem: Problem, call_kind: str, output: str, limits: SandboxLimits | None = None,
                 context: Any = None) -> Check | None:
    """Grade one call's output for `problem`; None for a call kind this scenario does not make."""
    if not isinstance(output, str):
        return Check(False, False, f"output is {type(output).__name__}, not text")
    if call_kind in ("prd", "tasks"):
        c = check_json(output, SCHEMAS[call_kind])
        return Check(c.valid, c.valid, c.reason, c.value)
    if call_kind == "design":
        return check_design(output, problem.entry_point)
    if call_kind == "summary":
        return check_summary(output, _tests_passed(context))
    if call_kind in ("code", "debug"):
        c = extract_code(output, problem.entry_point, problem.prompt)
        if not c.valid:
            return c
        run = grade_code(problem, c.value, limits)
        return Check(True, run.ok, "" if run.ok else f"HumanEval tests: {run.reason}", c.value)
    if call_kind == "tests":
        c = check_tests(output, problem.entry_point)
        if not c.valid:
            return c
        run = run_python(f"{problem.canonical_code}\n\n{c.value}\n", limits, hide=answer_key_paths())
        return Check(True, run.ok, "" if run.ok else f"the tests fail on the reference solution: {run.reason}",
                     c.value)
    return None
