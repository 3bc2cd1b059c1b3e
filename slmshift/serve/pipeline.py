"""The call pipeline: route -> call -> (escalate) -> check -> S1 record -> metrics, for one model call.

A library object, not a deployment: it lives in the process that makes calls (each team actor, the gateway's
ingress replica), so scenario checks run in-process and there is no extra Serve hop. The agent side only numbers
its calls and carries episode identity (`agents/client.py`).

Failures never raise into the caller: a dead replica or a Serve error is retried a bounded number of times and
then recorded as an infrastructure error (`infra_error`, excluded from quality and SLM share); malformed output is a
failed call (valid=False, error set); a checker that crashes on untrusted output is a failed call too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from slmshift.platform import metrics
from slmshift.platform.cost import cost_usd, flops
from slmshift.platform.policies import PolicySpec
from slmshift.platform.scorers import outcome
from slmshift.platform.types import Interaction, LMRequest, LMResponse, ModelSpec, RouteDecision, Tier
from slmshift.serve.router import build_policy
from slmshift.serve.router.fixed import unit_draw

# Errors that mean the call never reached a model (a replica or node died, Serve shed load): retried, then recorded
# as infrastructure errors rather than as the model's failure.
INFRA_ERRORS = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "NodeDiedError", "WorkerCrashedError",
                "BackPressureError", "DeploymentUnavailableError", "RequestCancelledError", "ObjectLostError")
INFRA_RETRIES = 2
RETRY_JITTER = 0.5  # a shed call waits retry_after_s x U(1, 1 + this)


def retry_delay(error: BaseException, attempt: int, retry_after_s: float) -> float:
    """Seconds to wait before retry `attempt` (0 for the first) of a call that failed with an infrastructure error.
    Load shedding (BackPressureError) states how long to wait (Serve's `retry_after_s`, the model's own; a wrapped
    error that lost it falls back to `retry_after_s`): never sooner, and up to RETRY_JITTER more, so the calls one
    burst got shed together do not all come back in the same instant and get shed again. Other infrastructure errors
    (a replica Serve is replacing) back off 0.5 s, 1 s, ..."""
    chain = (error, getattr(error, "cause", None))  # a RayTaskError carries the original as `cause`
    if any(type(x).__name__ == "BackPressureError" for x in chain) or "BackPressureError" in str(error)[:300]:
        stated = next((x.retry_after_s for x in chain if getattr(x, "retry_after_s", None) is not None), None)
        return (retry_after_s if stated is None else stated) * (1 + RETRY_JITTER * random.random())
    return 0.5 * 2**attempt


@dataclass
class CallResult:
    text: str
    response: LMResponse
    decision: RouteDecision
    valid: bool | None
    correct: bool | None
    error: str | None
    escalated: bool = False
    verdict: Any = None  # what `check` returned for this output (scenarios read parsed values from it)


Grader = Callable[..., Any]  # Scenario.grade_call(task_id, call_kind, output, context=...) -> Verdict | None


class CallPipeline:
    """One per caller process. `call` returns the final answer; every model call made is logged."""

    def __init__(self, *, policy: PolicySpec, models: list[ModelSpec], handles: dict[str, Any],
                 params: dict[str, float | None], log: Any, grader: Grader | None = None, detached_shadows: int = 0):
        """`detached_shadows`: how many shadows may still be running after their call has returned. 0 (scenarios):
        a call returns once its shadow is logged, so an episode ends with its pairs complete. The gateway answers
        first: a CPU SLM's shadow would otherwise pace a live agent. Past the bound a call waits for its own
        shadow, so shadows cannot pile up without limit on a slow tier; `settle` waits for the rest."""
        self.policy = build_policy(policy, models)
        self.spec = policy
        self.specs = {m.name: m for m in models}
        self.handles, self.params, self.log, self.grader = handles, params, log, grader
        self.detached_shadows = detached_shadows
        self._pending: set[asyncio.Future] = set()

    async def _invoke(self, model: str, request: LMRequest) -> tuple[LMResponse, float, bool]:
        """(response, wall latency, infra error?) for one call to one deployment."""
        spec = self.specs[model]
        constrained = self.spec.constrains(spec.tier)  # the arm's `constrain` option, per tier served
        if request.constrained != constrained:
            request = request.model_copy(update={"constrained": constrained})
        t0 = time.perf_counter()
        for attempt in range(INFRA_RETRIES + 1):
            try:
                resp: LMResponse = await self.handles[model].remote(request)
                return resp, time.perf_counter() - t0, False
            except Exception as e:
                name = type(e).__name__
                first = str(e).splitlines()[0][:300] if str(e) else ""
                infra = name in INFRA_ERRORS or any(n in first for n in INFRA_ERRORS)
                if infra and attempt < INFRA_RETRIES:
                    await asyncio.sleep(retry_delay(e, attempt, spec.retry_after_s))
                    continue
                resp = LMResponse(text="", model=spec.name, tier=spec.tier, backend=spec.backend,
                                  error=f"{'infra: ' if infra else ''}{name}: {first}")
                return resp, time.perf_counter() - t0, infra
        raise AssertionError("unreachable")

    @staticmethod
    def _check(check: Any, resp: LMResponse) -> tuple[bool | None, bool | None, str | None, Any]:
        """(valid, correct, error, verdict). `check` must be free of side effects: shadows are checked with it too."""
        if resp.error is not None:
            return False, None, resp.error, None
        if check is None:
            return None, None, None, None
        try:
            verdict = check(resp.text)
            valid, correct = verdict.valid, verdict.correct
            return valid, correct, None if valid else (verdict.reason or "invalid output"), verdict
        except Exception as e:  # a checker must not crash the episode on untrusted output
            return False, None, f"checker failed: {type(e).__name__}: {e}", None

    def _record(self, request: LMRequest, decision: RouteDecision, resp: LMResponse, latency: float,
                valid: bool | None, correct: bool | None, error: str | None, infra: bool, context: Any = None,
                **extra: Any) -> dict:
        spec = self.specs[resp.model] if resp.model in self.specs else self.specs[decision.model]
        cost = cost_usd(spec.price, resp.tokens_in, resp.tokens_out)
        rec = Interaction(
            id=extra.pop("id", request.record_id), experiment_id=request.experiment_id,
            episode_id=request.episode_id, call_index=request.call_index, scenario=request.scenario,
            task_id=request.task_id, policy=request.policy, role=request.role, call_kind=request.call_kind,
            category=request.category, expect=request.expect, prompt=json.dumps(request.messages), output=resp.text,
            constraint=request.constraint.to_json() if request.constraint.kind else None, constrained=resp.constrained,
            model=resp.model, tier=resp.tier, backend=resp.backend, adapter=resp.adapter, route_kind=decision.kind,
            route_reason=decision.reason, tokens_in=resp.tokens_in, tokens_out=resp.tokens_out,
            max_tokens=request.max_tokens, latency_s=latency,
            engine_latency_s=resp.latency_s, cost_usd=cost,
            flops=flops(self.params.get(spec.name), resp.tokens_in, resp.tokens_out), mean_logprob=resp.mean_logprob,
            simulated=resp.simulated, valid=valid, correct=correct, error=error, infra_error=infra,
            route_score=decision.score, cluster=decision.cluster, attempt=request.attempt,
            context=None if context is None else json.dumps(context, default=str), **extra)
        self.log.add(rec.model_dump())
        tags = {"model": resp.model, "tier": resp.tier, "scenario": request.scenario, "call_kind": request.call_kind,
                "policy": request.policy}
        if not rec.shadow:
            metrics.record_call(tags, valid, resp.tokens_in, resp.tokens_out, cost, latency)
        return rec.model_dump()

    async def call(self, request: LMRequest, check: Any = None, context: Any = None) -> CallResult:
        decision = self.policy.route(request)
        engine_req = request.model_copy(update={"adapter": decision.adapter}) if decision.adapter else request
        shadow_task = None
        shadow_tier = self._shadow_tier(request, decision.tier)
        if shadow_tier is not None and decision.accept_confidence is None:  # in parallel: it never delays the answer
            shadow_task = asyncio.ensure_future(self._shadow(request, decision, shadow_tier, check, context))
        resp, latency, infra = await self._invoke(decision.model, engine_req)
        valid, correct, error, verdict = self._check(check, resp)
        retried_from = None
        if decision.tier == "slm" and self.spec.slm_attempts > 1:
            resp, latency, infra, (valid, correct, error, verdict), retried_from = await self._retry(
                request, engine_req, decision, check, context, resp, latency, infra, (valid, correct, error, verdict),
                self.spec.slm_attempts, request.record_id)
        if decision.accept_confidence is not None and not infra:
            keep, why = self._accept(resp, valid, decision.accept_confidence)
            if not keep:  # log the rejected SLM attempt, then the LLM answers
                attempt_id = f"{request.record_id}:cascade"
                self._record(request, decision.model_copy(update={"reason": f"{decision.reason}; rejected: {why}"}),
                             resp, latency, valid, correct, error, infra, context, id=attempt_id, escalated=True,
                             retried_from=retried_from)
                decision = self.policy.decision("llm", f"cascade escalated: {why}")
                resp, latency2, infra = await self._invoke(decision.model, request)
                latency += latency2
                valid, correct, error, verdict = self._check(check, resp)
                self._record(request, decision, resp, latency, valid, correct, error, infra, context,
                             escalated_from=attempt_id)
                return CallResult(resp.text, resp, decision, valid, correct, error, escalated=True, verdict=verdict)
            decision = decision.model_copy(update={"reason": f"{decision.reason}; accepted: {why}"})
        if shadow_tier is not None and shadow_task is None and not infra:
            shadow_task = asyncio.ensure_future(self._shadow(request, decision, shadow_tier, check, context))
        if shadow_task is not None and correct is None and valid and self.grader is not None:
            correct = await self._grade(request, resp.text, context)  # paired data needs both sides graded
        self._record(request, decision, resp, latency, valid, correct, error, infra, context, retried_from=retried_from)
        if shadow_task is not None and not shadow_task.done():
            if len(self._pending) < self.detached_shadows:
                self._pending.add(shadow_task)
                shadow_task.add_done_callback(self._pending.discard)
            else:
                await shadow_task
        return CallResult(resp.text, resp, decision, valid, correct, error, verdict=verdict)

    @property
    def running_shadows(self) -> int:
        return len(self._pending)

    async def settle(self, timeout_s: float | None = None) -> int:
        """Wait for the shadows still running after their calls returned (`detached_shadows`); returns how many were
        still running at `timeout_s`."""
        if not self._pending:
            return 0
        _, running = await asyncio.wait(set(self._pending), timeout=timeout_s)
        return len(running)

    async def _retry(self, request: LMRequest, engine_req: LMRequest, decision: RouteDecision, check: Any,
                     context: Any, resp: LMResponse, latency: float, infra: bool, checked: tuple, attempts: int,
                     base_id: str, **extra: Any) -> tuple[LMResponse, float, bool, tuple, str | None]:
        """Verifier-guided retries (`slm_attempts`, or `shadow_attempts` on a shadow): while the SLM's answer fails
        the call's own check, log it as a rejected attempt ('<base_id>:try<n>', escalated, with `extra` fields) and
        sample another, at `attempt_temperature` and a seed of its own. Returns the last answer, the latency of all
        attempts, and the id of the last rejected one. Only a check that says invalid triggers a retry: an unchecked
        call, or one the engine never answered (infra), does not."""
        retried_from, own = None, latency  # each attempt's record has its own latency; the answer's, all of them
        for n in range(1, attempts):
            if infra or checked[0] is not False:
                break
            retried_from = f"{base_id}:try{n}"
            self._record(request, decision.model_copy(update={"reason": f"{decision.reason}; retried: "
                                                                           f"{(checked[2] or 'check failed')[:80]}"}),
                         resp, own, *checked[:3], infra, context, id=retried_from, escalated=True, **extra)
            # a seed of its own per call and attempt: calls sharing the session's seed would otherwise draw the same
            # random stream, and SmolLM2 then wrote the same `{"functions":[]}` on every retried intent
            key = hashlib.sha256(f"{retried_from}/{request.seed}".encode()).digest()
            again = engine_req.model_copy(update={"temperature": self.spec.attempt_temperature,
                                                  "seed": int.from_bytes(key[:4], "big") >> 1})
            resp, own, infra = await self._invoke(decision.model, again)
            latency += own
            checked = self._check(check, resp)
        return resp, latency, infra, checked, retried_from

    @staticmethod
    def _accept(resp: LMResponse, valid: bool | None, tau: float) -> tuple[bool, str]:
        if resp.error is not None:
            return False, f"SLM error ({resp.error[:80]})"
        if valid is False:
            return False, "check failed"
        if resp.mean_logprob is None:
            return True, "check passed (engine reports no log-prob)"
        conf = math.exp(resp.mean_logprob)
        return (conf >= tau), f"confidence {conf:.3f} {'>=' if conf >= tau else '<'} {tau}"

    def _shadow_tier(self, request: LMRequest, served: Tier) -> Tier | None:
        mode = self.spec.shadow
        if mode == "none":
            return None
        other: Tier = "slm" if served == "llm" else "llm"
        if mode != "both" and mode != other:
            return None
        if self.policy.models[other] is None:
            return None
        # Sampled by episode, not call: every call of a sampled episode is paired, so `slmshift tune` can compose
        # an episode's outcome under a routing from its calls (a partly paired episode cannot be composed).
        if self.spec.shadow_rate < 1 and \
                unit_draw("shadow", request.experiment_id, request.episode_id) >= self.spec.shadow_rate:
            return None
        return other

    async def _grade(self, request: LMRequest, text: str, context: Any) -> bool | None:
        try:
            verdict = await asyncio.to_thread(self.grader, request.task_id, request.call_kind, text, context=context)
        except Exception:
            return None
        return None if verdict is None else outcome(verdict.correct, verdict.valid)

    async def _shadow(self, request: LMRequest, primary: RouteDecision, tier: Tier, check: Any, context: Any) -> None:
        """The same request on the other tier, graded, logged as '<id>:shadow'; never returned to the episode."""
        # the SLM side serves the adapter the policy would use for this call's cluster, where it has one, on the
        # model of that adapter's base (a policy that routed without placing the call places it here, off the loop)
        adapter = await asyncio.to_thread(self.policy.adapter_of, request, primary) if tier == "slm" else None
        model = self.policy.model_for(tier, adapter)
        decision = self.policy.decision(tier, f"shadow of {primary.tier} call", adapter=adapter)
        req = request.model_copy(update={"adapter": adapter}) if adapter else request
        shadow_id = f"{request.record_id}:shadow"
        try:
            resp, latency, infra = await self._invoke(model, req)
            (valid, correct, error, _), retried_from = self._check(check, resp), None
            if tier == "slm" and self.spec.shadow_attempts > 1:  # k_max attempts, so tune can search slm_attempts
                resp, latency, infra, (valid, correct, error, _), retried_from = await self._retry(
                    request, req, decision, check, context, resp, latency, infra, (valid, correct, error, None),
                    self.spec.shadow_attempts, shadow_id, shadow=True, shadow_of=request.record_id)
            if correct is None and valid and self.grader is not None:
                correct = await self._grade(request, resp.text, context)
            self._record(request, decision, resp, latency, valid, correct, error, infra, context,
                         id=shadow_id, shadow=True, shadow_of=request.record_id, retried_from=retried_from)
        except Exception:  # a shadow must never disturb the episode
            pass


class LocalHandle:
    """An engine called in-process, shaped like a DeploymentHandle (`await handle.remote(request)`): the pipeline
    without Serve, for offline evaluation and for tests that script a model's answers."""

    def __init__(self, engine: Any):
        self.engine = engine

    def remote(self, request: LMRequest) -> Any:
        return self._one(request)

    async def _one(self, request: LMRequest) -> LMResponse:
        return (await self.engine.generate([request]))[0]


class MemoryLog:
    """The pipeline's log interface kept in memory (records and episode outcomes as dicts), for in-process use."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.episodes: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)

    def add_episode(self, result: dict) -> None:
        self.episodes.append(result)

    def flush(self) -> None:
        pass

    async def drain(self) -> None:
        pass
