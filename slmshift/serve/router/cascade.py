"""FrugalGPT-style cascade: the SLM answers first; the pipeline keeps its answer only when the call's own check
passes and the SLM's confidence, exp(mean token log-prob), is at least `tau`; otherwise the LLM answers. Both calls
are logged and costed; the LLM's record names the rejected attempt in `escalated_from`."""

from __future__ import annotations

from slmshift.platform.types import LMRequest, RouteDecision
from slmshift.serve.router.base import RouterPolicy, register_policy


@register_policy("cascade")
class Cascade(RouterPolicy):
    def route(self, request: LMRequest) -> RouteDecision:
        return self.decision("slm", f"cascade: SLM first, accept at confidence >= {self.spec.tau}",
                             accept_confidence=self.spec.tau)
