"""Where a call's task cluster and LoRA adapter come from: `Placement` embeds the prompt with the packaged MiniLM
(`prompt_text`, exactly as S3 embedded it) inside the process that routes (a team actor or the gateway), loaded on
first use, and finds the nearest S3 cluster; `WithAdapters` is the base of every policy that may carry a registry,
so that its SLM calls, and the SLM side of its shadows, use their cluster's promoted adapter. A fixed policy (llm,
random, ...) with a registry is how an iteration after the first collects: the LLM answers and the adapter in force
is the shadow that `slmshift tune` learns from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slmshift.platform.artifacts import AdapterRegistryFile, ClusterIndex, prompt_text, served_adapters
from slmshift.platform.embeddings import embed
from slmshift.platform.types import LMRequest, ModelSpec, RouteDecision, Tier
from slmshift.serve.router.base import RouterPolicy


class Placement:
    """Embeds a call's prompt and finds its nearest S3 cluster (when a cluster dir is given). Loads lazily; a load
    failure is remembered and reported on every call rather than retried per call."""

    def __init__(self, clusters_dir: str | None):
        self.clusters_dir = clusters_dir
        self._index: ClusterIndex | None = None
        self.error: str | None = None

    def place(self, request: LMRequest) -> tuple[np.ndarray, int | None, float | None]:
        if self.error:
            raise RuntimeError(self.error)
        try:
            vec = embed([prompt_text(request.messages)])
            if self.clusters_dir is None:
                return vec[0], None, None
            if self._index is None:
                self._index = ClusterIndex.load(self.clusters_dir)
            cluster, sim = self._index.assign_vectors(vec, [request.call_kind])[0]
        except Exception as e:  # the embedder or index could not load: route by default, say why
            self.error = f"router embedding/cluster index failed to load ({type(e).__name__}: {str(e)[:200]})"
            raise RuntimeError(self.error) from None
        return vec[0], cluster, sim


class WithAdapters(RouterPolicy):
    """A policy whose SLM calls use their task cluster's promoted adapter from `spec.registry` (if it names one);
    the registry's cluster index places calls unless the spec names its own `clusters`."""

    def __init__(self, spec: Any, models: list[ModelSpec]):
        super().__init__(spec, models)
        self.adapters: dict[int, str] = {}
        self.adapter_models: dict[str, str] = {}  # adapter label -> the slm deployment serving it
        clusters = getattr(spec, "clusters", None)
        if spec.registry:
            doc = AdapterRegistryFile.read(spec.registry)
            self.adapters = {e.cluster: e.label for e in doc.entries if e.promoted}
            clusters = clusters or str((Path(spec.registry).parent / doc.clusters_dir).resolve())
            self.adapter_models = _adapter_models(self.adapters.values(), self.models["slm"], models)
        self.placement = Placement(clusters)

    def adapter_for(self, cluster: int | None) -> str | None:
        return self.adapters.get(cluster) if cluster is not None else None

    def adapter_of(self, request: LMRequest, decision: RouteDecision) -> str | None:
        if decision.adapter or decision.cluster is not None or not self.adapters:
            return super().adapter_of(request, decision)
        try:  # a policy that routed without placing the call (llm, random, ...): place it for its SLM side
            _, cluster, _ = self.placement.place(request)
        except Exception:
            return None  # the base SLM answers; the placement error is on the policy's own records
        return self.adapter_for(cluster)

    def slm_decision(self, request: LMRequest, reason: str, **kw: Any) -> RouteDecision:
        """Send the call to the SLM with its cluster's promoted adapter, if any; the base SLM if placement fails."""
        if not self.adapters:
            return self.decision("slm", reason, **kw)
        try:
            _, cluster, _ = self.placement.place(request)
        except Exception as e:
            return self.decision("slm", f"{reason} (base model: {e})", **kw)
        adapter = self.adapter_for(cluster)
        return self.decision("slm", f"cluster {cluster} {reason}" + (f" -> adapter {adapter!r}" if adapter else ""),
                             cluster=cluster, adapter=adapter, **kw)

    def model_for(self, tier: Tier, adapter: str | None = None) -> str | None:
        if tier == "slm" and adapter is not None:
            return self.adapter_models.get(adapter, self.models["slm"])
        return self.models[tier]


def _adapter_models(labels: Any, default: str | None, models: list[ModelSpec]) -> dict[str, str]:
    """Each adapter's deployment: the policy's slm model where it serves the adapter (one base, as before S4 chose
    per cluster), else the first slm model that does (`served_adapters`: trained on its source). An adapter no model
    serves stays on the default (config validation reports it; the engine's answer names it)."""
    slms = sorted((m for m in models if m.tier == "slm"), key=lambda m: m.name != default)
    served = {}
    for m in slms:
        try:
            served[m.name] = served_adapters(m)
        except Exception:  # an unreadable registry: that model's engine fails to load and says why
            served[m.name] = {}
    return {label: next((m.name for m in slms if label in served[m.name]), default) for label in labels
            if default is not None or any(label in served[m.name] for m in slms)}
