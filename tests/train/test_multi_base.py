"""S4 chooses a base per cluster: convert's printed YAML and the loop's verify config deploy one SLM per base a
promoted adapter was trained on, and the experiment they make passes config validation."""

from __future__ import annotations

import json

import yaml

import slmshift.scenarios  # noqa: F401  (fills the scenario registry)
from slmshift.platform.config import load_config
from slmshift.platform.scenario import scenario_options
from slmshift.train.convert_report import serve_bases, serve_snippet

BASES = {"planner-intent": "packaged:smollm2-135m", "executor-call": "packaged:gemma3-270m",
         "qa-tests": "packaged:smollm2-135m"}


def registry(tmp_path):
    d = tmp_path / "convert"
    entries = []
    for i, (label, base) in enumerate(BASES.items()):
        (d / "adapters" / label).mkdir(parents=True)
        (d / "adapters" / label / "adapter_config.json").write_text("{}")
        entries.append({"cluster": i, "label": label, "base_model": base, "adapter_dir": f"adapters/{label}",
                        "promoted": True})
    (d / "clusters").mkdir()
    for n in ("centroids.npy", "index.faiss", "clusters.json"):
        (d / "clusters" / n).write_text("x")
    (d / "registry.json").write_text(json.dumps({"version": 1, "clusters_dir": "clusters", "entries": entries}))
    return d / "registry.json"


def experiment(tmp_path, models: list[dict], router: dict):
    cfg = {"experiment": {"name": "tuned", "storage": str(tmp_path)},
           "models": models + [{"name": "teacher", "tier": "llm", "backend": "simulated"}],
           "router": router, "scenarios": [{"kind": "operator", "episodes": 2}]}
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, scenario_options())


def test_serve_snippet_deploys_one_model_per_chosen_base(tmp_path):
    reg = registry(tmp_path)
    clusters = [{"id": i, "promoted": True, "chosen_source": b} for i, b in enumerate(BASES.values())]
    assert serve_bases(clusters) == ["packaged:smollm2-135m", "packaged:gemma3-270m"]
    assert serve_bases([{"id": 0, "promoted": False, "chosen_source": "x"}]) == ["x"]
    snippet = yaml.safe_load(serve_snippet(str(reg), serve_bases(clusters)))
    assert [(m["name"], m["source"]) for m in snippet["models"]] == [
        ("slm-tuned", "packaged:smollm2-135m"), ("slm-tuned-gemma3-270m", "packaged:gemma3-270m")]
    cfg = experiment(tmp_path, snippet["models"], snippet["router"])
    assert cfg.router.policies[0].slm_model == "slm-tuned"
    # one model only (the snippet before S4 chose per cluster): the missing base is named, with the fix
    one = yaml.safe_load(serve_snippet(str(reg), "packaged:smollm2-135m"))
    import pytest

    from slmshift.platform.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        experiment(tmp_path, one["models"], one["router"])
    msg = str(err.value)
    assert "adapter 'executor-call'" in msg and "trained on 'packaged:gemma3-270m'" in msg
    assert "Fix: add a `models:` entry with source: packaged:gemma3-270m" in msg


def test_loop_verify_adds_a_deployment_for_each_other_base(tmp_path):
    from slmshift.loop import _models_with_adapters

    reg = registry(tmp_path)
    cfg = experiment(tmp_path, [{"name": "smollm2-135m", "tier": "slm", "backend": "hf",
                                 "source": "packaged:smollm2-135m", "hf": {"threads": 2, "max_input_tokens": 8192}}],
                     {"policies": [{"kind": "llm"}]})
    models = _models_with_adapters(cfg, str(reg))
    assert [(m.name, m.source, m.registry) for m in models] == [
        ("smollm2-135m", "packaged:smollm2-135m", str(reg)), ("teacher", None, None),
        ("gemma3-270m", "packaged:gemma3-270m", str(reg))]
    gemma = models[2]
    assert gemma.tier == "slm" and gemma.hf.threads == 2 and gemma.price.output_per_m == 0.02
    assert gemma.params == 268.1e6
    # a registry of one base adds nothing
    doc = json.loads(reg.read_text())
    doc["entries"] = [e for e in doc["entries"] if e["base_model"] == "packaged:smollm2-135m"]
    reg.write_text(json.dumps(doc))
    assert [m.name for m in _models_with_adapters(cfg, str(reg))] == ["smollm2-135m", "teacher"]
