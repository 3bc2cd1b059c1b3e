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


@pytest.mark.parametrize("name", ["quickstart.yaml", "operator.yaml"])
def test_shipped_scenarios_load(name):
    cfg = load_config(ROOT / "scenarios" / name, scenario_options())
    assert {m.tier for m in cfg.models} == {"llm", "slm"}


def test_good_config_defaults(tmp_path):
    cfg = load(tmp_path, GOOD)
    assert cfg.ray.address is None and cfg.experiment.storage == "runs"
    assert cfg.model("small").batching.max_batch_size == 32
    assert [p.label for p in cfg.router.policies] == ["llm", "slm", "call_kind"]


def test_unknown_key_lists_allowed_keys_and_line(tmp_path):
    msg = problems(tmp_path, GOOD.replace("backend: simulated}", "backend: simulated, pricee: 1}"))
    assert "models[1].pricee (line 4): unknown key; allowed keys here: name, tier, backend" in msg


def test_unknown_backend_lists_allowed(tmp_path):
    msg = problems(tmp_path, GOOD.replace("backend: hf", "backend: llamacpp"))
    assert "models[0].backend (line 3): Input should be 'hf', 'simulated' or 'openai' (got 'llamacpp')" in msg


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
    msg = problems(tmp_path, GOOD.replace("kind: operator", "kind: metagpt"))
    assert "scenarios[0].kind (line 8): unknown scenario 'metagpt'; available: operator" in msg


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/nonexistent/exp.yaml")
