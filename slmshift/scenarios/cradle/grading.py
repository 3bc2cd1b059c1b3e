"""Per-call grading for the cradle scenario, in an episode and offline (`CradleScenario.grade_call`).

`context` is what a call needs beyond its output; the scenario passes it with every call:

    action_planning, info_gathering, task_inference:
        {"obs": the observation the call saw (utterance, fields, elements as `browser.flatten` writes them),
         "taken": the actions taken so far this episode, as grammar strings, e.g. ["click(4)"]}
    self_reflection:
        {"expected": whether the last action was the solver's (true/false), or null when unknown}

Verdicts (valid, correct, reason):

    action_planning  valid = one action in the strict grammar (and, with the page, naming an element on it);
                     correct = it equals the DOM solver's next action, where the solver knows the task
    info_gathering   valid = names an element [ref] (on the page, with it); correct = the solver's target
    task_inference   valid = a non-empty line; correct = names the solver's target ref (or key)
    self_reflection  valid = yes/no; correct = matches `expected`

`correct` is None where it cannot be told (no page in `context`, or a task the solver does not know). Never
raises: an invalid output is `valid=False, correct=False`; an unusable `context` counts as no context.
"""

from __future__ import annotations

from typing import Any

from slmshift.scenarios.cradle import prompts
from slmshift.scenarios.cradle.actions import Action, ParseError, parse_action
from slmshift.scenarios.cradle.observe import clickable_refs
from slmshift.scenarios.cradle.prompts import Verdict
from slmshift.scenarios.cradle.teacher import SOLVERS, Plan, solve

__all__ = ["grade_output", "page_context", "target_of", "CALL_KINDS"]

CALL_KINDS = ("info_gathering", "self_reflection", "task_inference", "action_planning")


def page_context(obs: dict, taken: list[Action]) -> dict:
    """The `context` of a page-level call."""
    return {"obs": obs, "taken": [str(a) for a in taken]}


def target_of(obs: dict, plan: Plan | None) -> int | None:
    """The element the solver's next step acts on (a key press acts on the focused element)."""
    if plan is None:
        return None
    if plan.action.ref is not None:
        return plan.action.ref
    return next((el["ref"] for el in obs["elements"] if el["focused"] and el["ref"] > 0), None)


def _page(context: Any) -> tuple[dict | None, list[Action]]:
    """(observation, actions taken) from a context, or (None, []) when it holds no usable page."""
    if not isinstance(context, dict) or not isinstance(context.get("obs"), dict):
        return None, []
    obs = context["obs"]
    try:
        clickable_refs(obs)  # the shape every checker relies on
    except (KeyError, TypeError):
        return None, []
    taken: list[Action] = []
    for text in context.get("taken") or []:
        try:
            taken.append(parse_action(str(text)))
        except ParseError:
            return None, []  # a history we cannot read would mislead the solver
    return obs, taken


def _plan(task: str, obs: dict | None, taken: list[Action]) -> Plan | None:
    if obs is None or task not in SOLVERS:
        return None
    try:
        return solve(task, obs, taken)
    except Exception:  # Unsolvable, or a page the solver does not expect
        return None


def grade_output(task_id: str, call_kind: str, output: str, context: Any = None) -> Verdict | None:
    """Grade one cradle call; None for a call kind the scenario does not make."""
    if call_kind not in CALL_KINDS:
        return None
    if not isinstance(output, str):
        return Verdict(False, False, f"output is {type(output).__name__}, not text")
    task = task_id.split("#", 1)[0] if isinstance(task_id, str) else ""
    if call_kind == "self_reflection":
        expected = context.get("expected") if isinstance(context, dict) else None
        v = prompts.check_reflection(output, expected if isinstance(expected, bool) else None)
        return v if v.valid else Verdict(False, False, v.reason)
    obs, taken = _page(context)
    refs = clickable_refs(obs) if obs is not None else None
    plan = _plan(task, obs, taken)
    if call_kind == "action_planning":
        try:
            action = parse_action(output, refs)
        except ParseError as e:
            return Verdict(False, False, str(e))
        if plan is None:
            return Verdict(True, None, "")
        right = action == plan.action
        return Verdict(True, right, "" if right else f"the solver's next action is {plan.action}")
    target = target_of(obs, plan) if obs is not None else None
    if call_kind == "info_gathering":
        if refs is None:
            named = prompts._REF.findall(output)
            return Verdict(bool(named), None if named else False, "" if named else "names no element")
        v = prompts.check_info(output, refs, target)
        return v if v.valid else Verdict(False, False, v.reason)
    # task_inference
    key = plan.action.args[0] if plan is not None and plan.action.kind == "press" else None
    v = prompts.check_inference(output, plan.action.ref if plan is not None else None, key)
    return v if v.valid else Verdict(False, False, v.reason)
