"""Multi-turn workflow automation, modelled on Open Operator, on BFCL v4's executable backends.

Each episode is one multi-turn BFCL task: a user conversation about stateful applications (file system,
messaging, posting, tickets, trading, travel booking, vehicle control, math). Per user turn the Planner names
the functions the turn needs (`intent`, JSON); the Operator then works in steps (`function_call`, BFCL's
Python-call syntax), each step's calls executed by slmshift against the episode's own backend objects and the
results fed back, until a step makes no call (or BFCL's step limit fails the episode); a `summary` call answers
the user. BFCL's `state_checker` and `response_checker` grade each turn on the objects our executor built,
against fresh ground-truth objects. Deviations from BFCL's protocol are listed in docs/operator.md.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, field_validator

from slmshift.platform.scenario import (
    EpisodeSession, Outcome, Scenario, ScenarioOptions, register_scenario, require_known, went_right,
)
from slmshift.platform.types import Hidden, OutputConstraint
from slmshift.scenarios.bfcl.constraints import names_schema, step_constraint
from slmshift.scenarios.bfcl.grader import Grade, parse_intent
from slmshift.scenarios.bfcl.multiturn.data import (
    MAX_STEPS, MT_CATEGORIES, MultiTurnTask, load_multi_turn_tasks, mt_task_by_id,
)
from slmshift.scenarios.bfcl.multiturn.executor import Backends, parse_step
from slmshift.scenarios.bfcl.multiturn.grader import EpisodeGrader, grade_step, grade_turn_intent
from slmshift.scenarios.bfcl.multiturn.prompts import (
    digest_line, operator_messages, planner_messages, results_message, select_docs, summary_messages, turn_messages,
)
from slmshift.scenarios.bfcl.multiturn.teacher import (
    intent_distractors, intent_reference, step_distractors, step_reference, summary_distractors, summary_reference,
)


class OperatorMultiTurnOptions(ScenarioOptions):
    categories: list[str] = Field(default=["multi_turn_base"], min_length=1,
                                  description=f"BFCL multi-turn categories: {', '.join(MT_CATEGORIES)}.")
    operator_functions: Literal["selected", "all"] = Field(
        default="selected",
        description="Function docs in the Operator's system prompt: the Planner's choice for the turn ('selected'; "
                    "all offered docs when the choice is unusable), or every offered doc as in BFCL ('all'; "
                    "about 10k tokens for two API classes).")
    max_steps: int = Field(default=MAX_STEPS, ge=1, le=MAX_STEPS,
                           description="Operator steps with calls allowed per turn before the episode is failed as "
                                       "force-terminated (BFCL: 20; lower values are cheaper but not BFCL's protocol).")
    summary: bool = Field(default=True, description="Make a `summary` call answering the user after each turn.")
    stop_after_failed_turn: bool = Field(
        default=False, description="End the episode at the first turn BFCL's checks fail (cheaper; BFCL itself runs "
                                   "every turn, so calls per episode then differ from BFCL's).")
    intent_max_tokens: int = Field(default=64, ge=1, description="Token budget of the Planner's call.")
    call_max_tokens: int = Field(default=256, ge=1, description="Token budget of one Operator step.")
    summary_max_tokens: int = Field(default=96, ge=1, description="Token budget of the summary call.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature of every call (0 = greedy).")

    @field_validator("categories")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        require_known(v, MT_CATEGORIES, "BFCL multi-turn categories",
                      f"available: {', '.join(MT_CATEGORIES)} (single-turn ones run in the operator scenario)")
        return v


@register_scenario
class OperatorMultiTurnScenario(Scenario):
    kind = "operator_multiturn"
    Options = OperatorMultiTurnOptions
    options: OperatorMultiTurnOptions

    def tasks(self) -> list[MultiTurnTask]:
        picked = load_multi_turn_tasks(self.options.categories, n=self.spec.episodes, seed=self.seed)
        return [picked[i % len(picked)] for i in range(self.spec.episodes)]

    async def run_episode(self, task: MultiTurnTask, session: EpisodeSession) -> Outcome:
        o, seed = self.options, self.seed
        start = time.perf_counter()
        backends = Backends(task.initial_config, task.involved_classes, task.long_context)  # fresh per attempt
        grader = EpisodeGrader(task)
        history: list[dict] = []  # the Operator's conversation, BFCL's prompting format
        digest: list[str] = []  # the Planner's one-line view of earlier turns
        n_actions = n_model_calls = 0
        for turn in range(len(task.turns)):
            opening = turn_messages(task, turn)
            history += opening
            request = "\n".join(m["content"] for m in opening if m.get("role") == "user")
            intent = await session.call(
                role="planner", call_kind="intent", category="template",
                messages=planner_messages(task, turn, digest), constraint=OutputConstraint(
                    format="json", json_schema=names_schema([f["name"] for f in task.functions_at(turn)])),
                max_tokens=o.intent_max_tokens, temperature=o.temperature,
                hidden=Hidden(answer=intent_reference(task, turn), distractors=intent_distractors(task, turn, seed)),
                check=lambda text, t=turn: self._grade_intent(task, t, text), context={"turn": turn})
            n_model_calls += 1
            selected = _selected(intent.text) if intent.valid else None
            # with 'selected', a wrong plan narrows the Operator's docs: it handicaps a simulated teacher too
            plan_ok = o.operator_functions == "all" or went_right(intent)
            digest.append(digest_line("user", request))
            # 'all' is BFCL's prompt: the first turn's docs stay in the system prompt, held-out docs arrive only
            # as their turn's user message
            docs = task.functions if o.operator_functions == "all" else select_docs(task, turn, selected)
            executed: list[str] = []  # rendered calls run this turn
            turn_calls: list[str] = []  # every call of the turn as fed back (refused ones as written), for the summary
            step_results: list[list[str]] = []
            had_error = False
            force_quit = False
            if not (selected == [] and o.operator_functions == "selected"):  # an empty plan: nothing to call
                while True:
                    done = list(executed)
                    call = await session.call(
                        role="operator", call_kind="function_call", constraint=step_constraint(
                            task.functions_at(turn) if o.operator_functions == "all" else docs),
                        category="debugging" if had_error else "template",
                        messages=operator_messages(task, history, docs),
                        max_tokens=o.call_max_tokens, temperature=o.temperature,
                        hidden=Hidden(answer=step_reference(task, turn, done),
                                      distractors=step_distractors(task, turn, done, seed),
                                      upstream_ok=plan_ok),
                        check=lambda text, t=turn, d=done: grade_step(task, t, d, text),
                        context={"turn": turn, "executed": done})
                    n_model_calls += 1
                    history.append({"role": "assistant", "content": call.text})
                    step = parse_step(call.text)
                    if not step.has_calls:  # BFCL: a step without a decodable call ends the turn
                        break
                    results = backends.run_step(step)
                    names = [c.render() if not c.error else c.source for c in step.calls]
                    history.append(results_message(names, results))
                    executed += [c.render() for c in step.calls if not c.error]
                    turn_calls += names
                    step_results.append(results)
                    n_actions += len(results)
                    had_error = any(r.startswith("Error during execution") for r in results)
                    digest += [digest_line("call", f"{n} -> {r}") for n, r in zip(names, results)]
                    if len(step_results) > o.max_steps:  # BFCL: count > MAXIMUM_STEP_LIMIT
                        force_quit = True
                        break
            if force_quit:
                grader.force_terminated(turn, len(step_results))
                break
            if o.summary:
                flat = [r for rs in step_results for r in rs]
                await session.call(
                    role="operator", call_kind="summary", category="reasoning", expect="text",
                    messages=summary_messages(request, turn_calls, flat), max_tokens=o.summary_max_tokens,
                    temperature=o.temperature,
                    hidden=Hidden(answer=summary_reference(task, turn, turn_calls, flat),
                                  distractors=summary_distractors(task, turn)),
                    check=check_summary, context={"turn": turn})
                n_model_calls += 1
            check = grader.end_turn(turn, backends, step_results)
            if not check.valid and o.stop_after_failed_turn:
                break
        failure = grader.failure
        turns_graded = len(grader.checks)
        success = failure is None and turns_graded == len(task.turns)
        wall = time.perf_counter() - start
        detail = ("correct" if success else
                  f"turn {failure.turn}: {failure.error_type}: {failure.message}" if failure else "episode cut short")
        return Outcome(success=success, reward=1.0 if success else 0.0, steps=n_actions,
                       detail=f"{detail[:180]} [{n_model_calls} model calls, {wall:.2f}s]")

    def _grade_intent(self, task: MultiTurnTask, turn: int, text: str) -> Grade:
        """With every doc in the Operator's prompt ('all') the plan never reaches the outcome: its validity is
        checked but it has no correct/incorrect verdict, like a summary (an ungraded call, not SLM share)."""
        grade = grade_turn_intent(task, turn, text)
        if self.options.operator_functions == "all":
            return Grade(grade.valid, None, grade.reason if not grade.valid else "")  # type: ignore[arg-type]
        return grade

    def token_budget(self, call_kind: str) -> int | None:
        o = self.options
        return {"intent": o.intent_max_tokens, "function_call": o.call_max_tokens,
                "summary": o.summary_max_tokens}.get(call_kind)

    def grade_call(self, task_id: str, call_kind: str, output: str, *, context: dict | None = None) -> Grade | None:
        """Per-call labels offline. `context` (as logged with the call): {"turn": int} and, for a function
        call, {"executed": [calls already run this turn]}. Without a usable context: None."""
        task = mt_task_by_id(task_id)
        if task is None:
            return None
        if call_kind == "summary":
            return check_summary(output)
        turn = context.get("turn") if isinstance(context, dict) else None
        if not isinstance(turn, int) or not 0 <= turn < len(task.turns):
            return None
        if call_kind == "intent":
            return self._grade_intent(task, turn, output)
        if call_kind == "function_call":
            executed = context.get("executed", [])
            if not isinstance(executed, list) or not all(isinstance(e, str) for e in executed):
                return None
            return grade_step(task, turn, executed, output)
        return None


def check_summary(text: str) -> Grade:
    """A turn answer is plain text for the user: non-empty and no function call. BFCL does not grade it, so
    it has no correct/incorrect verdict (None)."""
    if not isinstance(text, str) or not text.strip():
        return Grade(False, None, "empty answer")  # type: ignore[arg-type]
    step = parse_step(text)
    if step.has_calls or step.malformed:
        return Grade(False, None, "the answer is a function call, not text for the user")  # type: ignore[arg-type]
    return Grade(True, None, "")  # type: ignore[arg-type]


def _selected(text: str) -> list[str] | None:
    try:
        return parse_intent(text)
    except ValueError:
        return None
