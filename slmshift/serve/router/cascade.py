"""FrugalGPT-style cascade: the SLM answers first; the pipeline keeps its answer only when the call's own check
passes and the SLM's confidence, exp(mean token log-prob), is at least `tau`; otherwise the LLM answers. Both calls
are logged and costed; the LLM's record names the rejected attempt in `escalated_from`. With a `registry`, the SLM
answers with the call's cluster's promoted adapter (the loop's verify arm after conversion)."""

from __future__ import annotations

from slmshift.platform.types import LMRequest, RouteDecision
from slmshift.serve.router.base import register_policy
from slmshift.serve.router.placement import WithAdapters


@register_policy("cascade")
class Cascade(WithAdapters):
    def route(self, request: LMRequest) -> RouteDecision:
        return self.slm_decision(request, f"cascade: SLM first, accept at confidence >= {self.spec.tau}",
                                 accept_confidence=self.spec.tau)
