"""The policy interface and registry.

A policy turns a request into one `RouteDecision` (tier, model, adapter, why, score) and never mutates the request:
the call pipeline (`serve/pipeline.py`) applies the decision. Scored policies also expose `score(request)`, the
estimated probability that the SLM's output is acceptable, and route to the SLM when it is at least their threshold.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from slmshift.platform.policies import PolicySpec
from slmshift.platform.types import LMRequest, ModelSpec, RouteDecision, Tier

_POLICIES: dict[str, type[RouterPolicy]] = {}


def register_policy(kind: str):
    def deco(cls: type[RouterPolicy]) -> type[RouterPolicy]:
        cls.kind = kind
        _POLICIES[kind] = cls
        return cls

    return deco


class RouterPolicy(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, spec: PolicySpec, models: list[ModelSpec]):
        self.spec = spec
        self.models: dict[str, str | None] = {
            "llm": spec.llm_model or next((m.name for m in models if m.tier == "llm"), None),
            "slm": spec.slm_model or next((m.name for m in models if m.tier == "slm"), None),
        }

    def score(self, request: LMRequest) -> float | None:
        """Estimated probability that the SLM's output for this call is acceptable; None for fixed policies."""
        return None

    @abc.abstractmethod
    def route(self, request: LMRequest) -> RouteDecision: ...

    def decision(self, tier: Tier, reason: str, *, score: float | None = None, adapter: str | None = None,
                 cluster: int | None = None, accept_confidence: float | None = None) -> RouteDecision:
        model = self.model_for(tier, adapter)
        if model is None:  # config validation prevents this; keep the message clear if a caller skips it
            raise ValueError(f"policy {self.spec.label!r} chose tier {tier!r} but no model of that tier is deployed")
        return RouteDecision(policy=self.spec.label, kind=self.kind, model=model, tier=tier, reason=reason,
                             score=score, adapter=adapter, cluster=cluster, accept_confidence=accept_confidence)

    def fallback(self, why: str) -> RouteDecision:
        return self.decision(self.spec.default, f"{why}: default")

    def model_for(self, tier: Tier, adapter: str | None = None) -> str | None:
        """The deployment that serves `tier`; for an slm call with a LoRA `adapter`, the one serving that adapter
        (policies with a registry: the model of the adapter's base, which S4 chose per cluster)."""
        return self.models[tier]

    def adapter_for(self, cluster: int | None) -> str | None:
        """The LoRA adapter the SLM serves for calls of this cluster, if the policy has one (shadow calls use it)."""
        return None

    def adapter_of(self, request: LMRequest, decision: RouteDecision) -> str | None:
        """The adapter the SLM side of this call uses (its own SLM call, or the shadow of an LLM call)."""
        return decision.adapter or self.adapter_for(decision.cluster)

    def other_model(self, tier: Tier) -> str | None:
        """The model of the other tier, for shadow calls."""
        return self.models["slm" if tier == "llm" else "llm"]


def build_policy(spec: PolicySpec, models: list[ModelSpec]) -> RouterPolicy:
    if spec.kind not in _POLICIES:
        raise KeyError(f"unknown router policy {spec.kind!r}; available: {', '.join(sorted(_POLICIES))}")
    return _POLICIES[spec.kind](spec, models)
