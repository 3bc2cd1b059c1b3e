"""Router policy options: one strict pydantic model per policy kind, and the registry the config schema is built from.

`router.policies` in an experiment YAML is a discriminated union on `kind` over every registered options model, so
a new kind registers its model here (`register_policy_options`) and needs no edit to `config.py`. The behaviour of
each kind lives in `slmshift/serve/router/`; these are only its validated settings, so that the ground floor can
check a YAML without importing Serve. Each model lists the tiers it may route to and its own cross-section checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slmshift.platform.types import AbsolutePath, ModelSpec, Tier

Shadow = Literal["none", "slm", "llm", "both"]
Constrain = Literal["slm", "all", "none"]
Problems = list[tuple[str, str]]


class PolicySpec(BaseModel):
    """Fields every policy kind has. One policy arm: every scenario runs once under each arm."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = Field(description="The policy kind (see the router section of the README).")
    name: str | None = Field(default=None, description="Label in reports (default: the kind).")
    default: Tier = Field(default="llm", description="Tier for calls the policy cannot place (unmapped call kind, no "
                          "adapter, a scorer that failed to load); the record says why.")
    llm_model: str | None = Field(default=None, description="Which `models:` entry serves the llm tier (default: first).")
    slm_model: str | None = Field(default=None, description="Which `models:` entry serves the slm tier (default: first).")
    shadow: Shadow = Field(default="none", description="Paired outcomes: also send each call to the other tier and "
                           "grade it, never feeding it back. slm: calls not served by the SLM also go to it; llm: calls "
                           "not served by the LLM also go to it; both: always the other tier.")
    shadow_rate: float = Field(default=1.0, ge=0, le=1, description="Share of episodes whose calls are all shadowed "
                               "(a deterministic sample by episode id: an episode is paired whole or not at all).")
    constrain: Constrain = Field(default="slm", description="Which tiers' engines enforce a call's output constraint "
                                 "(JSON schema, regex, grammar, forced tool call): slm (the small model is held to the "
                                 "format; the LLM answers free, as a hosted API may not constrain), all, or none. "
                                 "Shadow and cascade calls follow the tier they go to.")
    slm_attempts: int = Field(default=1, ge=1, le=8, description="Verifier-guided retries: the SLM answers a call "
                              "up to this many times and the first answer that passes the call's own check is used "
                              "(only then may a cascade escalate). Every attempt is logged and costed; a rejected one is "
                              "`escalated` (out of the SLM share's denominator) and the answer names it in `retried_from`.")
    attempt_temperature: float = Field(default=0.7, ge=0, le=2, description="Sampling temperature of the SLM's "
                                       "attempts after the first (the first keeps the call's own).")
    shadow_attempts: int = Field(default=1, ge=1, le=8, description="On a call whose SLM side is a shadow: the "
                                 "SLM answers up to this many times, as `slm_attempts` does, each attempt logged. "
                                 "`slmshift tune` then searches slm_attempts from 1 to this (k_max) with the other "
                                 "settings. Costs SLM calls only on shadowed calls whose answer fails its check.")

    tiers_used: ClassVar[frozenset[str]] = frozenset()  # tiers every arm of this kind may route to, besides `default`

    @property
    def label(self) -> str:
        return self.name or self.kind

    def tiers(self) -> set[str]:
        return set(self.tiers_used) | {self.default}

    def constrains(self, tier: str) -> bool:
        """Does this arm have `tier`'s engine enforce output constraints?"""
        return self.constrain == "all" or self.constrain == tier

    def check(self, path: str, models: list[ModelSpec]) -> Problems:
        """Checks that need other sections (models) or files; (field path, message) each."""
        return []


_KINDS: dict[str, type[PolicySpec]] = {}
_listeners: list[Any] = []


def register_policy_options(cls: type[PolicySpec]) -> type[PolicySpec]:
    """Register an options model under the `kind` literal it declares; the config schema is rebuilt."""
    kind = cls.model_fields["kind"].annotation.__args__[0]  # type: ignore[union-attr]
    _KINDS[kind] = cls
    for rebuild in _listeners:
        rebuild()
    return cls


def policy_kinds() -> dict[str, type[PolicySpec]]:
    return dict(_KINDS)


def policy_spec(data: dict[str, Any] | None = None, **fields: Any) -> PolicySpec:
    """Validate one policy spec by its kind (for code and tests; YAML goes through the config schema)."""
    data = {**(data or {}), **fields}
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown router policy kind {kind!r}; available: {', '.join(sorted(_KINDS))}")
    return _KINDS[kind].model_validate(data)


def on_register(rebuild: Any) -> None:
    _listeners.append(rebuild)
    rebuild()


def registry_problems(path: str, registry: str, slm_model: str | None, models: list[ModelSpec]) -> Problems:
    """A policy's adapter registry: readable, its cluster index complete, every promoted adapter served by an slm
    model of its base: the policy's SLM (slm_model, or the first slm) or another slm model with that
    `source` (S4 chooses a base per cluster; the router sends each cluster's calls to the model serving its adapter).
    """
    from slmshift.platform.artifacts import CLUSTER_FILES, AdapterRegistryFile, same_source, served_adapters
    from slmshift.platform.errors import SlmshiftError

    try:
        doc = AdapterRegistryFile.read(registry)
    except SlmshiftError as e:
        return [(f"{path}.registry", str(e))]
    problems: Problems = []
    clusters = (Path(registry).parent / doc.clusters_dir).resolve()
    missing = [n for n in CLUSTER_FILES if not (clusters / n).is_file()]
    if missing:
        problems.append((f"{path}.registry", f"its cluster index {clusters} lacks {', '.join(missing)}; "
                         "Fix: run `slmshift convert` again"))
    slms = [m for m in models if m.tier == "slm"]
    slm = next((m for m in slms if m.name == slm_model), None) if slm_model else next(iter(slms), None)
    if slm is None:
        return problems  # the tier check reports it
    served: dict[str, set[str]] = {}
    for m in slms:
        try:
            served[m.name] = set(served_adapters(m))
        except SlmshiftError:
            served[m.name] = set(m.adapters)  # its registry is reported on the model
    for e in doc.entries:
        if not e.promoted or any(e.label in served[m.name] for m in slms):
            continue
        base = next((m for m in [slm] + slms if same_source(e.base_model, m.source)), None)
        if base is slm or (base is None and len(slms) == 1 and same_source(e.base_model, slm.source)):
            problems.append((f"{path}.registry", f"promoted adapter {e.label!r} is not served by model {slm.name!r}; "
                             f"Fix: add `registry: {registry}` to that model (or name it in slm_model)"))
        elif base is not None:
            problems.append((f"{path}.registry", f"promoted adapter {e.label!r} (trained on {e.base_model!r}) is not "
                             f"served by model {base.name!r}, the slm model with that source; Fix: add `registry: "
                             f"{registry}` to it"))
        else:
            problems.append((f"{path}.registry", f"promoted adapter {e.label!r} was trained on {e.base_model!r}, which "
                             f"no slm model in `models:` serves; Fix: add a `models:` entry with tier: slm, source: "
                             f"{e.base_model} and registry: {registry}"))
    return problems


def _tau(field: str = "tau", default: float = 0.5, what: str = "route to the SLM when the score is at least this"):
    return Field(default=default, ge=0, le=1, description=f"Threshold in [0, 1]: {what}.")


class _WithRegistry(PolicySpec):
    """Options shared by policies whose SLM calls may carry their cluster's promoted LoRA adapter."""

    registry: AbsolutePath | None = Field(default=None, description="An adapter registry.json (`slmshift convert`): "
                                          "SLM calls, and the SLM side of shadows, use their cluster's promoted "
                                          "adapter (placed by the registry's S3 cluster index).")

    def check(self, path: str, models: list[ModelSpec]) -> Problems:
        return registry_problems(path, self.registry, self.slm_model, models) if self.registry else []


@register_policy_options
class LLMPolicy(_WithRegistry):
    kind: Literal["llm"] = Field(description="Always the LLM.")
    tiers_used: ClassVar[frozenset[str]] = frozenset({"llm"})

    def tiers(self) -> set[str]:
        return {"llm"}


@register_policy_options
class SLMPolicy(_WithRegistry):
    kind: Literal["slm"] = Field(description="Always the SLM.")
    tiers_used: ClassVar[frozenset[str]] = frozenset({"slm"})

    def tiers(self) -> set[str]:
        return {"slm"}


@register_policy_options
class CallKindPolicy(_WithRegistry):
    kind: Literal["call_kind"] = Field(description="A fixed map call kind -> tier (a per-role routing).")
    map: dict[str, Tier] = Field(default_factory=dict, description="call kind -> 'llm' | 'slm'; other kinds go to "
                                 "`default`.")

    def tiers(self) -> set[str]:
        return set(self.map.values()) | {self.default}


@register_policy_options
class RandomPolicy(_WithRegistry):
    kind: Literal["random"] = Field(description="The baseline: each call goes to the SLM with probability slm_share.")
    slm_share: float = Field(default=0.5, ge=0, le=1, description="Target share of calls sent to the SLM.")
    seed: int = Field(default=0, description="Seeds the draw (keyed by record id, so arms and relaunches repeat).")
    tiers_used: ClassVar[frozenset[str]] = frozenset({"llm", "slm"})


class _ClusterPaths(_WithRegistry):
    """Options shared by policies that place a call in an S3 task cluster."""

    clusters: AbsolutePath | None = Field(default=None, description="An S3 cluster dir (RUN_DIR/convert/clusters); "
                                          "per-cluster estimates and thresholds need it. Default: the registry's, if "
                                          "one is given.")
    tau: float = _tau()
    tau_per_cluster: dict[int, float] = Field(default_factory=dict, description="cluster id -> threshold in [0, 1], "
                                              "overriding `tau` for that cluster.")
    tiers_used: ClassVar[frozenset[str]] = frozenset({"llm", "slm"})

    @field_validator("tau_per_cluster")
    @classmethod
    def _taus_in_range(cls, v: dict[int, float]) -> dict[int, float]:
        bad = {c: t for c, t in v.items() if not 0 <= t <= 1}
        if bad:
            raise ValueError(f"thresholds must lie in [0, 1]; got {bad}")
        return v

    def check(self, path: str, models: list[ModelSpec]) -> Problems:
        import json

        problems = super().check(path, models)
        if not self.tau_per_cluster:
            return problems
        if not self.clusters:
            return problems + [(f"{path}.tau_per_cluster", "needs `clusters:` (the S3 cluster dir the ids refer to)")]
        info = Path(self.clusters) / "clusters.json"
        if not info.is_file():
            return problems + [(f"{path}.clusters", f"{self.clusters} is not a cluster dir (no clusters.json). Fix: "
                                "point at RUN_DIR/convert/clusters")]
        known = {int(c["id"]) for c in json.loads(info.read_text())}
        bad = sorted(set(self.tau_per_cluster) - known)
        return problems + ([(f"{path}.tau_per_cluster", f"unknown cluster id(s) {bad}; {self.clusters} has "
                             f"{sorted(known)}")] if bad else [])


class Estimate(BaseModel):
    """Logged SLM outcomes for one (cluster, call kind) cell; None means 'any'."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cluster: int | None = Field(default=None, description="S3 cluster id, or None for every cluster.")
    call_kind: str | None = Field(default=None, description="Call kind, or None for every kind.")
    successes: float = Field(ge=0, description="SLM calls in this cell whose output was acceptable.")
    trials: float = Field(ge=0, description="SLM calls in this cell.")


@register_policy_options
class ThresholdPolicy(_ClusterPaths):
    kind: Literal["threshold"] = Field(description="Score = the SLM's Beta-smoothed success rate for the call's "
                                       "(cluster, call kind) in logged outcomes; SLM when score >= tau.")
    estimates: list[Estimate] = Field(default_factory=list, description="Outcome counts per cell (written by "
                                      "`slmshift tune`); or give `from_run`.")
    from_run: AbsolutePath | None = Field(default=None, description="A run dir whose SLM-tier outcomes (shadow "
                                          "records included) give the estimates at start-up.")
    prior_strength: float = Field(default=2.0, gt=0, description="Pseudo-trials pulling a cell towards its parent "
                                  "(call kind, then all calls): the Beta prior's strength.")

    def check(self, path: str, models: list[ModelSpec]) -> Problems:
        problems = super().check(path, models)
        if not self.estimates and not self.from_run:
            problems.append((path, "kind 'threshold' needs `estimates` (from `slmshift tune`) or `from_run: RUN_DIR`"))
        if self.from_run and "://" not in self.from_run and not Path(self.from_run, "interactions").is_dir():
            problems.append((f"{path}.from_run", f"{self.from_run} has no interactions/ log. Fix: pass a run dir "
                             "printed by `slmshift run`"))
        return problems


@register_policy_options
class LearnedPolicy(_ClusterPaths):
    kind: Literal["learned"] = Field(description="Score = a classifier's probability that the SLM's output is "
                                     "acceptable, from the prompt's MiniLM embedding and call kind.")
    model: AbsolutePath = Field(description="The scorer file `slmshift tune` wrote "
                                "(RUN_DIR/tune/learned.joblib).")

    def check(self, path: str, models: list[ModelSpec]) -> Problems:
        problems = super().check(path, models)
        if not Path(self.model).is_file():
            problems.append((f"{path}.model", f"{self.model}: file not found. Fix: run `slmshift tune RUN_DIR` and "
                             "point at RUN_DIR/tune/learned.joblib"))
        return problems


@register_policy_options
class CascadePolicy(_WithRegistry):
    kind: Literal["cascade"] = Field(description="SLM first; its answer is kept when the call's own check passes and "
                                     "its confidence exp(mean token log-prob) >= tau, else the LLM answers.")
    tau: float = _tau(what="accept the SLM's answer when exp(mean token log-prob) is at least this")
    tiers_used: ClassVar[frozenset[str]] = frozenset({"llm", "slm"})


@register_policy_options
class AdaptersPolicy(_WithRegistry):
    kind: Literal["adapters"] = Field(description="Each call's task cluster -> the SLM with that cluster's promoted "
                                      "LoRA adapter; other calls go to `default`.")
    registry: AbsolutePath = Field(description="The registry.json `slmshift convert` wrote "
                                   "(RUN_DIR/convert/registry.json).")
    min_similarity: float | None = Field(default=None, ge=-1, le=1, description="A call whose cosine similarity to "
                                         "its nearest cluster centroid is below this goes to `default`.")
    tiers_used: ClassVar[frozenset[str]] = frozenset({"slm"})


# Keys of a policy file whose relative paths resolve against the file's own directory.
PATH_KEYS = ("registry", "clusters", "model", "from_run")
