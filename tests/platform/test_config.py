"""Experiment YAML validation: good files load, bad ones fail with errors naming file, field, line and fix."""

from pathlib import Path

import pytest

import slmshift.scenarios  # noqa: F401  registers the scenarios whose options are validated
from slmshift.platform.config import load_config
from slmshift.platform.errors import ConfigError
from slmshift.platform.scenario import scenario_options

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
experiment: {name: t}
models:
  - {name: small, tier: slm, backend: hf, source: /tmp/x}
  - {name: big, tier: llm, backend: simulated}
router:
  policies: [{kind: llm}, {kind: slm}, {kind: call_kind, map: {intent: slm}}]
scenarios:
  - {kind: operator, episodes: 3}
"""


def load(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return load_config(p, scenario_options())


def problems(tmp_path, text) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert str(tmp_path / "exp.yaml") in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name", ["quickstart.yaml", "operator.yaml", "operator-multiturn.yaml", "metagpt.yaml",
                                  "cradle.yaml", "paper-table.yaml", "paper-table-small.yaml"])
def test_shipped_scenarios_load(name):
    cfg = load_config(ROOT / "scenarios" / name, scenario_options())
    assert {m.tier for m in cfg.models} == {"llm", "slm"}


@pytest.mark.parametrize("name", ["quickstart.yaml", "paper-table.yaml"])
def test_any_experiment_yaml_loads_as_a_gateway_config(name):
    """`slmshift gateway` reads an experiment YAML's models and router; the checks that span sections must not
    assume an experiment's own sections (a loop's, say)."""
    from slmshift.platform.config import GatewayConfig

    cfg = load_config(ROOT / "scenarios" / name, schema=GatewayConfig)
    assert {m.tier for m in cfg.models} == {"llm", "slm"}


def test_good_config_defaults(tmp_path):
    cfg = load(tmp_path, GOOD)
    assert cfg.ray.address is None and cfg.experiment.storage == "runs"
    assert cfg.model("small").batching.max_batch_size == 32
    assert [p.label for p in cfg.router.policies] == ["llm", "slm", "call_kind"]


def test_unknown_key_lists_allowed_keys_and_line(tmp_path):
    msg = problems(tmp_path, GOOD.replace("backend: simulated}", "backend: simulated, pricee: 1}"))
    assert "models[1].pricee (line 4): unknown key; allowed keys here: name, tier, backend" in msg


def test_a_renamed_key_says_what_it_became(tmp_path):
    """An old loop YAML with min_promotion_calls gets the new key and why, not a bare 'unknown key'."""
    msg = problems(tmp_path, GOOD + "loop:\n  convert: {min_train_rows: 8, min_promotion_calls: 30}\n")
    assert "loop.convert.min_promotion_calls (line 10): renamed to min_promotion_tasks" in msg
    assert "Fix: replace `min_promotion_calls: N` with `min_promotion_tasks: M`" in msg and "unknown key" not in msg
    assert load(tmp_path, GOOD + "loop:\n  convert: {min_promotion_tasks: 12}\n").loop.convert.min_promotion_tasks == 12


def test_unknown_backend_lists_allowed(tmp_path):
    msg = problems(tmp_path, GOOD.replace("backend: hf", "backend: llamacpp"))
    assert "models[0].backend (line 3): Input should be 'hf', 'vllm', 'simulated', 'openai' or 'workload' (got 'llamacpp')" in msg


def test_malformed_yaml_names_line(tmp_path):
    msg = problems(tmp_path, "experiment: {name: t\nmodels: [\n")
    assert "not valid YAML" in msg and "line" in msg


def test_missing_section_and_all_problems_at_once(tmp_path):
    msg = problems(tmp_path, "experiment: {name: t}\nmodels: []\n")
    assert "(3 problems)" in msg
    assert "router: required field is missing" in msg and "scenarios: required field is missing" in msg
    assert "models (line 2): List should have at least 1 item" in msg


def test_cross_section_checks(tmp_path):
    text = GOOD.replace("source: /tmp/x", "source: null").replace("{kind: slm}", "{kind: slm, slm_model: big}")
    msg = problems(tmp_path, text)
    assert "models[0].source (line 3): required for backend 'hf'" in msg
    assert "router.policies[1].slm_model (line 6): 'big' is not a model of tier 'slm'" in msg


def test_policy_needing_missing_tier(tmp_path):
    msg = problems(tmp_path, GOOD.replace("{name: small, tier: slm, backend: hf, source: /tmp/x}",
                                          "{name: small, tier: llm, backend: hf, source: /tmp/x}"))
    assert "policy 'slm' needs a model of tier 'slm' but `models:` has none" in msg


def test_scenario_options_are_validated(tmp_path):
    msg = problems(tmp_path, GOOD.replace("{kind: operator, episodes: 3}",
                                          "{kind: operator, options: {categories: [simple, nope], colour: red}}"))
    assert "scenarios[0].options.categories (line 8): Value error, unknown BFCL categories ['nope']" in msg
    assert "scenarios[0].options.colour (line 8): unknown key; allowed keys here: categories" in msg


def test_unknown_scenario_kind(tmp_path):
    msg = problems(tmp_path, GOOD.replace("kind: operator", "kind: nosuch"))
    assert "scenarios[0].kind (line 8): unknown scenario 'nosuch'; available: " in msg
    assert "operator" in msg.split("available: ")[1]  # lists the registered kinds (more arrive with each scenario)


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/nonexistent/exp.yaml")


# --- serving adapters: `models[].adapters` / `models[].registry` and the `adapters` policy ------------------

def convert_dir(tmp_path, promoted=("planner-intent",), base="/tmp/x", clusters=True):
    """A minimal convert dir: registry.json, adapters/<label>/adapter_config.json, clusters/ files."""
    import json

    d = tmp_path / "convert"
    entries = []
    for i, label in enumerate(["planner-intent", "executor-call"]):
        (d / "adapters" / label).mkdir(parents=True)
        (d / "adapters" / label / "adapter_config.json").write_text("{}")
        entries.append({"cluster": i, "label": label, "base_model": base, "adapter_dir": f"adapters/{label}",
                        "promoted": label in promoted})
    (d / "clusters").mkdir()
    if clusters:
        for n in ("centroids.npy", "index.faiss", "clusters.json"):
            (d / "clusters" / n).write_text("x")
    (d / "registry.json").write_text(json.dumps({"version": 1, "clusters_dir": "clusters", "entries": entries}))
    return d


def with_adapters(reg: str, model_extra: str = "", policy_extra: str = "") -> str:
    return GOOD.replace("source: /tmp/x}", f"source: /tmp/x, registry: {reg}{model_extra}}}").replace(
        "{kind: call_kind, map: {intent: slm}}", f"{{kind: adapters, registry: {reg}{policy_extra}}}")


def test_adapter_serving_config_loads_with_absolute_paths(tmp_path, monkeypatch):
    d = convert_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = load(tmp_path, with_adapters("convert/registry.json", policy_extra=", default: slm, min_similarity: 0.3"))
    assert cfg.model("small").registry == str(d / "registry.json")  # relative to the launch dir, made absolute
    p = cfg.router.policies[2]
    assert (p.kind, p.registry, p.default, p.min_similarity) == ("adapters", str(d / "registry.json"), "slm", 0.3)


def test_missing_registry_is_clear(tmp_path):
    msg = problems(tmp_path, with_adapters(str(tmp_path / "nope.json")))
    assert f"models[0].registry (line 3): adapter registry {tmp_path / 'nope.json'}: file not found" in msg
    assert "router.policies[2].registry" in msg and "Fix: run `slmshift convert RUN_DIR`" in msg
    msg = problems(tmp_path, GOOD.replace("{kind: call_kind, map: {intent: slm}}", "{kind: adapters}"))
    assert "router.policies[2].registry (line 6): required field is missing: The registry.json" in msg


def test_promoted_adapter_not_served_by_the_slm(tmp_path):
    d = convert_dir(tmp_path)
    msg = problems(tmp_path, GOOD.replace("{kind: call_kind, map: {intent: slm}}",
                                          f"{{kind: adapters, registry: {d / 'registry.json'}}}"))
    assert "promoted adapter 'planner-intent' is not served by model 'small'" in msg
    assert f"add `registry: {d / 'registry.json'}` to that model" in msg


def test_unknown_or_broken_adapter_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = problems(tmp_path, GOOD.replace("source: /tmp/x}", f"source: /tmp/x, adapters: {{sql: {tmp_path / 'empty'}, "
                                          f"__base__: {tmp_path / 'empty'}}}}}"))
    assert "models[0].adapters.sql (line 3): adapter 'sql':" in msg and "no adapter_config.json" in msg
    assert "'__base__' is reserved" in msg
    msg = problems(tmp_path, GOOD.replace("backend: simulated}", f"backend: simulated, adapters: {{a: {tmp_path}}}}}"))
    assert "models[1].adapters (line 4): LoRA adapters are served by backends 'hf' and 'vllm' only, not 'simulated'" in msg


def test_registry_trained_on_another_base_and_missing_index(tmp_path):
    d = convert_dir(tmp_path, base="packaged:smollm2-135m", clusters=False)
    msg = problems(tmp_path, with_adapters(str(d / "registry.json")))
    assert "adapter 'planner-intent' was trained on 'packaged:smollm2-135m' but this model's source is '/tmp/x'" in msg
    assert "lacks centroids.npy, index.faiss, clusters.json" in msg


def test_a_registry_of_two_bases_needs_a_model_per_base(tmp_path):
    """S4 chose a base per cluster: each base needs an slm model with the registry; the missing one is named."""
    import json

    d = convert_dir(tmp_path, promoted=("planner-intent", "executor-call"))
    doc = json.loads((d / "registry.json").read_text())
    doc["entries"][1]["base_model"] = "packaged:gemma3-270m"
    (d / "registry.json").write_text(json.dumps(doc))
    reg = d / "registry.json"
    msg = problems(tmp_path, with_adapters(str(reg)))
    assert (f"models[0].registry (line 3): adapter 'executor-call' of {reg} was trained on 'packaged:gemma3-270m', "
            "which no model with this registry serves; Fix: add a `models:` entry with source: packaged:gemma3-270m "
            f"and registry: {reg}") in msg
    assert ("router.policies[2].registry (line 6): promoted adapter 'executor-call' was trained on "
            "'packaged:gemma3-270m', which no slm model in `models:` serves") in msg
    both = with_adapters(str(reg)).replace(
        "  - {name: big,", f"  - {{name: gemma, tier: slm, backend: hf, source: packaged:gemma3-270m, registry: {reg}}}\n"
        "  - {name: big,")
    cfg = load(tmp_path, both)
    assert [m.name for m in cfg.models] == ["small", "gemma", "big"] and cfg.router.policies[2].registry == str(reg)


def test_adapter_policy_keys_rejected_elsewhere(tmp_path):
    msg = problems(tmp_path, GOOD.replace("{kind: slm}", "{kind: slm, tau: 0.5, min_similarity: 0.5}"))
    # each kind has its own options model: another kind's keys are unknown there, and the error lists the allowed ones
    assert "router.policies[1].tau (line 6): unknown key; allowed keys here: kind, name, default" in msg
    assert "router.policies[1].min_similarity (line 6): unknown key" in msg


def test_cradle_tasks_beyond_the_solver_are_refused_for_a_simulated_arm(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("experiment: {name: c}\nmodels:\n  - {name: t, tier: llm, backend: simulated}\n"
                   "router: {policies: [{kind: llm, name: teacher-arm}]}\n"
                   "scenarios:\n  - kind: cradle\n    options: {tasks: [book-flight]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(yml, scenario_options())
    assert "scenarios[0].options.tasks" in str(e.value) and "teacher-arm" in str(e.value)
    assert "book-flight" in str(e.value)
