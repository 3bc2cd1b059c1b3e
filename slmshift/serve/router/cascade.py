"""FrugalGPT-style cascade: the SLM answers first; the pipeline keeps its answer only when the call's own check
passes and the SLM's confidence, exp(mean token log-prob), is at least `tau`; otherwise the LLM answers. Both calls
are logged and costed; the LLM's record names the rejected attempt in `escalated_from`. With a `registry`, the SLM
answers with the call's cluster's promoted adapter (the loop's verify arm after conversion)."""

from __future__ import annotations

from slmshift.platform.types import LMRequest, RouteDecision
from slmshift.serve.router.base import register_policy
from slmshift.serve.router.scored import WithAdapters


@register_policy("cascade")
class Cascade(WithAdapters):
    def route(self, request: LMRequest) -> RouteDecision:
        why = f"cascade: SLM first, accept at confidence >= {self.spec.tau}"
        if not self.adapters:
            return self.decision("slm", why, accept_confidence=self.spec.tau)
        try:
            _, cluster, _ = self.placement.place(request)
        except Exception as e:  # no cluster, no adapter: the base SLM still answers first
            return self.decision("slm", f"{why} (base model: {e})", accept_confidence=self.spec.tau)
        adapter = self.adapter_for(cluster)
        return self.decision("slm", f"cluster {cluster} {why}" + (f" -> adapter {adapter!r}" if adapter else ""),
                             cluster=cluster, adapter=adapter, accept_confidence=self.spec.tau)
