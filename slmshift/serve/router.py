"""Router policies: decide, per call, whether the LLM or the SLM tier serves it (and with which adapter).

A policy implements one method, `choose(request) -> (tier, reason, score[, adapter])`; the concrete `route()`
maps the tier to the model named by the policy (or the first model of that tier). Later policies (threshold,
cascade, learned) register themselves with `@register_policy("kind")` and need nothing else.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from slmshift.platform.config import PolicySpec
from slmshift.platform.types import AdapterRegistryFile, LMRequest, ModelSpec, RouteDecision, Tier

_POLICIES: dict[str, type[RouterPolicy]] = {}


def register_policy(kind: str):
    def deco(cls: type[RouterPolicy]) -> type[RouterPolicy]:
        cls.kind = kind
        _POLICIES[kind] = cls
        return cls

    return deco


class Choice(NamedTuple):
    tier: Tier
    reason: str
    score: float | None = None
    adapter: str | None = None


class RouterPolicy(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, spec: PolicySpec, models: list[ModelSpec]):
        self.spec = spec
        self.models = {
            "llm": spec.llm_model or next((m.name for m in models if m.tier == "llm"), None),
            "slm": spec.slm_model or next((m.name for m in models if m.tier == "slm"), None),
        }

    @abc.abstractmethod
    def choose(self, request: LMRequest) -> tuple[Tier, str, float | None] | Choice:
        """Pick a tier for this request; return (tier, why, score or None[, adapter name or None])."""

    def route(self, request: LMRequest) -> RouteDecision:
        """The decision; when it names an adapter, `request.adapter` is set to it, so the engine serves it."""
        tier, reason, score, adapter = Choice(*self.choose(request))
        model = self.models[tier]
        if model is None:  # config validation prevents this; keep the message clear if a caller skips it
            raise ValueError(f"policy {self.spec.label!r} chose tier {tier!r} but no model of that tier is deployed")
        if adapter is not None:
            request.adapter = adapter
        return RouteDecision(policy=self.spec.label, kind=self.kind, model=model, tier=tier, reason=reason, score=score,
                             adapter=adapter)


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


@register_policy("adapters")
class ByAdapter(RouterPolicy):
    """Each call goes to its task cluster's promoted LoRA adapter on the SLM, else to the `default` tier.

    The cluster is the nearest S3 centroid to the call's embedded prompt (`prompt_text`, as S3 embedded it).
    The index and the embedder load on first use, inside the process that routes (a team actor).
    """

    def __init__(self, spec: PolicySpec, models: list[ModelSpec]):
        super().__init__(spec, models)
        if not spec.registry:
            raise ValueError(f"policy {spec.label!r} (kind 'adapters') needs `registry:`")
        doc = AdapterRegistryFile.read(spec.registry)
        self.adapters = {e.cluster: e.label for e in doc.entries if e.promoted}
        self.clusters_dir = (Path(spec.registry).parent / doc.clusters_dir).resolve()
        self._index: Any = None

    @property
    def index(self) -> Any:
        if self._index is None:
            from slmshift.train.cluster import ClusterIndex

            self._index = ClusterIndex.load(self.clusters_dir)
        return self._index

    def choose(self, request: LMRequest) -> Choice:
        from slmshift.train.cluster import prompt_text

        fallback = self.spec.default
        if not self.adapters:
            return Choice(fallback, "no promoted adapters: default")
        cluster, sim = self.index.assign([prompt_text(request.messages)])[0]
        label = self.adapters.get(cluster)
        if label is None:
            return Choice(fallback, f"cluster {cluster} has no promoted adapter: default", sim)
        if self.spec.min_similarity is not None and sim < self.spec.min_similarity:
            return Choice(fallback, f"nearest cluster {cluster} too far ({sim:.2f} < {self.spec.min_similarity}): "
                          "default", sim)
        return Choice("slm", f"cluster {cluster} -> adapter {label!r} (similarity {sim:.2f})", sim, label)


def build_policy(spec: PolicySpec, models: list[ModelSpec]) -> RouterPolicy:
    if spec.kind not in _POLICIES:
        raise KeyError(f"unknown router policy {spec.kind!r}; available: {', '.join(sorted(_POLICIES))}")
    return _POLICIES[spec.kind](spec, models)
