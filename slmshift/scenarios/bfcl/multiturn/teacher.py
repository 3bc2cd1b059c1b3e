"""The simulated teacher's answers for multi-turn episodes, from BFCL's ground-truth call sequence.

Per turn the Planner's reference names the turn's ground-truth functions; per step the Operator's reference is
every ground-truth call of the turn not yet made (keyword arguments, as BFCL's prompt asks), or, once none is
left, a plain-text answer that ends the turn; the summary's reference reports the turn's calls and results.
Distractors are plausible wrong answers, each verified wrong by the per-call label (``grade_step``).
Only a `simulated` engine reads them; they never enter a prompt.
"""

from __future__ import annotations

import random

from slmshift.platform.types import canonical_json
from slmshift.scenarios.bfcl.multiturn.data import MultiTurnTask
from slmshift.scenarios.bfcl.multiturn.executor import ParsedCall, parse_step
from slmshift.scenarios.bfcl.multiturn.grader import (
    canonical, grade_step, grade_turn_intent, ground_truth_calls, remaining_calls, turn_functions,
)
from slmshift.scenarios.bfcl.teacher import _wrong_value

__all__ = ["TURN_DONE", "CANNOT_DO", "keyword_form", "step_reference", "step_distractors", "intent_reference",
           "intent_distractors", "summary_reference", "summary_distractors"]

TURN_DONE = "All requested actions for this turn are complete; no more function calls are needed."
CANNOT_DO = ("I cannot complete this request yet: a function it needs is not available or a required detail is "
             "missing. Please provide it.")


def keyword_form(task: MultiTurnTask, call: ParsedCall) -> str:
    """The call with positional arguments named (BFCL's prompt asks for ``func(param=value)``), in the signature's
    order."""
    key = canonical(task, call)
    if key is None:
        return call.render()
    name, full = key
    named = list(call.kwargs)
    # keep what the ground truth wrote (its positional ones by name, and its keywords; no filled-in defaults), in the
    # signature's order: the canonical form the step constraint enforces (bfcl/constraints.py)
    positional = [p for p in full if p not in named][: len(call.args)]
    return ParsedCall(name=name, kwargs={p: full[p] for p in full if p in positional or p in named}).render()


def _render(task: MultiTurnTask, calls: list[ParsedCall]) -> str:
    return "[" + ", ".join(keyword_form(task, c) for c in calls) + "]"


def step_reference(task: MultiTurnTask, turn: int, executed: list[str]) -> str:
    left = remaining_calls(task, turn, executed)
    if left:
        return _render(task, left)
    return TURN_DONE if task.ground_truth[turn] else CANNOT_DO


def _wrong_call(task: MultiTurnTask, call: ParsedCall) -> ParsedCall | None:
    """The call with one argument changed to a plausible wrong value (None for a call without arguments)."""
    parsed = parse_step(keyword_form(task, call)).calls
    if not parsed or not parsed[0].kwargs:
        return None
    kwargs = dict(parsed[0].kwargs)
    param = next(iter(kwargs))
    kwargs[param] = _wrong_value(kwargs[param], {}, [v for k, v in kwargs.items() if k != param])
    return ParsedCall(name=call.name, kwargs=kwargs)


def step_distractors(task: MultiTurnTask, turn: int, executed: list[str], seed: int = 0) -> list[str]:
    """Up to three wrong steps: a wrong argument value, stopping too early, a call the turn does not need."""
    rng = random.Random(f"slmshift-bfcl-mt-step:{seed}:{task.id}:{turn}:{len(executed)}")
    left = remaining_calls(task, turn, executed)
    candidates: list[str] = []
    if left:
        i = rng.randrange(len(left))
        wrong = _wrong_call(task, left[i])
        if wrong is not None:
            candidates.append(_render(task, left[:i] + [wrong] + left[i + 1:]))
        candidates.append(TURN_DONE)
    else:
        done = ground_truth_calls(task, turn)
        later = [c for t in range(turn + 1, len(task.ground_truth)) for c in ground_truth_calls(task, t)]
        if done:
            candidates.append(_render(task, [done[-1]]))  # repeating the last action
        if later:
            candidates.append(_render(task, [later[0]]))  # acting ahead of the user
    out = []
    for text in candidates:
        if text not in out and not grade_step(task, turn, executed, text).correct:
            out.append(text)
    return out[:3]


def intent_reference(task: MultiTurnTask, turn: int) -> str:
    return canonical_json({"functions": turn_functions(task, turn)})


def intent_distractors(task: MultiTurnTask, turn: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"slmshift-bfcl-mt-intent:{seed}:{task.id}:{turn}")
    expected = turn_functions(task, turn)
    others = [f["name"] for f in task.functions_at(turn) if f["name"] not in expected]
    options: list[list[str]] = []
    if others and expected:  # a needed function swapped for an unneeded one (an added one is not wrong)
        options.append(expected[:-1] + [rng.choice(others)])
    if not expected and others:  # acting on a turn that cannot be done yet
        options.append([rng.choice(others)])
    if len(expected) > 1:
        options.append(expected[1:])
    if expected:
        options.append([])
    out = [canonical_json({"functions": o}) for o in options]
    return [d for d in out if not grade_turn_intent(task, turn, d).correct][:3]


def summary_reference(task: MultiTurnTask, turn: int, calls: list[str], results: list[str]) -> str:
    """What a good turn answer says: the calls made and what they returned (or what is missing)."""
    if not task.ground_truth[turn]:
        return CANNOT_DO
    done = "; ".join(f"{c} -> {r[:120]}" for c, r in zip(calls, results)) or "nothing"
    return f"Done. I called: {done}"


def summary_distractors(task: MultiTurnTask, turn: int) -> list[str]:
    """Answers that misreport the turn (BFCL does not grade the answer, so these only look wrong), and a call
    where text is due."""
    first = next((c for t in range(len(task.ground_truth)) for c in ground_truth_calls(task, t)), None)
    wrong = [CANNOT_DO if task.ground_truth[turn] else "Done. Everything you asked for is complete."]
    return wrong + ([_render(task, [first])] if first is not None else [])
