"""The agent side of a model call: number it and carry the episode's identity. Routing, calling, checking and
logging happen in the serve-side call pipeline (`slmshift.serve.pipeline.CallPipeline`), one per team actor."""

from __future__ import annotations

from typing import Any

from slmshift.platform.types import Hidden, LMRequest, OutputConstraint
from slmshift.serve.pipeline import CallPipeline, CallResult

__all__ = ["Session", "CallResult"]


class Session:
    """One episode attempt's view of the pipeline: numbers its calls so record ids are deterministic."""

    def __init__(self, pipeline: CallPipeline, *, experiment_id: str, scenario: str, episode_id: str, task_id: str,
                 seed: int = 0, attempt: int = 0):
        self.pipeline, self.experiment_id, self.scenario = pipeline, experiment_id, scenario
        self.episode_id, self.task_id, self.seed, self.attempt = episode_id, task_id, seed, attempt
        self.calls = 0

    async def call(self, *, role: str, call_kind: str, messages: list[dict[str, str]], expect: str = "text",
                   category: str = "template", json_schema: dict | None = None, max_tokens: int = 128,
                   temperature: float = 0.0, hidden: Hidden | None = None, check: Any = None,
                   context: Any = None, constraint: OutputConstraint | None = None) -> CallResult:
        req = LMRequest(
            experiment_id=self.experiment_id, episode_id=self.episode_id, call_index=self.calls,
            scenario=self.scenario, role=role, call_kind=call_kind, category=category, task_id=self.task_id,
            policy=self.pipeline.spec.label,
            # a constraint carries its own format; expect/json_schema are the older way to say the same
            **({"constraint": constraint} if constraint is not None else {"expect": expect, "json_schema": json_schema}),
            messages=messages,
            max_tokens=max_tokens, temperature=temperature, seed=self.seed, hidden=hidden, attempt=self.attempt)
        self.calls += 1
        return await self.pipeline.call(req, check, context)


def local_session(engine: Any, *, scenario: str = "local", task_id: str = "task", policy: Any = None,
                  log: Any = None, episode_id: str = "ep") -> Session:
    """A session over the real call pipeline with one in-process engine (no Ray, no Serve): offline evaluation and
    scripted episodes. Records go to `log` (default: a MemoryLog, at `session.pipeline.log`)."""
    from slmshift.platform.policies import policy_spec
    from slmshift.serve.pipeline import LocalHandle, MemoryLog

    spec = engine.spec
    pipeline = CallPipeline(policy=policy or policy_spec(kind=spec.tier), models=[spec],
                            handles={spec.name: LocalHandle(engine)}, params={}, log=log or MemoryLog())
    return Session(pipeline, experiment_id="local", scenario=scenario, episode_id=episode_id, task_id=task_id)
