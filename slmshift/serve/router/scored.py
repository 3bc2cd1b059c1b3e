"""Policies that place a call in an S3 task cluster to route it: `threshold` and `learned` (a score against tau,
global or per cluster) and `adapters` (the cluster's promoted LoRA adapter). Placement itself is in `placement.py`.
If the embedder or the cluster index fails to load, these policies send calls to their `default` tier and each
record says why; the run goes on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slmshift.platform.artifacts import ClusterIndex, prompt_text
from slmshift.platform.types import LMRequest, ModelSpec, RouteDecision
from slmshift.serve.router.base import register_policy
from slmshift.serve.router.placement import WithAdapters


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
