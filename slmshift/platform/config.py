"""Experiment YAML schema: one strict pydantic model per section, and a loader whose errors name the file,
the field path, its line, and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slmshift.platform.errors import ConfigError, SlmshiftError
from slmshift.platform.types import AdapterRegistryFile, ModelSpec, Tier, absolute_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentSection(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Names the run directory.")
    description: str = ""
    seed: int = Field(default=0, description="Seeds task sampling, sampling temperature and simulated teachers.")
    storage: str = Field(
        default="runs", description="Where run directories go: a local path, or s3:// / gs:// reachable by every node."
    )


class RaySection(_Strict):
    address: str | None = Field(
        default=None, description="Ray cluster to join ('auto', 'ray://host:10001'); None starts an embedded local one."
    )
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the embedded cluster (default: all).")
    dashboard: bool = Field(default=True, description="Start the dashboard on 127.0.0.1 when its deps are present.")
    dashboard_port: int = Field(default=8265, ge=1, le=65535)
    metrics_export_port: int | None = Field(
        default=None, ge=1, le=65535, description="Fixed Prometheus port for this node's metrics (default: random)."
    )
    object_store_mb: int | None = Field(default=None, ge=75, description="Object store size of the embedded cluster.")


class PolicySpec(_Strict):
    """One router policy arm: every scenario runs once under each policy, so reports compare them."""

    kind: Literal["llm", "slm", "call_kind", "adapters"] = Field(
        description="llm: always the LLM; slm: always the SLM; call_kind: a fixed map call kind -> tier; "
        "adapters: each call's task cluster -> the SLM with that cluster's promoted LoRA adapter.")
    name: str | None = Field(default=None, description="Label in reports (default: the kind).")
    map: dict[str, Tier] = Field(default_factory=dict, description="call_kind only: call kind -> 'llm' | 'slm'.")
    default: Tier = Field(default="llm", description="call_kind: tier for kinds missing from `map`; adapters: tier "
                          "for calls whose cluster has no promoted adapter (or is too far from every cluster).")
    llm_model: str | None = Field(default=None, description="Which `models:` entry serves the llm tier (default: first).")
    slm_model: str | None = Field(default=None, description="Which `models:` entry serves the slm tier (default: first).")
    registry: str | None = Field(default=None, description="adapters only: the registry.json `slmshift convert` "
                                 "wrote (RUN_DIR/convert/registry.json); its clusters and promoted adapters.")
    min_similarity: float | None = Field(default=None, ge=-1, le=1, description="adapters only: a call whose cosine "
                                         "similarity to its nearest cluster centroid is below this goes to `default`.")

    @field_validator("registry")
    @classmethod
    def _absolute_registry(cls, v: str | None) -> str | None:
        return absolute_path(v) if v else v

    @property
    def label(self) -> str:
        return self.name or self.kind


class RouterSection(_Strict):
    policies: list[PolicySpec] = Field(min_length=1, description="Policy arms to compare.")


class ScenarioSpec(_Strict):
    kind: str = Field(description="Scenario family, e.g. 'operator'.")
    name: str | None = Field(default=None, description="Label in reports (default: the kind).")
    episodes: int = Field(default=10, ge=1, description="Episodes per policy arm.")
    teams: int = Field(default=2, ge=1, description="Team actors (Ray actors) sharing the episodes.")
    concurrency: int = Field(default=8, ge=1, description="Episodes each team actor runs at once.")
    seed: int | None = Field(default=None, description="Task sampling seed (default: experiment.seed).")
    options: dict[str, Any] = Field(default_factory=dict, description="Scenario-specific options (see its docs).")

    @property
    def label(self) -> str:
        return self.name or self.kind


class ExperimentConfig(_Strict):
    experiment: ExperimentSection
    ray: RaySection = Field(default_factory=RaySection)
    models: list[ModelSpec] = Field(min_length=1)
    router: RouterSection
    scenarios: list[ScenarioSpec] = Field(min_length=1)

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)


def _cross_checks(cfg: ExperimentConfig, scenario_options: dict[str, type[BaseModel]] | None) -> list[tuple[str, str]]:
    """Checks that span sections; each problem is (field path, message)."""
    problems: list[tuple[str, str]] = []
    names = [m.name for m in cfg.models]
    for i, m in enumerate(cfg.models):
        if names.count(m.name) > 1 and names.index(m.name) != i:
            problems.append((f"models[{i}].name", f"duplicate model name {m.name!r}; names must be unique"))
        if m.backend in ("hf", "openai") and not m.source:
            what = "a local model dir, a .gguf file, 'packaged:smollm2-135m' or a hub id" if m.backend == "hf" \
                else "the model name the endpoint serves"
            problems.append((f"models[{i}].source", f"required for backend {m.backend!r}: give {what}"))
        if m.backend == "openai" and m.openai is None:
            problems.append((f"models[{i}].openai", "required for backend 'openai': give at least base_url"))
        problems += _adapter_checks(i, m)
    tiers = {m.name: m.tier for m in cfg.models}
    labels = [p.label for p in cfg.router.policies]
    for i, p in enumerate(cfg.router.policies):
        path = f"router.policies[{i}]"
        if labels.count(p.label) > 1 and labels.index(p.label) != i:
            problems.append((f"{path}.name", f"duplicate policy name {p.label!r}; give each arm a distinct `name`"))
        if p.kind != "call_kind" and p.map:
            problems.append((f"{path}.map", "only used by kind 'call_kind'"))
        for key in ("registry", "min_similarity"):
            if p.kind != "adapters" and getattr(p, key) is not None:
                problems.append((f"{path}.{key}", "only used by kind 'adapters'"))
        if p.kind == "adapters":
            problems += _adapter_policy_checks(path, p, cfg.models)
        needed = {"llm": {"llm"}, "slm": {"slm"}, "call_kind": set(p.map.values()) | {p.default},
                  "adapters": {"slm", p.default}}[p.kind]
        for tier in sorted(needed):
            chosen = p.llm_model if tier == "llm" else p.slm_model
            if chosen is not None and tiers.get(chosen) != tier:
                have = [n for n, t in tiers.items() if t == tier]
                problems.append((f"{path}.{tier}_model", f"{chosen!r} is not a model of tier {tier!r}; "
                                 f"models of that tier: {have or 'none'}"))
            elif chosen is None and tier not in tiers.values():
                problems.append((path, f"policy {p.label!r} needs a model of tier {tier!r} but `models:` has none"))
    slabels = [s.label for s in cfg.scenarios]
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
            scenario_options[s.kind].model_validate(s.options)
        except ValidationError as e:
            problems += [(f"scenarios[{i}].options.{_loc(err['loc'])}".rstrip("."), _message(err, scenario_options[s.kind]))
                         for err in e.errors()]
    return problems


def _same_source(a: str, b: str | None) -> bool:
    if b is None:
        return False
    return a == b or ("://" not in a and Path(a).expanduser().resolve() == Path(b).expanduser().resolve())


def _adapter_checks(i: int, m: ModelSpec) -> list[tuple[str, str]]:
    """A model's `adapters` / `registry`: readable, peft adapter dirs, trained on this model's source."""
    problems: list[tuple[str, str]] = []
    if (m.adapters or m.registry) and m.backend != "hf":
        key = "registry" if m.registry else "adapters"
        return [(f"models[{i}].{key}", f"LoRA adapters are served by backend 'hf' only, not {m.backend!r}")]
    dirs = {name: (f"models[{i}].adapters.{name}", d) for name, d in m.adapters.items()}
    if m.registry:
        try:
            doc = AdapterRegistryFile.read(m.registry)
        except SlmshiftError as e:
            return problems + [(f"models[{i}].registry", str(e))]
        for e in doc.entries:
            if e.promoted and not _same_source(e.base_model, m.source):
                problems.append((f"models[{i}].registry", f"adapter {e.label!r} was trained on {e.base_model!r} but "
                                 f"this model's source is {m.source!r}; set source: {e.base_model}"))
        for name, d in doc.promoted_dirs(m.registry).items():
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


def _adapter_policy_checks(path: str, p: PolicySpec, models: list[ModelSpec]) -> list[tuple[str, str]]:
    """An `adapters` policy: its registry and cluster index exist, and its SLM serves every promoted adapter."""
    if not p.registry:
        return [(f"{path}.registry", "required for kind 'adapters': give RUN_DIR/convert/registry.json "
                 "(written by `slmshift convert`)")]
    try:
        doc = AdapterRegistryFile.read(p.registry)
    except SlmshiftError as e:
        return [(f"{path}.registry", str(e))]
    problems: list[tuple[str, str]] = []
    clusters = (Path(p.registry).parent / doc.clusters_dir).resolve()
    missing = [n for n in ("centroids.npy", "index.faiss", "clusters.json") if not (clusters / n).is_file()]
    if missing:
        problems.append((f"{path}.registry", f"its cluster index {clusters} lacks {', '.join(missing)}; "
                         "Fix: run `slmshift convert` again"))
    slm = next((m for m in models if m.name == p.slm_model), None) if p.slm_model else \
        next((m for m in models if m.tier == "slm"), None)
    if slm is None:
        return problems  # the tier check reports it
    served = set(slm.adapters)
    if slm.registry:
        try:
            served |= set(AdapterRegistryFile.read(slm.registry).promoted_dirs(slm.registry))
        except SlmshiftError:
            pass  # reported on the model
    for e in doc.entries:
        if e.promoted and e.label not in served:
            problems.append((f"{path}.registry", f"promoted adapter {e.label!r} is not served by model {slm.name!r}; "
                             f"Fix: add `registry: {p.registry}` to that model (or name it in slm_model)"))
    return problems


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc`, to list allowed keys for unknown-key errors."""
    cls: Any = root
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


def _message(err: dict, root: type[BaseModel]) -> str:
    if err["type"] == "extra_forbidden":
        owner = _model_at(root, err["loc"][:-1])
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


def load_config(path: str | Path, scenario_options: dict[str, type[BaseModel]] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML. Raises ConfigError listing every problem at once.

    Args:
        path: the YAML file.
        scenario_options: scenario kind -> its options model, to validate `scenarios[*].options` too.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), ["file not found"], "Fix: pass the path of an experiment YAML, e.g. scenarios/quickstart.yaml.")
    text = p.read_text()
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
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        problems = [f"{at(_loc(err['loc']) or '<top>')}: {_message(err, ExperimentConfig)}" for err in e.errors()]
        raise ConfigError(str(path), problems, "See the configuration reference in README.md.") from None
    problems = [f"{at(f)}: {m}" for f, m in _cross_checks(cfg, scenario_options)]
    if problems:
        raise ConfigError(str(path), problems, "See the configuration reference in README.md.")
    return cfg
