"""`LMClient`: the one way an agent role calls a model. Builds the request, asks the router, calls the chosen
Serve deployment, checks the output, writes the S1 record and the Ray metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from slmshift.platform import metrics
from slmshift.platform.config import PolicySpec
from slmshift.platform.cost import cost_usd, flops
from slmshift.platform.types import EpisodeResult, Hidden, Interaction, LMRequest, LMResponse, ModelSpec, RouteDecision
from slmshift.serve.router import build_policy


@dataclass
class CallResult:
    text: str
    response: LMResponse
    decision: RouteDecision
    valid: bool | None
    correct: bool | None
    error: str | None


class LMClient:
    """Lives inside a team actor. Records are buffered and shipped to the log actor in batches."""

    def __init__(self, experiment_id: str, scenario: str, policy: PolicySpec, models: list[ModelSpec],
                 handles: dict[str, Any], params: dict[str, float | None], log: Any, seed: int = 0,
                 flush_every: int = 64):
        self.experiment_id, self.scenario, self.seed = experiment_id, scenario, seed
        self.policy = build_policy(policy, models)
        self.specs = {m.name: m for m in models}
        self.handles, self.params, self.log = handles, params, log
        self.flush_every = flush_every
        self._records: list[dict] = []
        self._episodes: list[dict] = []
        self._pending: list[Any] = []  # log-actor calls not yet acknowledged

    def episode(self, episode_id: str, task_id: str) -> Session:
        return Session(self, episode_id, task_id)

    async def complete(self, request: LMRequest, check: Any = None) -> CallResult:
        """Route, call, check and log one request. Engine errors and malformed output come back as a failed
        call (valid=False, error set); they never raise into the agent."""
        decision = self.policy.route(request)
        t0 = time.perf_counter()
        try:
            resp: LMResponse = await self.handles[decision.model].remote(request)
        except Exception as e:  # a dead replica or a Serve error: a failed call, the episode goes on
            spec = self.specs[decision.model]
            resp = LMResponse(text="", model=spec.name, tier=spec.tier, backend=spec.backend,
                              error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        latency = time.perf_counter() - t0
        valid = correct = None
        error = resp.error
        if error is not None:
            valid = False
        elif check is not None:
            try:
                verdict = check(resp.text)
                valid, correct = verdict.valid, verdict.correct
                error = None if valid else (verdict.reason or "invalid output")
            except Exception as e:  # a checker must not crash the episode on untrusted output
                valid, error = False, f"checker failed: {type(e).__name__}: {e}"
        spec = self.specs[decision.model]
        cost = cost_usd(spec.price, resp.tokens_in, resp.tokens_out)
        rec = Interaction(
            id=request.record_id, experiment_id=request.experiment_id, episode_id=request.episode_id,
            call_index=request.call_index, scenario=request.scenario, task_id=request.task_id, policy=request.policy,
            role=request.role, call_kind=request.call_kind, category=request.category, expect=request.expect,
            prompt=json.dumps(request.messages), output=resp.text, model=resp.model, tier=resp.tier,
            backend=resp.backend, adapter=resp.adapter, route_kind=decision.kind, route_reason=decision.reason,
            tokens_in=resp.tokens_in, tokens_out=resp.tokens_out, latency_s=latency,
            engine_latency_s=resp.latency_s, cost_usd=cost, flops=flops(self.params.get(spec.name), resp.tokens_in,
                                                                          resp.tokens_out),
            mean_logprob=resp.mean_logprob, simulated=resp.simulated, valid=valid, correct=correct, error=error)
        self._records.append(rec.model_dump())
        tags = {"model": resp.model, "tier": resp.tier, "scenario": request.scenario, "call_kind": request.call_kind,
                "policy": request.policy}
        metrics.record_call(tags, valid, resp.tokens_in, resp.tokens_out, cost, latency)
        if len(self._records) >= self.flush_every:
            self.flush()
        return CallResult(resp.text, resp, decision, valid, correct, error)

    def add_episode(self, result: EpisodeResult) -> None:
        self._episodes.append(result.model_dump())
        metrics.record_episode(result.scenario, result.policy, result.success)

    def flush(self) -> None:
        """Ship buffered records to the log actor without waiting (the actor serialises writes)."""
        if self._records:
            self._pending.append(self.log.add.remote(self._records))
            self._records = []
        self._pending += [self.log.add_episode.remote(ep) for ep in self._episodes]
        self._episodes = []
        if len(self._pending) > 256:  # drop acknowledged refs so the list stays short
            import ray

            done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)

    async def drain(self) -> None:
        """Flush and wait until the log actor has every record. Call before the owning actor exits:
        calls still in flight from a killed actor are lost."""
        self.flush()
        pending, self._pending = self._pending, []
        for ref in pending:
            await ref


class Session:
    """One episode's view of the client: numbers its calls so record ids are deterministic."""

    def __init__(self, client: LMClient, episode_id: str, task_id: str):
        self.client, self.episode_id, self.task_id = client, episode_id, task_id
        self.calls = 0

    async def call(self, *, role: str, call_kind: str, messages: list[dict[str, str]], expect: str = "text",
                   category: str = "template", json_schema: dict | None = None, max_tokens: int = 128,
                   temperature: float = 0.0, hidden: Hidden | None = None, check: Any = None) -> CallResult:
        c = self.client
        req = LMRequest(
            experiment_id=c.experiment_id, episode_id=self.episode_id, call_index=self.calls, scenario=c.scenario,
            role=role, call_kind=call_kind, category=category, task_id=self.task_id, policy=c.policy.spec.label,
            messages=messages, expect=expect, json_schema=json_schema, max_tokens=max_tokens,
            temperature=temperature, seed=c.seed, hidden=hidden)
        self.calls += 1
        return await c.complete(req, check)
