"""Router policies: decide, per call, whether the LLM or the SLM tier serves it.

A policy implements one method, `choose(request) -> (tier, reason, score)`; the concrete `route()` maps the
tier to the model named by the policy (or the first model of that tier). Later policies (threshold,
cascade, learned) register themselves with `@register_policy("kind")` and need nothing else.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from slmshift.platform.config import PolicySpec
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
        self.models = {
            "llm": spec.llm_model or next((m.name for m in models if m.tier == "llm"), None),
            "slm": spec.slm_model or next((m.name for m in models if m.tier == "slm"), None),
        }

    @abc.abstractmethod
    def choose(self, request: LMRequest) -> tuple[Tier, str, float | None]:
        """Pick a tier for this request; return (tier, why, score or None)."""

    def route(self, request: LMRequest) -> RouteDecision:
        tier, reason, score = self.choose(request)
        model = self.models[tier]
        if model is None:  # config validation prevents this; keep the message clear if a caller skips it
            raise ValueError(f"policy {self.spec.label!r} chose tier {tier!r} but no model of that tier is deployed")
        return RouteDecision(policy=self.spec.label, kind=self.kind, model=model, tier=tier, reason=reason, score=score)


@register_policy("llm")
class AlwaysLLM(RouterPolicy):
    def choose(self, request: LMRequest) -> tuple[Tier, str, float | None]:
        return "llm", "always llm", None


@register_policy("slm")
class AlwaysSLM(RouterPolicy):
    def choose(self, request: LMRequest) -> tuple[Tier, str, float | None]:
        return "slm", "always slm", None


@register_policy("call_kind")
class ByCallKind(RouterPolicy):
    def choose(self, request: LMRequest) -> tuple[Tier, str, float | None]:
        if request.call_kind in self.spec.map:
            return self.spec.map[request.call_kind], f"call kind {request.call_kind!r} mapped", None
        return self.spec.default, f"call kind {request.call_kind!r} not mapped: default", None


def build_policy(spec: PolicySpec, models: list[ModelSpec]) -> RouterPolicy:
    if spec.kind not in _POLICIES:
        raise KeyError(f"unknown router policy {spec.kind!r}; available: {', '.join(sorted(_POLICIES))}")
    return _POLICIES[spec.kind](spec, models)
