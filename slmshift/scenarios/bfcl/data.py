"""BFCL v4 tasks, read straight from the data shipped inside the installed ``bfcl_eval``.

Reading the JSON-lines files directly (instead of ``bfcl_eval.utils.load_file``) keeps loading
side-effect free: BFCL's loader takes file locks and may rewrite files in site-packages.
The module also builds known-correct and known-wrong answers, which the simulation uses as
reference outputs and to sanity-check graders and judges.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = [
    "CATEGORIES",
    "BFCLTask",
    "load_tasks",
    "expected_function_names",
    "reference_call",
    "distractor_calls",
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


def expected_function_names(task: BFCLTask) -> list[str]:
    """Function names in the ground truth, in order of first appearance, unique."""
    return list(dict.fromkeys(name for call in task.answer for name in call))


# ---------------------------------------------------------------- reference answers


def _first(values: list[Any]) -> Any:
    """The first acceptable value that is not BFCL's "may be omitted" marker ``""``."""
    return next((v for v in values if v != ""), "")


def _plain_dict(options: dict[str, list[Any]]) -> dict[str, Any]:
    return {k: _first(vs) for k, vs in options.items() if "" not in vs}


def _ref_value(spec: dict, values: list[Any]) -> Any:
    """BFCL lists acceptable values per parameter; dicts (and lists of dicts) nest
    acceptable-value lists one level down, so those are resolved key by key."""
    value = _first(values)
    kind = spec.get("type")
    if kind == "dict" and isinstance(value, dict):
        return _plain_dict(value)
    if kind == "array" and isinstance(value, list) and value and all(isinstance(d, dict) for d in value):
        if spec.get("items", {}).get("type") == "dict":
            return [_plain_dict(d) for d in value]
    return value


def _function_doc(task: BFCLTask, name: str) -> dict:
    return next((f for f in task.functions if f["name"] == name), {"parameters": {}})


def _reference_calls(task: BFCLTask) -> list[tuple[str, dict[str, Any]]]:
    calls = []
    for call in task.answer:
        for name, params in call.items():
            doc = _function_doc(task, name)["parameters"]
            props, required = doc.get("properties", {}), doc.get("required", [])
            args = {
                p: _ref_value(props.get(p, {}), vs)
                for p, vs in params.items()
                if "" not in vs or p in required
            }
            calls.append((name, args))
    return calls


def format_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    """Render calls in BFCL's python prompting syntax: ``[f(a=1, b='x'), g()]``."""
    rendered = (f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})" for name, args in calls)
    return "[" + ", ".join(rendered) + "]"


def reference_call(task: BFCLTask) -> str:
    """One correct answer: first acceptable value per parameter, optional ones omitted."""
    return format_calls(_reference_calls(task))


# ---------------------------------------------------------------- wrong answers


def _wrong_value(value: Any, spec: dict, siblings: list[Any]) -> Any:
    """A same-typed, plausible but different value (swapped argument, off-by-one, ...)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return round(value * 2 + 1, 3)
    if isinstance(value, str):
        options = [e for e in spec.get("enum", []) if isinstance(e, str) and e.lower() != value.lower()]
        options += [s for s in siblings if isinstance(s, str) and s.lower() != value.lower()]
        return options[0] if options else f"not {value}"
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else (value * 2 if value else ["unknown"])
    if isinstance(value, dict) and value:
        key = next(iter(value))
        return {**value, key: _wrong_value(value[key], {}, [])}
    return "unknown"


def _distractor_candidates(task: BFCLTask, rng: random.Random) -> list[tuple[str, str]]:
    calls = _reference_calls(task)
    out: list[tuple[str, str]] = []
    with_args = [i for i, (_, args) in enumerate(calls) if args]
    if with_args:
        i = rng.choice(with_args)
        name, args = calls[i]
        doc = _function_doc(task, name)["parameters"]
        required = [p for p in doc.get("required", []) if p in args] or list(args)
        param = rng.choice(required)
        siblings = [v for k, v in args.items() if k != param]
        wrong = {**args, param: _wrong_value(args[param], doc.get("properties", {}).get(param, {}), siblings)}
        out.append(("wrong_value", format_calls(calls[:i] + [(name, wrong)] + calls[i + 1 :])))
        dropped = {k: v for k, v in args.items() if k != param}
        out.append(("missing_arg", format_calls(calls[:i] + [(name, dropped)] + calls[i + 1 :])))
    expected = set(expected_function_names(task))
    others = [f for f in task.functions if f["name"] not in expected]
    if others:
        other = rng.choice(others)
        i = rng.randrange(len(calls))
        props = other.get("parameters", {}).get("properties", {})
        args = {k: v for k, v in calls[i][1].items() if k in props}
        out.append(("wrong_function", format_calls(calls[:i] + [(other["name"], args)] + calls[i + 1 :])))
    if len(calls) > 1:
        i = rng.randrange(len(calls))
        out.append(("missing_call", format_calls(calls[:i] + calls[i + 1 :])))
    return out


def distractor_calls(task: BFCLTask, seed: int = 0) -> list[str]:
    """Up to three plausible wrong answers, each verified wrong by the BFCL checker
    (empty only when no wrong answer can be built, e.g. a lone zero-argument function)."""
    from slmshift.scenarios.bfcl.grader import grade_calls  # grader imports this module

    rng = random.Random(f"slmshift-bfcl-distractor:{seed}:{task.id}")
    candidates = _distractor_candidates(task, rng)
    rng.shuffle(candidates)
    reference = reference_call(task)
    out: list[str] = []
    for _, text in candidates:
        if text != reference and text not in out and not grade_calls(task, text).correct:
            out.append(text)
    return out[:3]
