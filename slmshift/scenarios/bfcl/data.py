"""BFCL v4 tasks, read straight from the data shipped inside the installed ``bfcl_eval``.

Reading the JSON-lines files directly (instead of ``bfcl_eval.utils.load_file``) keeps loading
side-effect free: BFCL's loader takes file locks and may rewrite files in site-packages.
The simulated teacher's answers for these tasks live in ``teacher``.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from importlib import resources

__all__ = [
    "CATEGORIES",
    "BFCLTask",
    "load_tasks",
    "expected_function_names",
    "function_names",
]

CATEGORIES: dict[str, str] = {
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
}
_VERSION_PREFIX = "BFCL_v4"


@dataclass(frozen=True)
class BFCLTask:
    """One single-turn BFCL task. Treat the (shared, cached) lists and dicts as read-only."""

    id: str
    category: str
    question: list[dict]
    functions: list[dict]
    answer: list[dict]

    @property
    def bfcl_category(self) -> str:
        """BFCL's own test-category name (file stem), which BFCL's checker dispatches on."""
        return CATEGORIES[self.category]


def _read_jsonl(*parts: str) -> list[dict]:
    path = resources.files("bfcl_eval").joinpath("data", *parts)
    with path.open("r", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@functools.lru_cache(maxsize=None)
def _category_tasks(category: str) -> tuple[BFCLTask, ...]:
    """All tasks of one short-named category, in file order (parsed once per process)."""
    stem = CATEGORIES[category]
    fname = f"{_VERSION_PREFIX}_{stem}.json"
    answers = {row["id"]: row["ground_truth"] for row in _read_jsonl("possible_answer", fname)}
    tasks = []
    for row in _read_jsonl(fname):
        if row["id"] not in answers:
            raise RuntimeError(f"BFCL task {row['id']} has no possible answer")
        tasks.append(
            BFCLTask(row["id"], category, row["question"][0], row["function"], answers[row["id"]])
        )
    return tuple(tasks)


def load_tasks(categories: list[str], n: int | None = None, seed: int = 0) -> list[BFCLTask]:
    """Deterministic sample: each category is shuffled with its own seeded RNG, then the
    categories are interleaved round-robin, so any prefix is spread evenly across them
    (``load_tasks(c, n, s) == load_tasks(c, None, s)[:n]``)."""
    if isinstance(categories, str):
        categories = [categories]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        what = f"unknown BFCL categories {unknown}" if unknown else "no BFCL categories given"
        raise ValueError(f"{what}; valid names: {', '.join(CATEGORIES)}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    pools = []
    for cat in dict.fromkeys(categories):  # de-duplicate, keep order
        pool = list(_category_tasks(cat))
        random.Random(f"slmshift-bfcl:{seed}:{cat}").shuffle(pool)
        pools.append(pool)
    out: list[BFCLTask] = []
    for i in range(max(len(p) for p in pools)):
        out.extend(p[i] for p in pools if i < len(p))
    return out if n is None else out[:n]


def function_names(task: BFCLTask) -> list[str]:
    """Names of the functions the task offers, in its own order."""
    return [f["name"] for f in task.functions]


def expected_function_names(task: BFCLTask) -> list[str]:
    """Function names in the ground truth, in order of first appearance, unique."""
    return list(dict.fromkeys(name for call in task.answer for name in call))
