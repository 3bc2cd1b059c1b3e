"""MetaGPT-like software company on HumanEval (issue 4). Importing registers the "metagpt" scenario.

An episode is MetaGPT's SOP on one HumanEval problem: ProductManager (PRD) -> Architect (design) ->
ProjectManager (tasks) -> Engineer (code) -> QaEngineer (extra tests, the HumanEval tests run as a tool in the
sandbox, a run summary), with the QA -> Engineer feedback loop (`debug` calls) bounded by `debug_rounds`.
Success is pass@1 of the final code under HumanEval's own `check(entry_point)`, run in the sandbox.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from slmshift.platform.sandbox import SandboxLimits
from slmshift.platform.scenario import (
    EpisodeSession, Outcome, Scenario, ScenarioOptions, register_scenario, require_known,
)
from slmshift.scenarios.metagpt.data import Problem, all_ids, check_program, load_problems, problem_by_id
from slmshift.scenarios.metagpt.grading import grade_output
from slmshift.scenarios.metagpt.roles import CATEGORY, Company
from slmshift.scenarios.metagpt.schemas import Check
from slmshift.scenarios.metagpt.sop import Message, MessagePool, build_sop, run_sop

__all__ = ["MetaGPTOptions", "MetaGPTScenario", "Problem", "load_problems", "check_program", "CATEGORY"]

DEFAULT_MAX_TOKENS = {"prd": 192, "design": 192, "tasks": 128, "code": 384, "debug": 384, "tests": 192,
                      "summary": 96}


class MetaGPTOptions(ScenarioOptions):
    problems: list[str] | None = Field(
        default=None, description="HumanEval task ids to use, e.g. ['HumanEval/0']; default: a seeded sample "
        "of all 164.")
    debug_rounds: int = Field(default=2, ge=0, le=10, description="Most times QA may send failing code back to "
                              "the Engineer (the feedback edge's retry bound).")
    format_retries: int = Field(default=1, ge=0, le=5, description="Extra tries for a call whose output fails "
                                "its schema or does not parse, with the error fed back.")
    max_tokens: dict[str, int] = Field(default_factory=dict, description="Token budget per call kind "
                                       f"(overrides the defaults {DEFAULT_MAX_TOKENS}).")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature of every call (0 = greedy).")
    sandbox: SandboxLimits = Field(default_factory=SandboxLimits, description="Limits of each sandboxed test run.")

    @field_validator("problems")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one HumanEval id, or leave `problems` out for a sample of all 164")
        ids = all_ids()
        require_known(v, ids, "HumanEval ids", f"ids run from HumanEval/0 to HumanEval/{len(ids) - 1}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _kinds(cls, v: dict[str, int]) -> dict[str, int]:
        require_known(v, DEFAULT_MAX_TOKENS, "call kinds", f"call kinds: {', '.join(DEFAULT_MAX_TOKENS)}")
        low = [k for k, n in v.items() if n < 1]
        if low:
            raise ValueError(f"token budgets must be >= 1 (got {', '.join(f'{k}={v[k]}' for k in low)})")
        return v


@register_scenario
class MetaGPTScenario(Scenario):
    kind = "metagpt"
    Options = MetaGPTOptions
    options: MetaGPTOptions

    def tasks(self) -> list[Problem]:
        # More episodes than problems: the list repeats, in the same order.
        picked = load_problems(self.options.problems, n=self.spec.episodes, seed=self.seed)
        return [picked[i % len(picked)] for i in range(self.spec.episodes)]

    async def run_episode(self, task: Problem, session: EpisodeSession) -> Outcome:
        o = self.options
        company = Company(task, session, DEFAULT_MAX_TOKENS | o.max_tokens, o.format_retries, o.temperature, o.sandbox)
        pool = MessagePool(build_sop(o.debug_rounds))
        await run_sop(pool, company.behaviours(), Message("requirement", "Human", task.prompt))
        # pass@1: HumanEval's check on the final code; QA already graded exactly that code in the sandbox
        last = company.runs[-1] if company.runs else None
        success = bool(last and last.ok)
        detail = "passed" if success else (last.reason if last else "no parsable code was ever written")
        return Outcome(success=success, reward=1.0 if success else 0.0, steps=len(company.runs), detail=detail[:200])

    def token_budget(self, call_kind: str) -> int | None:
        return (DEFAULT_MAX_TOKENS | self.options.max_tokens).get(call_kind)

    def grade_call(self, task_id: str, call_kind: str, output: str, *, context: Any = None) -> Check | None:
        """Grade one call offline (see `grading.py` for each call kind): JSON schemas for prd/design/tasks/summary,
        HumanEval's tests in the sandbox for code/debug (blocking, up to `sandbox.wall_s`), QA's tests against the
        reference solution for tests. `context`: {"tests_passed": bool} lets a summary be judged right or wrong.
        None for an unknown task id or call kind; never raises on bad output."""
        problem = problem_by_id(task_id) if isinstance(task_id, str) else None
        if problem is None:
            return None
        return grade_output(problem, call_kind, output, self.options.sandbox, context)
