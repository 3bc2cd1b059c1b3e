"""Policies that need no score: always one tier, a fixed map per call kind, and the random baseline. With a
`registry`, the calls they send to the SLM (and their shadows' SLM side) carry their cluster's promoted adapter."""

from __future__ import annotations

import hashlib

from slmshift.platform.types import LMRequest, RouteDecision
from slmshift.serve.router.base import register_policy
from slmshift.serve.router.placement import WithAdapters


@register_policy("llm")
class AlwaysLLM(WithAdapters):
    def route(self, request: LMRequest) -> RouteDecision:
        return self.decision("llm", "always llm")


@register_policy("slm")
class AlwaysSLM(WithAdapters):
    def route(self, request: LMRequest) -> RouteDecision:
        return self.slm_decision(request, "always slm")


@register_policy("call_kind")
class ByCallKind(WithAdapters):
    def route(self, request: LMRequest) -> RouteDecision:
        tier = self.spec.map.get(request.call_kind, self.spec.default)
        why = f"call kind {request.call_kind!r} " + ("mapped" if request.call_kind in self.spec.map else
                                                     "not mapped: default")
        return self.slm_decision(request, why) if tier == "slm" else self.decision(tier, why)


def unit_draw(*key: object) -> float:
    """A uniform draw in [0, 1) keyed by what is drawn for, so relaunches and other arms repeat it."""
    digest = hashlib.sha256(repr(key).encode()).digest()[:8]
    return int.from_bytes(digest, "big") / 2**64


@register_policy("random")
class RandomShare(WithAdapters):
    """RouteLLM's random baseline: the SLM with probability `slm_share`, independent of the call."""

    def route(self, request: LMRequest) -> RouteDecision:
        u = unit_draw(self.spec.seed, request.task_id, request.call_kind, request.call_index, request.episode_id)
        why = f"random draw {u:.2f} vs slm_share {self.spec.slm_share}"
        return self.slm_decision(request, why) if u < self.spec.slm_share else self.decision("llm", why)
