"""Multi-turn BFCL v4 tasks, read straight from the data shipped inside the installed ``bfcl_eval``.

Function docs come from BFCL's ``multi_turn_func_doc`` files for the task's ``involved_classes``, the
``missed_function`` docs held out until their turn and BFCL's Python hint added to the others, as BFCL's own
loader does (``populate_test_cases_with_predefined_functions``, then ``add_language_specific_hint_to_function_doc``).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

from slmshift.scenarios.bfcl.api import bfcl_api, read_data_jsonl, round_robin_sample

__all__ = ["MT_CATEGORIES", "MultiTurnTask", "load_multi_turn_tasks", "mt_task_by_id", "MAX_STEPS"]

MT_CATEGORIES = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
MAX_STEPS = 20  # BFCL's MAXIMUM_STEP_LIMIT (bfcl_eval.constants.default_prompts)
_VERSION_PREFIX = "BFCL_v4"


@dataclass(frozen=True)
class MultiTurnTask:
    """One multi-turn BFCL task. Treat the (shared, cached) lists and dicts as read-only."""

    id: str
    category: str
    turns: list[list[dict]]  # user messages per turn; a held-out-function turn has none (BFCL adds its own)
    initial_config: dict  # class name -> the backend's initial state
    involved_classes: list[str]
    functions: list[dict]  # docs offered from the first turn
    missed_function: dict[int, list[dict]]  # turn index -> docs added at that turn
    ground_truth: list[list[str]]  # per turn, the calls BFCL's checker executes as the reference

    @property
    def long_context(self) -> bool:
        """BFCL loads the backends' long-context state for these (``"long_context" in test_category``)."""
        return "long_context" in self.category

    def functions_at(self, turn: int) -> list[dict]:
        """Docs available in a turn: the initial ones plus every held-out one whose turn has come."""
        extra = [f for t, docs in sorted(self.missed_function.items()) if t <= turn for f in docs]
        return self.functions + extra


@functools.lru_cache(maxsize=None)
def _class_docs(class_name: str) -> tuple[dict, ...]:
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    return tuple(read_data_jsonl("multi_turn_func_doc", MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]))


@functools.lru_cache(maxsize=None)
def _category_tasks(category: str) -> tuple[MultiTurnTask, ...]:
    fname = f"{_VERSION_PREFIX}_{category}.json"
    answers = {row["id"]: row["ground_truth"] for row in read_data_jsonl("possible_answer", fname)}
    hint = bfcl_api().language_hint
    tasks = []
    for row in read_data_jsonl(fname):
        if row["id"] not in answers:
            raise RuntimeError(f"BFCL task {row['id']} has no possible answer")
        docs = [copy.deepcopy(d) for c in row["involved_classes"] for d in _class_docs(c)]
        missed: dict[int, list[dict]] = {}
        for turn, names in row.get("missed_function", {}).items():
            for name in names:  # BFCL pops the first doc of that name from the list
                i = next(i for i, d in enumerate(docs) if d["name"] == name)
                missed.setdefault(int(turn), []).append(docs.pop(i))
        docs = hint(docs, category)  # BFCL hints the offered docs only, after taking the held-out ones away
        tasks.append(MultiTurnTask(row["id"], category, row["question"], row["initial_config"],
                                   row["involved_classes"], docs, missed, answers[row["id"]]))
    return tuple(tasks)


def load_multi_turn_tasks(categories: list[str], n: int | None = None, seed: int = 0) -> list[MultiTurnTask]:
    """Deterministic sample, spread round-robin over the categories (as the single-turn ``load_tasks``)."""
    if isinstance(categories, str):
        categories = [categories]
    unknown = [c for c in categories if c not in MT_CATEGORIES]
    if unknown or not categories:
        what = f"unknown BFCL multi-turn categories {unknown}" if unknown else "no BFCL multi-turn categories given"
        raise ValueError(f"{what}; valid names: {', '.join(MT_CATEGORIES)}")
    return round_robin_sample(categories, _category_tasks, "slmshift-bfcl-mt", seed, n)


@functools.lru_cache(maxsize=None)
def _index() -> dict[str, MultiTurnTask]:
    return {t.id: t for c in MT_CATEGORIES for t in _category_tasks(c)}


def mt_task_by_id(task_id: str) -> MultiTurnTask | None:
    """Any multi-turn task by its BFCL id (None when unknown)."""
    return _index().get(task_id) if isinstance(task_id, str) else None
