"""Grade multi-turn episodes with BFCL's own sub-checkers, on backend objects slmshift's executor built.

BFCL's ``multi_turn_checker`` re-executes decoded model calls with ``eval``; it is never run on model output
here. Instead, after each turn the episode's own backend objects (which ran the model's calls through
``executor``) are compared with ground-truth objects (fresh, loaded from the same initial config, running the
turn's ground-truth calls) by BFCL's ``state_checker``, and all execution results so far by its
``response_checker``, in exactly the order and with the same skip rules as ``multi_turn_checker``.

Per call: ``grade_step`` labels one Operator step against the calls the ground truth still needs this turn, and
``grade_turn_intent`` a Planner answer against the turn's ground-truth functions. These are per-call labels
for routing and training; the episode's verdict is BFCL's.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from dataclasses import dataclass
from typing import Any

from slmshift.scenarios.bfcl.api import bfcl_api
from slmshift.scenarios.bfcl.grader import Grade, intent_verdict, parse_intent
from slmshift.scenarios.bfcl.multiturn.data import MultiTurnTask
from slmshift.scenarios.bfcl.multiturn.executor import Backends, ParsedCall, ParsedStep, parse_step

__all__ = ["TurnCheck", "EpisodeGrader", "ground_truth_calls", "turn_functions", "remaining_calls", "grade_step",
           "grade_turn_intent", "canonical"]


@dataclass(frozen=True)
class TurnCheck:
    """BFCL's verdict after one turn."""

    turn: int
    valid: bool
    error_type: str = ""
    message: str = ""


@functools.lru_cache(maxsize=None)
def _checkers() -> Any:
    bfcl_api()  # the import shim first
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker as mtc

    return mtc


def ground_truth_calls(task: MultiTurnTask, turn: int) -> list[ParsedCall]:
    """The turn's ground-truth calls (BFCL's own strings, which may pass arguments by position)."""
    out = []
    for text in task.ground_truth[turn]:
        step = parse_step(text, allow_positional=True)
        if len(step.calls) != 1 or step.calls[0].error:
            raise RuntimeError(f"BFCL ground truth {task.id} turn {turn} does not parse: {text!r}")
        out.append(step.calls[0])
    return out


def turn_functions(task: MultiTurnTask, turn: int) -> list[str]:
    """Function names the turn's ground truth calls, in first-use order."""
    return list(dict.fromkeys(c.name for c in ground_truth_calls(task, turn)))


class EpisodeGrader:
    """BFCL's per-turn checks for one episode attempt; ground-truth backends are fresh for each grader."""

    def __init__(self, task: MultiTurnTask):
        self.task = task
        self.truth = Backends(task.initial_config, task.involved_classes, task.long_context)
        self.model_results: list[str] = []  # every model call's result, all turns (BFCL's response check uses all)
        self.checks: list[TurnCheck] = []

    @property
    def failure(self) -> TurnCheck | None:
        return next((c for c in self.checks if not c.valid), None)

    def end_turn(self, turn: int, model: Backends, step_results: list[list[str]]) -> TurnCheck:
        """Grade a finished turn. ``step_results``: the results of each model step that made calls."""
        truth_results = [self.truth.execute(c) for c in ground_truth_calls(self.task, turn)]
        self.model_results.extend(r for step in step_results for r in step)
        check = self._check(turn, model, step_results, truth_results)
        self.checks.append(check)
        return check

    def _check(self, turn: int, model: Backends, step_results: list[list[str]], truth_results: list[str]) -> TurnCheck:
        if not self.task.ground_truth[turn]:
            return TurnCheck(turn, True, message="no call expected; not checked (as BFCL)")
        if not step_results:
            return TurnCheck(turn, False, "multi_turn:empty_turn_model_response",
                             f"Model response list is empty for turn {turn}")
        mtc = _checkers()
        state = mtc.state_checker(model.instances, self.truth.instances)
        if not state["valid"]:
            diff = state.get("details", {}).get("differences", {})
            return TurnCheck(turn, False, state["error_type"],
                             f"{state['error_message']} Differences: {_short(diff)}")
        response = mtc.response_checker(self.model_results, truth_results, turn)
        if not response["valid"]:
            missing = response.get("details", {}).get("missing_items", [])
            return TurnCheck(turn, False, response["error_type"],
                             f"{response['error_message']} Missing: {_short(missing)}")
        return TurnCheck(turn, True)

    def force_terminated(self, turn: int, steps: int) -> TurnCheck:
        """BFCL's step limit: the whole entry fails (its result has fewer turns than the ground truth)."""
        check = TurnCheck(turn, False, "multi_turn:force_terminated",
                          f"Model was force-terminated after {steps} steps in turn {turn}")
        self.checks.append(check)
        return check


def _short(value: Any, limit: int = 300) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = str(value)
    return text[:limit]


# ---------------------------------------------------------------- per-call labels


@functools.lru_cache(maxsize=None)
def _signatures(classes: tuple[str, ...]) -> dict[str, inspect.Signature]:
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING

    sigs: dict[str, inspect.Signature] = {}
    for class_name in classes:
        cls = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)
        for name, fn in inspect.getmembers(cls, predicate=inspect.isfunction):
            if not name.startswith("_"):
                sigs[name] = inspect.signature(fn)
    return sigs


def canonical(task: MultiTurnTask, call: ParsedCall) -> tuple[str, dict] | None:
    """The call with every argument bound by name and defaults filled in (None when it does not bind)."""
    sig = _signatures(tuple(task.involved_classes)).get(call.name)
    if sig is None or call.error:
        return None
    try:
        bound = sig.bind(None, *call.args, **call.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop(next(iter(sig.parameters)), None)  # self
    return call.name, args


def remaining_calls(task: MultiTurnTask, turn: int, executed: list[str]) -> list[ParsedCall]:
    """The turn's ground-truth calls not yet made (by canonical form, as a multiset) given the calls already
    executed this turn (``executed``: rendered calls, e.g. from ``ParsedCall.render``)."""
    left = list(ground_truth_calls(task, turn))
    for text in executed:
        step = parse_step(text, allow_positional=True)
        for done in step.calls:
            key = canonical(task, done)
            hit = next((i for i, c in enumerate(left) if key is not None and canonical(task, c) == key), None)
            if hit is not None:
                left.pop(hit)
    return left


def grade_step(task: MultiTurnTask, turn: int, executed: list[str], text: str) -> Grade:
    """Label one Operator step. Valid: no malformed or refused call. Correct: every call is one the ground truth
    still needs this turn (any order), or, when nothing is left, the step makes no call. Never raises."""
    try:
        step = parse_step(text)
        if step.malformed:
            return Grade(False, False, f"malformed call: {step.malformed}")
        refused = [c for c in step.calls if c.error]
        if refused:
            return Grade(False, False, f"refused {refused[0].source[:80]}: {refused[0].error}")
        left = remaining_calls(task, turn, executed)
        if not step.has_calls:
            return (Grade(True, True, "") if not left else
                    Grade(True, False, f"stopped with {len(left)} needed call(s) left, e.g. {left[0].render()[:80]}"))
        return _match(task, step, left)
    except Exception as exc:  # a label must never crash an episode or an offline evaluation
        return Grade(False, False, f"grading error: {type(exc).__name__}: {str(exc)[:120]}")


def _match(task: MultiTurnTask, step: ParsedStep, left: list[ParsedCall]) -> Grade:
    keys = [canonical(task, c) for c in left]
    for call in step.calls:
        key = canonical(task, call)
        hit = next((i for i, k in enumerate(keys) if key is not None and k == key), None)
        if hit is None:
            why = "after the turn's work was done" if not left else "that the ground truth does not need next"
            return Grade(True, False, f"call {call.render()[:100]} {why}")
        keys.pop(hit)
    return Grade(True, True, "")


def grade_turn_intent(task: MultiTurnTask, turn: int, text: str) -> Grade:
    """A Planner answer: valid JSON naming only functions offered by this turn; correct: it covers the turn's
    ground-truth calls, and names none for a turn that cannot be done yet (`intent_verdict`)."""
    try:
        names = parse_intent(text)
    except ValueError as exc:
        return Grade(False, False, str(exc))
    expected = turn_functions(task, turn)
    # the ground truth may use a function before its docs are given (multi_turn_miss_func_49): allow its names
    unknown = sorted(set(names) - {f["name"] for f in task.functions_at(turn)} - set(expected))
    if unknown:
        return Grade(False, False, f"unknown functions: {unknown[:5]}")
    return intent_verdict(names, expected)
