"""BFCL v4 tasks, read straight from the data shipped inside the installed ``bfcl_eval``.

Reading the JSON-lines files directly (instead of ``bfcl_eval.utils.load_file``) keeps loading
side-effect free: BFCL's loader takes file locks and may rewrite files in site-packages.
The simulated teacher's answers for these tasks live in ``teacher``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from slmshift.scenarios.bfcl.api import read_data_jsonl, round_robin_sample

__all__ = [
    "CATEGORIES",
    "MULTI_TURN_CATEGORIES",
    "BFCLTask",
    "task_by_id",
    "load_tasks",
    "expected_function_names",
    "function_names",
]

# Every single-turn Python category of BFCL v4 (short name -> BFCL's own name). The ``*irrelevance`` ones are
# right when nothing is called, ``live_relevance`` when anything is; they ship no possible answers.
CATEGORIES: dict[str, str] = {
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
    "live_simple": "live_simple",
    "live_multiple": "live_multiple",
    "live_parallel": "live_parallel",
    "live_parallel_multiple": "live_parallel_multiple",
    "irrelevance": "irrelevance",
    "live_irrelevance": "live_irrelevance",
    "live_relevance": "live_relevance",
}
# Served by the `operator_multiturn` scenario (named here so single-turn errors can point there).
MULTI_TURN_CATEGORIES = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
_NO_ANSWER_FILE = {"irrelevance", "live_irrelevance", "live_relevance"}
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

    @property
    def checker(self) -> str:
        """Which BFCL check grades it: ``ast`` (the calls match a possible answer), ``irrelevance`` (no call is
        made) or ``relevance`` (some call is made), as BFCL's eval runner dispatches on the category name."""
        stem = self.bfcl_category
        return "irrelevance" if "irrelevance" in stem else "relevance" if "relevance" in stem else "ast"


@functools.lru_cache(maxsize=None)
def _category_tasks(category: str) -> tuple[BFCLTask, ...]:
    """All tasks of one short-named category, in file order (parsed once per process)."""
    stem = CATEGORIES[category]
    fname = f"{_VERSION_PREFIX}_{stem}.json"
    answers = {} if stem in _NO_ANSWER_FILE else {
        row["id"]: row["ground_truth"] for row in read_data_jsonl("possible_answer", fname)}
    tasks = []
    for row in read_data_jsonl(fname):
        if stem in _NO_ANSWER_FILE:
            tasks.append(BFCLTask(row["id"], category, row["question"][0], row["function"], []))
            continue
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
        raise ValueError(f"{what}; valid names: {', '.join(CATEGORIES)}"
                         " (multi-turn ones run in the operator_multiturn scenario: "
                         f"{', '.join(MULTI_TURN_CATEGORIES)})")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    return round_robin_sample(categories, _category_tasks, "slmshift-bfcl", seed, n)


@functools.lru_cache(maxsize=None)
def _index() -> dict[str, tuple[str, int]]:
    return {t.id: (c, i) for c in CATEGORIES for i, t in enumerate(_category_tasks(c))}


def task_by_id(task_id: str) -> BFCLTask | None:
    """Any single-turn task by its BFCL id, whatever categories a run chose (None when unknown)."""
    hit = _index().get(task_id) if isinstance(task_id, str) else None
    return _category_tasks(hit[0])[hit[1]] if hit else None


def function_names(task: BFCLTask) -> list[str]:
    """Names of the functions the task offers, in its own order."""
    return [f["name"] for f in task.functions]


def expected_function_names(task: BFCLTask) -> list[str]:
    """Function names in the ground truth, in order of first appearance, unique."""
    return list(dict.fromkeys(name for call in task.answer for name in call))
