"""Policies that need no score: always one tier, a fixed map per call kind, and the random baseline."""

from __future__ import annotations

import hashlib

from slmshift.platform.types import LMRequest, RouteDecision
from slmshift.serve.router.base import RouterPolicy, register_policy


@register_policy("llm")
class AlwaysLLM(RouterPolicy):
    def route(self, request: LMRequest) -> RouteDecision:
        return self.decision("llm", "always llm")


@register_policy("slm")
class AlwaysSLM(RouterPolicy):
    def route(self, request: LMRequest) -> RouteDecision:
        return self.decision("slm", "always slm")


@register_policy("call_kind")
class ByCallKind(RouterPolicy):
    def route(self, request: LMRequest) -> RouteDecision:
        if request.call_kind in self.spec.map:
            return self.decision(self.spec.map[request.call_kind], f"call kind {request.call_kind!r} mapped")
        return self.fallback(f"call kind {request.call_kind!r} not mapped")


def unit_draw(*key: object) -> float:
    """A uniform draw in [0, 1) keyed by what is drawn for, so relaunches and other arms repeat it."""
    digest = hashlib.sha256(repr(key).encode()).digest()[:8]
    return int.from_bytes(digest, "big") / 2**64


@register_policy("random")
class RandomShare(RouterPolicy):
    """RouteLLM's random baseline: the SLM with probability `slm_share`, independent of the call."""

    def route(self, request: LMRequest) -> RouteDecision:
        u = unit_draw(self.spec.seed, request.task_id, request.call_kind, request.call_index, request.episode_id)
        tier = "slm" if u < self.spec.slm_share else "llm"
        return self.decision(tier, f"random draw {u:.2f} vs slm_share {self.spec.slm_share}")
