"""Policies that place a call in an S3 task cluster: `threshold` and `learned` (a score against tau, global or per
cluster) and `adapters` (the cluster's promoted LoRA adapter); `cascade` uses the same placement for its adapters.

The prompt is embedded with the packaged MiniLM (`prompt_text`, exactly as S3 embedded it) inside the process that
routes (a team actor or the gateway), loaded on first use. If the embedder or the cluster index fails to load, the
policy sends calls to its `default` tier and each record says why; the run goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slmshift.platform.artifacts import AdapterRegistryFile, ClusterIndex, prompt_text, served_adapters
from slmshift.platform.embeddings import embed
from slmshift.platform.types import LMRequest, ModelSpec, RouteDecision, Tier
from slmshift.serve.router.base import RouterPolicy, register_policy


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


class ScoredPolicy(WithAdapters):
    """SLM when score >= tau (the cluster's own tau where `tau_per_cluster` has one)."""

    def score_features(self, request: LMRequest, embedding: np.ndarray, cluster: int | None) -> float:
        raise NotImplementedError

    def score(self, request: LMRequest) -> float | None:
        vec, cluster, _ = self.placement.place(request)
        return self.score_features(request, vec, cluster)

    def route(self, request: LMRequest) -> RouteDecision:
        try:
            vec, cluster, _ = self.placement.place(request)
            s = self.score_features(request, vec, cluster)
        except Exception as e:
            return self.fallback(str(e))
        tau = self.spec.tau_per_cluster.get(cluster, self.spec.tau) if cluster is not None else self.spec.tau
        tier = "slm" if s >= tau else "llm"
        where = f"cluster {cluster} " if cluster is not None else ""
        adapter = self.adapter_for(cluster) if tier == "slm" else None
        return self.decision(tier, f"{where}score {s:.3f} {'>=' if tier == 'slm' else '<'} tau {tau:.3f}"
                             + (f" -> adapter {adapter!r}" if adapter else ""), score=s, cluster=cluster,
                             adapter=adapter)


@register_policy("threshold")
class Threshold(ScoredPolicy):
    def __init__(self, spec: Any, models: list[ModelSpec]):
        super().__init__(spec, models)
        from slmshift.platform.scorers import ThresholdTable

        estimates = list(spec.estimates) or estimates_from_run(spec.from_run, self.placement.clusters_dir)
        self.table = ThresholdTable(estimates, spec.prior_strength)

    def score_features(self, request: LMRequest, embedding: np.ndarray, cluster: int | None) -> float:
        return self.table.score(request.call_kind, cluster)

    def route(self, request: LMRequest) -> RouteDecision:
        if self.placement.clusters_dir is None:  # per call kind only: no embedding needed
            s = self.table.score(request.call_kind, None)
            tier = "slm" if s >= self.spec.tau else "llm"
            return self.decision(tier, f"call kind {request.call_kind!r} score {s:.3f} "
                                 f"{'>=' if tier == 'slm' else '<'} tau {self.spec.tau:.3f}", score=s)
        return super().route(request)


def estimates_from_run(run_dir: str | None, clusters_dir: str | None) -> list:
    """Per-cell SLM outcome counts from a run's log: every SLM-tier record with an outcome, shadows included."""
    from slmshift.platform.log import read_interactions
    from slmshift.platform.scorers import ThresholdTable, outcome

    if not run_dir:
        return []
    df = read_interactions(run_dir, include_shadow=True)
    df = df[df["tier"] == "slm"]
    ok = [outcome(c, v) for c, v in zip(df["correct"], df["valid"])]
    keep = [o is not None for o in ok]
    df = df[keep]
    clusters: list[int | None] = [None] * len(df)
    if clusters_dir and len(df):
        index = ClusterIndex.load(clusters_dir)
        clusters = [c for c, _ in index.assign([prompt_text(p) for p in df["prompt"]], list(df["call_kind"]))]
    return ThresholdTable.fit(df["call_kind"], clusters, [o for o in ok if o is not None])


@register_policy("learned")
class Learned(ScoredPolicy):
    def __init__(self, spec: Any, models: list[ModelSpec]):
        super().__init__(spec, models)
        self._scorer: Any = None
        self._load_error: Exception | None = None

    def score_features(self, request: LMRequest, embedding: np.ndarray, cluster: int | None) -> float:
        if self._load_error is not None:  # a scorer that failed to load is not re-read from disk on every call
            raise self._load_error
        if self._scorer is None:
            from slmshift.platform.scorers import LearnedScorer

            try:
                self._scorer = LearnedScorer.load(self.spec.model)
            except Exception as e:
                self._load_error = e
                raise
        return float(self._scorer.score_batch(embedding[None, :], [request.call_kind])[0])


@register_policy("adapters")
class ByAdapter(WithAdapters):
    """Each call goes to its task cluster's promoted LoRA adapter on the SLM, else to the `default` tier."""

    def route(self, request: LMRequest) -> RouteDecision:
        if not self.adapters:
            return self.fallback("no promoted adapters")
        try:
            _, cluster, sim = self.placement.place(request)
        except Exception as e:
            return self.fallback(str(e))
        label = self.adapters.get(cluster)
        if label is None:
            return self.decision(self.spec.default, f"cluster {cluster} has no promoted adapter: default", score=sim,
                                 cluster=cluster)
        if self.spec.min_similarity is not None and sim < self.spec.min_similarity:
            return self.decision(self.spec.default, f"nearest cluster {cluster} too far ({sim:.2f} < "
                                 f"{self.spec.min_similarity}): default", score=sim, cluster=cluster)
        return self.decision("slm", f"cluster {cluster} -> adapter {label!r} (similarity {sim:.2f})", score=sim,
                             adapter=label, cluster=cluster)
