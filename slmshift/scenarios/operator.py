"""Workflow automation, modelled on Open Operator, on BFCL v4.

Each episode is one BFCL request handled by a two-role team: the Planner parses the user's intent into the
functions it needs (JSON), then the Operator makes the next-step tool call(s) in BFCL's Python-call syntax,
seeing only the functions the Planner picked. When the Planner validly picks none (the right call on an
irrelevance task), the Operator is not asked and the team calls nothing. An unparsable call is fed back once
(Open Operator's observe-and-retry). BFCL's own checker for the category grades the final answer: the AST
checker, or for the (ir)relevance categories whether any call was made at all.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from slmshift.platform.scenario import (
    EpisodeSession, Outcome, Scenario, ScenarioOptions, register_scenario, require_known, went_right,
)
from slmshift.platform.types import Hidden
from slmshift.scenarios.bfcl import (
    CATEGORIES, BFCLTask, Grade, call_messages, distractor_calls, grade_calls, grade_intent,
    intent_distractors, intent_messages, intent_reference, load_tasks, reference_call,
)
from slmshift.scenarios.bfcl.constraints import call_constraint, intent_constraint
from slmshift.scenarios.bfcl.data import MULTI_TURN_CATEGORIES, task_by_id
from slmshift.scenarios.bfcl.grader import parse_intent


class OperatorOptions(ScenarioOptions):
    categories: list[str] = Field(default=["simple", "multiple", "parallel"], min_length=1,
                                  description=f"BFCL categories: {', '.join(CATEGORIES)}.")
    intent_max_tokens: int = Field(default=48, ge=1, description="Token budget of the intent call.")
    call_max_tokens: int = Field(default=128, ge=1, description="Token budget of the function call.")
    retries: int = Field(default=1, ge=0, le=5, description="Extra tries when the function call is unparsable.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature of every call (0 = greedy).")

    @field_validator("categories")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        require_known(v, CATEGORIES, "BFCL categories",
                      f"available: {', '.join(CATEGORIES)}; the multi-turn ones ({', '.join(MULTI_TURN_CATEGORIES)})"
                      " run in the operator_multiturn scenario")
        return v


@register_scenario
class OperatorScenario(Scenario):
    kind = "operator"
    Options = OperatorOptions
    options: OperatorOptions

    def tasks(self) -> list[BFCLTask]:
        # More episodes than tasks: the sample repeats, in the same order.
        picked = load_tasks(self.options.categories, n=self.spec.episodes, seed=self.seed)
        return [picked[i % len(picked)] for i in range(self.spec.episodes)]

    async def run_episode(self, task: BFCLTask, session: EpisodeSession) -> Outcome:
        o = self.options
        intent = await session.call(
            role="planner", call_kind="intent", category="template", messages=intent_messages(task),
            constraint=intent_constraint(task), max_tokens=o.intent_max_tokens, temperature=o.temperature,
            hidden=Hidden(answer=intent_reference(task), distractors=intent_distractors(task, self.seed)),
            check=lambda text: grade_intent(task, text))
        selected = _selected(intent.text) if intent.valid else None
        if selected == []:  # the Planner decided nothing should be called: the team answers without a call
            grade = grade_calls(task, "")
            return Outcome(success=grade.correct, reward=float(grade.correct),
                           detail=("correct" if grade.correct else "planner chose no function")[:200])
        messages = call_messages(task, selected)
        constraint = call_constraint(task, selected)  # the calls of the functions the Operator is shown
        # The Operator sees only the functions the Planner picked: a wrong pick handicaps a teacher too.
        hidden = Hidden(answer=reference_call(task), distractors=distractor_calls(task, self.seed),
                        upstream_ok=went_right(intent))
        for attempt in range(o.retries + 1):
            call = await session.call(
                role="operator", call_kind="function_call", category="template" if attempt == 0 else "debugging",
                messages=messages, constraint=constraint, max_tokens=o.call_max_tokens, temperature=o.temperature,
                hidden=hidden, check=lambda text: grade_calls(task, text))
            if call.valid:
                break
            messages = messages + [
                {"role": "assistant", "content": call.text},
                {"role": "user", "content": f"That could not be parsed ({call.error}). Reply with only the function "
                                            "call(s) in the format [func_name(param=value, ...)]."}]
        success = bool(call.correct)
        detail = "correct" if success else (call.error or grade_calls(task, call.text).reason or "wrong call")
        return Outcome(success=success, reward=1.0 if success else 0.0, detail=detail[:200])

    def token_budget(self, call_kind: str) -> int | None:
        return {"intent": self.options.intent_max_tokens, "function_call": self.options.call_max_tokens}.get(call_kind)

    def grade_call(self, task_id: str, call_kind: str, output: str, *, context: dict | None = None) -> Grade | None:
        """BFCL's checker for a logged call: the intent against the needed functions, the call by the category's
        own check (AST match, or call / no call). Needs no context: a single-turn task is graded from its id."""
        task = task_by_id(task_id)
        if task is None:
            return None
        if call_kind == "intent":
            return grade_intent(task, output)
        if call_kind == "function_call":
            return grade_calls(task, output)
        return None


def _selected(text: str) -> list[str] | None:
    """The function names of a valid intent answer (grade_intent already accepted its shape)."""
    try:
        return parse_intent(text)
    except ValueError:
        return None
