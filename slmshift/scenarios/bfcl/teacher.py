"""The simulated teacher's answers for single-turn BFCL tasks: a known-correct call (and intent) per task, and
plausible wrong ones, each verified wrong by BFCL's own checker. Only a `simulated` engine reads them (as the
call's `Hidden` reference); they never enter a prompt. Tests use them to sanity-check the graders.
"""

from __future__ import annotations

import random
import re
from typing import Any

from slmshift.platform.types import canonical_json
from slmshift.scenarios.bfcl.data import BFCLTask, expected_function_names, function_names
from slmshift.scenarios.bfcl.grader import grade_calls

__all__ = ["NO_CALL_ANSWER", "format_calls", "reference_call", "distractor_calls", "intent_reference",
           "intent_distractors"]

# The right answer to an irrelevance task: prose BFCL's decoder cannot read as a call.
NO_CALL_ANSWER = "None of the available functions fits this request, so I will not call any."
_WORD = re.compile(r"[a-z0-9]+")


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
            # in the function's declared order: the canonical form the call grammar enforces (constraints.py)
            order = list(props) + [p for p in params if p not in props]
            args = {
                p: _ref_value(props.get(p, {}), params[p])
                for p in order
                if p in params and ("" not in params[p] or p in required)
            }
            calls.append((name, args))
    return calls


def format_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    """Render calls in BFCL's python prompting syntax: ``[f(a=1, b='x'), g()]``."""
    rendered = (f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})" for name, args in calls)
    return "[" + ", ".join(rendered) + "]"


def reference_call(task: BFCLTask) -> str:
    """One correct answer: first acceptable value per parameter, optional ones omitted; for an irrelevance
    task a refusal in prose, for a relevance task (no possible answer shipped) a call to the function that
    best matches the request."""
    if task.checker == "irrelevance":
        return NO_CALL_ANSWER
    if task.checker == "relevance":
        fn = _best_function(task)
        return format_calls([(fn["name"], _placeholder_args(fn, _request(task)))])
    return format_calls(_reference_calls(task))


def _request(task: BFCLTask) -> str:
    return " ".join(m["content"] for m in task.question if m.get("role") == "user")


def _best_function(task: BFCLTask) -> dict:
    """The function whose name and description share most words with the request (first on ties)."""
    words = set(_WORD.findall(_request(task).lower()))

    def overlap(f: dict) -> int:
        text = f"{f['name'].replace('_', ' ').replace('.', ' ')} {f.get('description', '')}".lower()
        return len(words & set(_WORD.findall(text)))

    return max(task.functions, key=overlap)


def _placeholder_args(fn: dict, request: str) -> dict[str, Any]:
    """Required parameters filled with a type-correct value (an enum's first, a default, or a plain one)."""
    props = fn.get("parameters", {}).get("properties", {})
    out: dict[str, Any] = {}
    for name in fn.get("parameters", {}).get("required", []):
        spec = props.get(name, {})
        kind = spec.get("type", "string")
        if spec.get("enum"):
            out[name] = spec["enum"][0]
        elif "default" in spec and spec["default"] is not None:
            out[name] = spec["default"]
        else:
            out[name] = {"integer": 1, "float": 1.0, "number": 1.0, "boolean": True, "array": [], "list": [],
                         "dict": {}, "object": {}, "tuple": []}.get(kind, " ".join(request.split()[:12]))
    return out


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
    rng = random.Random(f"slmshift-bfcl-distractor:{seed}:{task.id}")
    if task.checker == "irrelevance":  # calling anything is wrong
        fns = rng.sample(task.functions, min(3, len(task.functions)))
        candidates = [("call", format_calls([(f["name"], _placeholder_args(f, _request(task)))])) for f in fns]
    elif task.checker == "relevance":  # calling nothing is wrong
        candidates = [("no_call", NO_CALL_ANSWER), ("empty", "[]")]
    else:
        candidates = _distractor_candidates(task, rng)
    rng.shuffle(candidates)
    reference = reference_call(task)
    out: list[str] = []
    for _, text in candidates:
        if text != reference and text not in out and not grade_calls(task, text).correct:
            out.append(text)
    return out[:3]


# ---------------------------------------------------------------- intent


def intent_reference(task: BFCLTask) -> str:
    """The correct intent JSON (no function for an irrelevance task)."""
    if task.checker == "relevance":
        return canonical_json({"functions": [_best_function(task)["name"]]})
    return canonical_json({"functions": expected_function_names(task)})


def intent_distractors(task: BFCLTask, seed: int = 0) -> list[str]:
    """Wrong selections of valid shape: one needed function dropped or swapped for an unneeded one, or nothing
    selected. (An unneeded one added is not wrong: see `intent_verdict`.)"""
    rng = random.Random(f"slmshift-bfcl-intent:{seed}:{task.id}")
    if task.checker == "irrelevance":
        return [canonical_json({"functions": [n]}) for n in rng.sample(function_names(task), min(3, len(task.functions)))]
    if task.checker == "relevance":
        return [canonical_json({"functions": []})]
    expected = expected_function_names(task)
    others = [n for n in function_names(task) if n not in expected]
    out: list[list[str]] = []
    if len(expected) > 1:
        drop = rng.randrange(len(expected))
        out.append(expected[:drop] + expected[drop + 1 :])
    if others:
        extra = rng.choice(others)
        i = rng.randrange(len(expected))
        out.append(expected[:i] + [extra] + expected[i + 1 :])
    rng.shuffle(out)
    out.append([])  # "nothing to call" is always wrong here, so keep it as the last resort
    return [canonical_json({"functions": names}) for names in out][:3]
