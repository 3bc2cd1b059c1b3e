"""The whole conversion (S2 -> S5) on the synthetic operator log with the tiny model, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from slmshift.cli import app
from slmshift.train.convert import ConvertOptions, promotion
from slmshift.train.evaluate import EvalResult


@pytest.fixture(scope="module")
def converted(ray_cluster, synthetic_log, tiny_model_dir):
    res = CliRunner().invoke(app, ["convert", synthetic_log.run_dir, "--base", tiny_model_dir, "--steps", "6",
                                   "--batch-size", "4", "--min-train-rows", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    return Path(synthetic_log.run_dir) / "convert", res.output


def test_layout_is_written(converted):
    out, _ = converted
    for p in ("curated.parquet", "clusters/centroids.npy", "clusters/index.faiss", "clusters/clusters.json",
              "registry.json", "report.md", "report.json"):
        assert (out / p).is_file(), p


def test_curated_parquet_follows_the_contract(converted, synthetic_log):
    out, _ = converted
    df = pd.read_parquet(out / "curated.parquet")
    assert {"record_id", "episode_id", "task_id", "scenario", "role", "call_kind", "category", "expect", "messages",
            "target", "split", "cluster"} <= set(df.columns)
    assert len(df) == synthetic_log.expected["curated"]
    assert set(df[df.split == "train"].episode_id).isdisjoint(df[df.split == "val"].episode_id)
    # the two call kinds of the operator scenario are the two recurring tasks
    assert df.groupby("cluster")["call_kind"].nunique().max() == 1 and df["cluster"].nunique() == 2


def test_report_has_every_cluster_measured_before_and_after(converted):
    out, output = converted
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"]["curated"] == 25 and rep["scrub_counts"]["email"] >= 1
    assert "scenario" in rep["grading"]  # BFCL's checker graded the held-out calls, not exact match
    labels = sorted(c["label"] for c in rep["clusters"])
    assert labels == ["operator-function-call", "planner-intent"]
    for c in rep["clusters"]:
        assert c["chosen"] and c["n_val"] >= 1 and c["n_train"] >= 2
        assert c["before"]["n"] == c["after"]["n"] == c["n_val"]
        assert c["train"]["steps"] == 6 and c["train"]["val_loss_adapter"] is not None
        assert Path(c["adapter_dir"], "adapter_config.json").is_file()
    md = (out / "report.md").read_text()
    assert "acc before" in md and "registry:" in md and "kind: adapters" in md
    assert "planner-intent" in output and "registry.json" in output  # the CLI prints the table and the snippet


def test_registry_records_every_adapter_with_its_metrics(converted):
    from slmshift.train.registry import AdapterRegistry

    out, _ = converted
    reg = AdapterRegistry.load(out / "registry.json")
    rep = json.loads((out / "report.json").read_text())
    assert sorted(e.label for e in reg.entries) == ["operator-function-call", "planner-intent"]
    for e in reg.entries:
        c = next(c for c in rep["clusters"] if c["label"] == e.label)
        assert e.promoted == c["promoted"] and e.metrics.val_accuracy_before == c["before"]["correct_rate"]
        assert reg.adapter_path(e).is_dir() and not Path(e.adapter_dir).is_absolute()
    assert reg.clusters_dir == (out / "clusters").resolve()


def test_router_index_places_a_new_call_in_its_cluster(converted):
    from slmshift.scenarios.bfcl import intent_messages, load_tasks
    from slmshift.train.cluster import ClusterIndex, prompt_text

    out, _ = converted
    idx = ClusterIndex.load(out / "clusters")
    task = load_tasks(["parallel"], n=1, seed=5)[0]  # a task the log never saw
    (cid, sim), = idx.assign([prompt_text(intent_messages(task))])
    assert idx.label(cid) == "planner-intent" and sim > 0.8


def test_promotion_needs_an_interval_above_zero_on_enough_calls():
    def ev(correct: list[int]) -> EvalResult:
        return EvalResult("m", None, len(correct), valid_rate=1.0, correct_rate=sum(correct) / len(correct),
                          verdicts=[{"correct": bool(c)} for c in correct])

    base = [0] * 20 + [1] * 20
    ok, why, ci = promotion(ev(base), ev([1] * 16 + [0] * 4 + [1] * 20))  # +16 of 40 calls fixed
    assert ok and ci["low"] > 0 and ci["n"] == 40 and "interval above zero" in why
    ok, why, ci = promotion(ev(base), ev([1] * 3 + [0] * 17 + [1] * 18 + [0] * 2))  # +3 -2: noise
    assert not ok and ci["low"] <= 0 <= ci["high"] and "includes zero" in why
    ok, why, _ = promotion(ev([0] * 10), ev([1] * 10))  # a clear win, but only 10 calls
    assert not ok and "fewer than 30 held-out calls" in why
    assert promotion(ev([0] * 10), ev([1] * 10), min_calls=5)[0]
    ok, why, _ = promotion(ev(base), ev([0] * 40))
    assert not ok and "worse than the base" in why


@pytest.mark.parametrize("setup,needle", [
    (lambda p: None, "no such run directory"),
    (lambda p: p.mkdir(), "no interaction log found"),
])
def test_bad_run_dir_is_a_clear_error(tmp_path, setup, needle):
    run = tmp_path / "run"
    setup(run)
    res = CliRunner().invoke(app, ["convert", str(run), "--no-progress"])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output


def test_empty_curated_set_is_a_clear_error(tmp_path):
    from slmshift.platform.log import LogWriter
    from slmshift.platform.types import Interaction

    w = LogWriter(str(tmp_path))
    w.add([Interaction(id="x", experiment_id="e", episode_id="ep", call_index=0, scenario="operator", task_id="t",
                       policy="p", role="planner", call_kind="intent", category="template", expect="json",
                       prompt="[]", output="", model="m", tier="slm", backend="hf", route_kind="slm",
                       route_reason="", tokens_in=1, tokens_out=1, latency_s=0, engine_latency_s=0, cost_usd=0,
                       flops=0, valid=False, correct=False, episode_success=False)])
    w.close()
    res = CliRunner().invoke(app, ["convert", str(tmp_path), "--no-progress"])
    assert res.exit_code == 2 and "curated set is empty" in res.output and "--rule valid" in res.output


def test_bad_options_are_a_clear_error(synthetic_log):
    res = CliRunner().invoke(app, ["convert", synthetic_log.run_dir, "--rule", "sometimes"])
    assert res.exit_code == 2 and "curate.rule" in res.output and "Traceback" not in res.output
    assert ConvertOptions().lora.max_length >= 768  # quickstart prompts fit whole


def test_printed_yaml_snippet_loads_as_an_experiment(converted, tmp_path, tiny_model_dir):
    """The snippet the report prints, merged with a teacher and a scenario, passes config validation."""
    import yaml

    import slmshift.scenarios  # noqa: F401
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options
    from slmshift.train.convert import serve_snippet

    out, _ = converted
    snippet = yaml.safe_load(serve_snippet(str(out / "registry.json"), tiny_model_dir))
    cfg = {"experiment": {"name": "tuned", "storage": str(tmp_path)},
           "models": snippet["models"] + [{"name": "teacher", "tier": "llm", "backend": "simulated"}],
           "router": snippet["router"], "scenarios": [{"kind": "operator", "episodes": 2}]}
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path, scenario_options())
    assert loaded.router.policies[0].kind == "adapters" and loaded.models[0].registry
