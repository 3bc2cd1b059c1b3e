"""Experiment YAML schema: one strict pydantic model per section, and a loader whose errors name the file,
the field path, its line, and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from slmshift.platform.errors import ConfigError, SlmshiftError, one_line_error
from slmshift.platform.artifacts import AdapterRegistryFile, same_source
from slmshift.platform.policies import PATH_KEYS, Constrain, PolicySpec, on_register, policy_kinds
from slmshift.platform.types import VLLM_FIX, ModelSpec, absolute_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentSection(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Names the run directory.")
    description: str = ""
    seed: int = Field(default=0, description="Seeds task sampling, sampling temperature and simulated teachers.")
    storage: str = Field(
        default="runs", description="Where run directories go: a local path, or s3:// / gs:// reachable by every node."
    )


class LogSection(_Strict):
    """The S1 log's own settings."""

    scrub: bool = Field(default=False, description="Scrub secrets and PII from every text field of each record "
                        "(prompt, output, error, context, route reason; an episode's detail and error) before it is "
                        "written; identifiers are left as they are, but the gateway scrubs those its clients send (S2 "
                        "scrubs its training set either way). The gateway defaults to on.")


class RaySection(_Strict):
    address: str | None = Field(
        default=None, description="Ray cluster to join ('auto', 'ray://host:10001'); None starts an embedded local one."
    )
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the embedded cluster (default: all).")
    dashboard: bool = Field(default=True, description="Start the dashboard on 127.0.0.1 when its deps are present.")
    dashboard_port: int | None = Field(default=None, ge=1, le=65535, description="Embedded cluster's dashboard port "
                                       "(default: 8265, or the next free one when another Ray holds it).")
    metrics_export_port: int | None = Field(
        default=None, ge=1, le=65535, description="Fixed Prometheus port for this node's metrics (default: random)."
    )
    object_store_mb: int | None = Field(default=None, ge=75, description="Object store size of the embedded cluster.")


class RouterSection(_Strict):
    policies: list[PolicySpec] = Field(min_length=1, description="Policy arms to compare; each is a policy spec, or "
                                       "{file: PATH} naming a policy YAML (e.g. the policy.yaml `slmshift tune` wrote); keys beside `file` "
                                       "override the file's (e.g. {file: PATH, name: tuned-travel}).")

    @field_validator("policies", mode="before")
    @classmethod
    def _expand_files(cls, v: Any) -> Any:
        return [{**read_policy_file(p), **{k: x for k, x in p.items() if k != "file"}}
                if isinstance(p, dict) and "file" in p else p for p in v] if isinstance(v, list) else v


def read_policy_file(entry: dict) -> dict:
    """A `{file: PATH}` arm: the policy spec in that YAML, its relative paths resolved against the file."""
    path = Path(absolute_path(str(entry["file"])))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"policy file {path}: cannot read it ({one_line_error(e)}). Fix: "
                         "point at a policy YAML such as RUN_DIR/tune/policy.yaml") from None
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"policy file {path}: must be a mapping with at least `kind:` (a policy spec)")
    for key in PATH_KEYS:
        if isinstance(data.get(key), str) and "://" not in data[key] and not Path(data[key]).is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    return data


def _rebuild_router_schema() -> None:
    """`router.policies` is a discriminated union on `kind` over every registered policy options model."""
    kinds = tuple(policy_kinds().values())
    union = Annotated[Union[kinds], Field(discriminator="kind")] if len(kinds) > 1 else kinds[0]  # type: ignore
    RouterSection.model_fields["policies"].annotation = list[union]  # type: ignore[valid-type]
    RouterSection.model_rebuild(force=True)
    for name in ("ExperimentConfig", "GatewayConfig"):
        if name in globals():
            globals()[name].model_rebuild(force=True)


on_register(_rebuild_router_schema)


class ScenarioSpec(_Strict):
    kind: str = Field(description="Scenario family, e.g. 'operator'.")
    name: str | None = Field(default=None, description="Label in reports (default: the kind).")
    episodes: int = Field(default=10, ge=1, description="Episodes per policy arm.")
    teams: int = Field(default=2, ge=1, description="Team actors (Ray actors) sharing the episodes.")
    concurrency: int = Field(default=8, ge=1, description="Episodes each team actor runs at once.")
    seed: int | None = Field(default=None, description="Task sampling seed (default: experiment.seed).")
    episode_attempts: int = Field(default=3, ge=1, description="Times an episode is run when its team actor dies "
                                  "under it (OOM kill, lost node) before it is recorded as failed (error 'infra: …').")
    options: dict[str, Any] = Field(default_factory=dict, description="Scenario-specific options (see its docs).")
    exclude_tasks: list[str] = Field(default_factory=list, description="Task ids never to run (e.g. those a "
                                     "`slmshift tune` search saw, for `--verify`); other tasks take their place.")

    @property
    def label(self) -> str:
        return self.name or self.kind


class LoopConvert(_Strict):
    """The loop's conversion settings (`slmshift convert`'s flags as a typed section)."""

    rule: Literal["episode_or_call", "episode", "call", "episode_and_call", "valid"] = Field(
        default="episode_or_call", description="S2 keep rule.")
    k_min: int = Field(default=2, ge=1, description="Smallest number of S3 clusters tried.")
    k_max: int = Field(default=8, ge=1, description="Largest number of S3 clusters tried.")
    candidates: list[str] = Field(default_factory=lambda: ["smollm2-135m"], min_length=1,
                                  description="S4 SLM candidates (registered names, packaged:..., or model dirs); "
                                  "each cluster gets its own choice, and verify deploys one SLM per chosen base.")
    licenses: list[str] | None = Field(default=None, description="S4's licence gate: only candidates under one of "
                                       "these licences are measured; None: any.")
    max_memory_mb: float | None = Field(default=None, gt=0, description="S4's footprint gate: only candidates whose "
                                        "served weights fit in this many MB are measured; None: any.")
    min_train_rows: int = Field(default=16, ge=1, description="Curated train rows a cluster needs to be tuned.")
    min_promotion_tasks: int = Field(default=10, ge=1, description="Distinct held-out tasks an adapter needs to be "
                                     "promoted (the promotion bootstrap resamples tasks; see slmshift convert).")
    lora_rank: int = Field(default=8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(default=16.0, gt=0, description="LoRA alpha.")
    lora_steps: PositiveInt | Literal["auto"] = Field(default="auto", description="LoRA optimiser steps per cluster, or auto: "
                                              "two passes over its train rows within a token budget, at least 20.")
    lora_lr: float = Field(default=1e-3, gt=0, description="LoRA learning rate.")
    batch_size: int = Field(default=8, ge=1, description="Examples per LoRA step.")
    accumulate: bool = Field(default=False, description="Each iteration's convert also trains on every earlier "
                             "iteration's collect (`convert --train-also`): training rows only, dropped for a task the "
                             "iteration holds out.")
    activation_checkpointing: bool | Literal["auto"] = Field(default="auto", description="Recompute activations in "
                                                         "the LoRA backward pass: about half the memory, slower "
                                                         "steps. auto: keep them when they fit in half of the "
                                                         "available memory.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(default="auto", description="LoRA forward precision; "
                                                              "auto: bfloat16 where the CPU or GPU does bf16 "
                                                              "natively, else float32.")


class LoopEpisodes(_Strict):
    """One scenario's own episode counts in the loop (those not given follow the loop's)."""

    collect: int | None = Field(default=None, ge=1, description="Collect episodes for this scenario.")
    verify: int | None = Field(default=None, ge=1, description="Verify episodes per arm for this scenario.")


class LoopSection(_Strict):
    """`slmshift loop`: collect -> convert -> tune -> verify, per iteration."""

    collect_episodes: int = Field(default=64, ge=1, description="Episodes per scenario collected on training tasks "
                                  "no earlier iteration collected on (a shadow_rate sample of whole episodes shadowed "
                                  "on the other tier).")
    verify_episodes: int = Field(default=16, ge=1, description="Episodes per scenario and arm on held-out verify "
                                 "tasks (always-LLM and the tuned router).")
    budget: float = Field(default=0.95, gt=0, lt=1, description="Relative quality budget: the tuned router must keep "
                          "verify success >= budget x always-LLM's (0.95 = at most 5% quality loss).")
    shadow_rate: float = Field(default=1.0, gt=0, le=1, description="Share of collected episodes whose every call is "
                               "also sent to the other tier (paired outcomes); lower it to shorten collection with a "
                               "real SLM.")
    constrain: Constrain = Field(default="slm", description="Every loop arm's `constrain` option (which tiers' engines "
                                 "enforce a call's output constraint), and whether convert grades held-out calls "
                                 "constrained: slm (default), all, or none (the SLM answers free, to measure what "
                                 "constraining adds).")
    slm_attempts_max: int = Field(default=1, ge=1, le=8, description="Collect answers each shadowed call on the SLM "
                                  "up to this many times while its answer fails the call's check (the collect arm's "
                                  "`shadow_attempts`), and tune searches `slm_attempts` from 1 to this with the other "
                                  "policy settings. 1: no retries.")
    max_clusters: int | None = Field(default=None, ge=1, description="Most clusters LoRA-tuned per iteration "
                                     "(largest first); default: every cluster with min_train_rows.")
    tune_time_budget_s: float = Field(default=120.0, gt=0, description="Wall-clock budget of each tune search.")
    seed: int = Field(default=0, description="Seeds the task split, clustering, LoRA and the search.")
    scenario_episodes: dict[str, LoopEpisodes] = Field(
        default_factory=dict, description="Per scenario name: its own collect/verify episodes, e.g. fewer for "
        "operator_multiturn, whose episodes make ~17 calls where a single-turn one makes 2.")
    convert: LoopConvert = Field(default_factory=LoopConvert)

    def episodes(self, label: str) -> tuple[int, int]:
        """(collect, verify) episodes for the scenario called `label`."""
        own = self.scenario_episodes.get(label) or LoopEpisodes()
        return own.collect or self.collect_episodes, own.verify or self.verify_episodes


class ExperimentConfig(_Strict):
    experiment: ExperimentSection
    ray: RaySection = Field(default_factory=RaySection)
    models: list[ModelSpec] = Field(min_length=1)
    router: RouterSection
    scenarios: list[ScenarioSpec] = Field(min_length=1)
    log: LogSection = Field(default_factory=LogSection)
    loop: LoopSection | None = Field(default=None, description="Settings of `slmshift loop` (ignored by `run`).")

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)


ExperimentConfig.model_rebuild(force=True)


# Engines cheap enough to build in every ingress replica (no weights): an endpoint's client, a declared teacher.
INLINE_BACKENDS = ("openai", "simulated", "workload")


class GatewaySection(_Strict):
    """`slmshift gateway`'s own settings (all optional)."""

    host: str = Field(default="127.0.0.1", description="Bind address; anything but loopback needs API keys "
                      "(SLMSHIFT_GATEWAY_API_KEYS).")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    replicas: int = Field(default=1, ge=1, description="Ingress replicas.")
    max_ongoing_requests: int = Field(default=256, ge=1, description="Concurrent requests per ingress replica.")
    detached_shadows: int = Field(default=32, ge=0, description="Shadows (router `shadow`) that may still run after "
                                  "the client got its answer, per policy and ingress replica: the gateway answers "
                                  "first and logs the shadow when it is done. Past this a call waits for its own "
                                  "shadow; 0 always waits. Stopping the gateway waits for the rest.")
    workloads: dict[str, str] = Field(default_factory=dict, description="Workload id -> the name of a router.policies "
                                      "arm: a call of that workload (X-Workload-Id) that names any `router:` policy is "
                                      "routed by this arm instead, e.g. the policy `slmshift tune --workload ID` "
                                      "wrote for it. A call naming a deployed model directly stays pinned to it.")
    inline: list[str] = Field(default_factory=list, description="Models (by name) each ingress replica serves "
                              "itself, in-process, instead of calling their own Serve deployment: one Serve request "
                              "less per call. Only engines that are clients or stand-ins, not model weights: "
                              f"backends {', '.join(INLINE_BACKENDS)}. Such a model gets no deployment of its own.")


class GatewayConfig(_Strict):
    """What `slmshift gateway` reads: an experiment YAML's models and router (its scenarios, if any, are ignored)."""

    experiment: ExperimentSection = Field(default_factory=lambda: ExperimentSection(name="gateway"))
    ray: RaySection = Field(default_factory=RaySection)
    models: list[ModelSpec] = Field(min_length=1)
    router: RouterSection
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    log: LogSection = Field(default_factory=lambda: LogSection(scrub=True))
    scenarios: list[ScenarioSpec] = Field(default_factory=list, description="Ignored by the gateway.")
    loop: LoopSection | None = Field(default=None, description="Ignored by the gateway.")


GatewayConfig.model_rebuild(force=True)


def _workload_checks(i: int, m: Any) -> list[tuple[str, str]]:
    """A workload-file teacher: its file must hold valid sessions now, not when its replica starts."""
    if not m.source:
        return [(f"models[{i}].source", "required for backend 'workload': give the workload file (JSON lines or YAML, "
                 "e.g. scenarios/workloads/agent-desk.jsonl)")]
    if m.tier != "llm":
        return [(f"models[{i}].tier", "backend 'workload' is a teacher: set tier: llm")]
    from slmshift.platform.errors import SlmshiftError
    from slmshift.platform.workload import read_workload

    try:
        read_workload(m.source)
    except SlmshiftError as e:
        return [(f"models[{i}].source", str(e))]
    return []


def _cross_checks(cfg: ExperimentConfig | GatewayConfig,
                  scenario_options: dict[str, type[BaseModel]] | None) -> list[tuple[str, str]]:
    """Checks that span sections; each problem is (field path, message)."""
    problems: list[tuple[str, str]] = []
    names = [m.name for m in cfg.models]
    for i, m in enumerate(cfg.models):
        if names.count(m.name) > 1 and names.index(m.name) != i:
            problems.append((f"models[{i}].name", f"duplicate model name {m.name!r}; names must be unique"))
        if m.backend in ("hf", "vllm", "openai") and not m.source:
            what = "the model name the endpoint serves" if m.backend == "openai" \
                else "a local model dir, a .gguf file, 'packaged:smollm2-135m' or a hub id"
            problems.append((f"models[{i}].source", f"required for backend {m.backend!r}: give {what}"))
        if m.backend == "workload":
            problems += _workload_checks(i, m)
        if m.backend == "openai" and m.openai is None:
            problems.append((f"models[{i}].openai", "required for backend 'openai': give at least base_url"))
        if m.backend == "vllm" and (why := m.vllm.problem()):
            problems.append((f"models[{i}].vllm.python", f"backend 'vllm' cannot start: {why}. {VLLM_FIX}"))
        problems += _adapter_checks(i, m, cfg.models)
    tiers = {m.name: m.tier for m in cfg.models}
    labels = [p.label for p in cfg.router.policies]
    for wid, label in (cfg.gateway.workloads.items() if isinstance(cfg, GatewayConfig) else ()):
        if label not in labels:
            problems.append((f"gateway.workloads.{wid}", f"no router.policies arm is named {label!r}; available: "
                             f"{', '.join(labels)}. Fix: name the arm (`name: {label}`) or map the workload to one "
                             "of those"))
    backends = {m.name: m.backend for m in cfg.models}
    for i, name in enumerate(cfg.gateway.inline if isinstance(cfg, GatewayConfig) else ()):
        if name not in backends:
            problems.append((f"gateway.inline[{i}]", f"no model is named {name!r}; models: {', '.join(names)}"))
        elif backends[name] not in INLINE_BACKENDS:
            problems.append((f"gateway.inline[{i}]", f"model {name!r} has backend {backends[name]!r}, which loads "
                             f"weights: it needs its own deployment. Fix: drop it from gateway.inline (only "
                             f"{', '.join(INLINE_BACKENDS)} run inline)"))
    for i, p in enumerate(cfg.router.policies):
        path = f"router.policies[{i}]"
        if labels.count(p.label) > 1 and labels.index(p.label) != i:
            problems.append((f"{path}.name", f"duplicate policy name {p.label!r}; give each arm a distinct `name`"))
        problems += p.check(path, cfg.models)
        needed = p.tiers()
        for tier in sorted(needed):
            chosen = p.llm_model if tier == "llm" else p.slm_model
            if chosen is not None and tiers.get(chosen) != tier:
                have = [n for n, t in tiers.items() if t == tier]
                problems.append((f"{path}.{tier}_model", f"{chosen!r} is not a model of tier {tier!r}; "
                                 f"models of that tier: {have or 'none'}"))
            elif chosen is None and tier not in tiers.values():
                problems.append((path, f"policy {p.label!r} needs a model of tier {tier!r} but `models:` has none"))
    slabels = [s.label for s in cfg.scenarios]
    for label in (cfg.loop.scenario_episodes if cfg.loop else {}):
        if label not in slabels:
            problems.append((f"loop.scenario_episodes.{label}", f"no scenario is called {label!r}; scenario names: "
                             f"{', '.join(slabels)}"))
    for i, s in enumerate(cfg.scenarios):
        if slabels.count(s.label) > 1 and slabels.index(s.label) != i:
            problems.append((f"scenarios[{i}].name", f"duplicate scenario name {s.label!r}; give each a distinct `name`"))
        if scenario_options is None:
            continue
        if s.kind not in scenario_options:
            problems.append((f"scenarios[{i}].kind", f"unknown scenario {s.kind!r}; available: "
                             f"{', '.join(sorted(scenario_options))}"))
            continue
        try:
            opts = scenario_options[s.kind].model_validate(s.options)
        except ValidationError as e:
            problems += [(f"scenarios[{i}].options.{_loc(err['loc'])}".rstrip("."), _message(err, scenario_options[s.kind]))
                         for err in e.errors()]
            continue
        # options that depend on the models and arms (e.g. tasks only a simulated teacher's solver knows)
        hook = getattr(opts, "check_models", None)
        if callable(hook):
            problems += [(f"scenarios[{i}].{f}", m) for f, m in hook(cfg.models, cfg.router.policies)]
    return problems


def _adapter_checks(i: int, m: ModelSpec, models: list[ModelSpec]) -> list[tuple[str, str]]:
    """A model's `adapters` / `registry`: readable, peft adapter dirs, trained on this model's source. A registry
    whose clusters S4 gave different bases is served by one model per base, each with the same `registry:`; an
    entry's base that none of them has is reported on the first."""
    problems: list[tuple[str, str]] = []
    if (m.adapters or m.registry) and m.backend not in ("hf", "vllm"):
        key = "registry" if m.registry else "adapters"
        return [(f"models[{i}].{key}", f"LoRA adapters are served by backends 'hf' and 'vllm' only, "
                 f"not {m.backend!r}")]
    dirs = {name: (f"models[{i}].adapters.{name}", d) for name, d in m.adapters.items()}
    if m.registry:
        try:
            doc = AdapterRegistryFile.read(m.registry)
        except SlmshiftError as e:
            return problems + [(f"models[{i}].registry", str(e))]
        promoted = [e for e in doc.entries if e.promoted]
        siblings = [x for x in models if x.registry and Path(x.registry) == Path(m.registry)]
        serves_some = any(same_source(e.base_model, m.source) for e in promoted)
        for e in promoted:
            if any(same_source(e.base_model, x.source) for x in siblings):
                continue
            if serves_some or len(siblings) > 1:  # several bases: the one missing, reported once
                if siblings[0] is m:
                    problems.append((f"models[{i}].registry", f"adapter {e.label!r} of {m.registry} was trained on "
                                     f"{e.base_model!r}, which no model with this registry serves; Fix: add a "
                                     f"`models:` entry with source: {e.base_model} and registry: {m.registry}"))
            else:
                problems.append((f"models[{i}].registry", f"adapter {e.label!r} was trained on {e.base_model!r} but "
                                 f"this model's source is {m.source!r}; set source: {e.base_model}"))
        for name, d in doc.promoted_dirs(m.registry, base=m.source).items():
            if name in dirs:
                problems.append((f"models[{i}].adapters.{name}", f"name {name!r} is also a promoted adapter of "
                                 f"{m.registry}; rename one"))
            dirs[name] = (f"models[{i}].registry", d)
    for name, (where, d) in dirs.items():
        if name == "__base__":
            problems.append((where, "'__base__' is reserved for the base model; rename the adapter"))
        elif not (Path(d) / "adapter_config.json").is_file():
            problems.append((where, f"adapter {name!r}: {d} is not a peft adapter dir (no adapter_config.json). "
                             "Fix: point at a dir written by save_pretrained (RUN_DIR/convert/adapters/<label>)"))
    return problems


def _loc(loc: tuple) -> str:
    out = ""
    kinds = policy_kinds()
    for i, part in enumerate(loc):
        if i >= 2 and loc[i - 2] == "policies" and isinstance(loc[i - 1], int) and part in kinds:
            continue  # the discriminated union's tag: the kind is already in the YAML, not a key of it
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc`, to list allowed keys for unknown-key errors."""
    cls: Any = root
    if loc[:2] == ("router", "policies") and len(loc) > 3 and loc[3] in policy_kinds():
        cls, loc = policy_kinds()[loc[3]], loc[4:]  # inside one arm of the discriminated union
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        for arg in (getattr(ann, "__args__", None) or (ann,)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                cls = arg
                break
            inner = getattr(arg, "__args__", ())
            if inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
                cls = inner[0]
                break
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


# Keys that were renamed, by (section model, old key): an old YAML gets the fix instead of "unknown key".
_RENAMED = {
    ("LoopConvert", "min_promotion_calls"): (
        "renamed to min_promotion_tasks: promotion now counts distinct held-out tasks, not calls (a task's calls are "
        "correlated, so the bootstrap resamples tasks). Fix: replace `min_promotion_calls: N` with "
        "`min_promotion_tasks: M`, M distinct tasks (default 10)"),
}


def _message(err: dict, root: type[BaseModel]) -> str:
    if err["type"] == "extra_forbidden":
        owner = _model_at(root, err["loc"][:-1])
        if owner is not None and (owner.__name__, err["loc"][-1]) in _RENAMED:
            return _RENAMED[owner.__name__, err["loc"][-1]]
        allowed = ", ".join(owner.model_fields) if owner else "see the configuration reference in README.md"
        return f"unknown key; allowed keys here: {allowed}"
    msg = err["msg"]
    if err["type"] == "missing":
        field = _model_at(root, err["loc"][:-1])
        desc = field.model_fields[err["loc"][-1]].description if field and err["loc"][-1] in field.model_fields else None
        return f"required field is missing{': ' + desc if desc else ''}"
    if "input" in err and err["type"] not in ("model_type", "dict_type"):
        return f"{msg} (got {err['input']!r})"
    return msg


def _line_of(node: yaml.Node | None, path: str) -> int | None:
    """1-based line of a dotted/indexed path in a composed YAML tree, or of its nearest existing parent."""
    line = None  # a path missing at the top level has no useful line
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def load_config(path: str | Path, scenario_options: dict[str, type[BaseModel]] | None = None,
                schema: type[BaseModel] | None = None) -> Any:
    """Read and validate an experiment YAML. Raises ConfigError listing every problem at once.

    Args:
        path: the YAML file.
        scenario_options: scenario kind -> its options model, to validate `scenarios[*].options` too.
    """
    p = Path(path)
    if p.is_dir():
        inside = sorted(q.name for q in p.glob("*.y*ml"))[:5]
        raise ConfigError(str(path), ["is a directory, not an experiment YAML file"],
                          f"Fix: pass one YAML file{' in it, e.g. ' + str(p / inside[0]) if inside else ''}.")
    if not p.is_file():
        raise ConfigError(str(path), ["file not found"], "Fix: pass the path of an experiment YAML, e.g. scenarios/quickstart.yaml.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                                      "is it a binary file, or saved in another encoding?"],
                          "Fix: pass the experiment YAML, saved as UTF-8.") from None
    except OSError as e:
        raise ConfigError(str(path), [f"cannot be read: {e.strerror or e}"], "Fix: check the path and its permissions.") from None
    try:
        data = yaml.safe_load(text)
        tree = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(path), [f"{where}not valid YAML: {getattr(e, 'problem', None) or e}"],
                          "Fix: check indentation and quoting at that line.") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["the file must be a mapping with keys experiment, models, router, scenarios"])

    def at(field: str) -> str:
        line = _line_of(tree, field)
        return f"{field} (line {line})" if line else field

    try:
        cfg = (schema or ExperimentConfig).model_validate(data)
    except ValidationError as e:
        problems = [f"{at(_loc(err['loc']) or '<top>')}: {_message(err, schema or ExperimentConfig)}" for err in e.errors()]
        raise ConfigError(str(path), problems, "See the configuration reference in README.md.") from None
    problems = [f"{at(f)}: {m}" for f, m in _cross_checks(cfg, scenario_options)]
    if problems:
        raise ConfigError(str(path), problems, "See the configuration reference in README.md.")
    return cfg
