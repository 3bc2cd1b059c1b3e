"""Team actors: async Ray actors (0 CPUs) that each run several episodes of one scenario at once."""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from slmshift.agents.client import Session
from slmshift.platform import metrics
from slmshift.platform.config import ScenarioSpec
from slmshift.platform.log import LogClient, ScrubbingLog
from slmshift.platform.policies import PolicySpec
from slmshift.platform.scenario import Scenario
from slmshift.platform.types import EpisodeResult, ModelSpec
from slmshift.serve.handle_batching import wrap_handles
from slmshift.serve.pipeline import CallPipeline


@ray.remote(num_cpus=0)
class TeamActor:
    def __init__(self, scenario_cls: type[Scenario], spec: ScenarioSpec, seed: int, experiment_id: str,
                 policy: PolicySpec, models: list[ModelSpec], handles: dict[str, Any],
                 params: dict[str, float | None], log: Any, scrub: bool = False):
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # handle set-up chatter, per actor
        self.scenario = scenario_cls(spec, seed)
        self.label, self.policy, self.experiment_id, self.seed = spec.label, policy.label, experiment_id, seed
        self.log = LogClient(log)
        handles = wrap_handles(handles, models)  # micro-batches this actor's calls per deployment, where configured
        self.pipeline = CallPipeline(policy=policy, models=models, handles=handles, params=params,
                                     log=ScrubbingLog(self.log) if scrub else self.log, grader=self.scenario.grade_call)

    async def run_episode(self, task: Any, episode_id: str, attempt: int = 0) -> EpisodeResult:
        session = Session(self.pipeline, experiment_id=self.experiment_id, scenario=self.label,
                          episode_id=episode_id, task_id=task.id, seed=self.seed, attempt=attempt)
        t0 = time.perf_counter()
        try:
            outcome = await self.scenario.run_episode(task, session)
            success, reward, steps, detail, error = (outcome.success, outcome.reward, outcome.steps,
                                                     outcome.detail, None)
        except Exception as e:  # a crashing episode is a recorded failure, never a lost one
            success, reward, steps, detail, error = False, 0.0, 0, "", f"{type(e).__name__}: {e}"
        result = EpisodeResult(experiment_id=self.experiment_id, episode_id=episode_id, scenario=self.label,
                               task_id=task.id, policy=self.policy, success=success, reward=reward,
                               n_calls=session.calls, steps=steps, detail=detail, error=error,
                               wall_s=time.perf_counter() - t0, attempt=attempt)
        self.log.add_episode(result.model_dump())
        # The log actor holds this episode's records and outcome before the runner hears of it, so a kill of this
        # process after the answer cannot lose them (the log keeps them until they are in a file).
        await self.log.received()
        metrics.record_episode(result.scenario, result.policy, result.success)
        return result

    async def drain(self) -> None:
        """Wait until everything this actor logged is in a file."""
        await self.log.drain()
