"""The whole conversion (S2 -> S5) on the synthetic operator log with the tiny model, through the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from slmshift.cli import app
from slmshift.train.convert import ConvertOptions
from slmshift.train.promotion import challenge, promotion
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
    # each call's served budget, from the run's operator options (the log does not record it): held-out calls are
    # generated with it, not with a length derived from the logged answer
    assert {k: set(v) for k, v in df.groupby("call_kind")["max_tokens"]} == {"intent": {48}, "function_call": {128}}


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
        # promotion resampled tasks: n counts the held-out tasks, calls the calls
        assert c["interval"]["calls"] == c["n_val"] and 1 <= c["interval"]["n"] <= c["n_val"]
        assert c["interval"]["n"] == len({v["task_id"] for v in c["after_verdicts"]})
        assert c["train"]["steps"] == 6 and c["train"]["val_loss_adapter"] is not None
        # the zero-shot figure: its interval resamples tasks; with no shadows in the log every call was generated
        lo, hi = c["before_interval"]["low"], c["before_interval"]["high"]
        assert lo <= c["before"]["correct_rate"] <= hi and c["before_interval"]["n"] == c["interval"]["n"]
        assert c["before_source"] == {"collect": 0, "generated": c["n_val"]}
        assert Path(c["adapter_dir"], "adapter_config.json").is_file()
    md = (out / "report.md").read_text()
    assert "acc before" in md and "registry:" in md and "kind: adapters" in md
    assert " tasks / " in md and "resampling held-out tasks" in md
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


def _ev(correct: list[int], tasks: list[str] | None = None) -> EvalResult:
    tasks = tasks if tasks is not None else [f"t{i}" for i in range(len(correct))]
    return EvalResult("m", None, len(correct), valid_rate=1.0, correct_rate=sum(correct) / len(correct),
                      verdicts=[{"correct": bool(c), "task_id": t} for c, t in zip(correct, tasks)])


def test_promotion_needs_an_interval_above_zero_on_enough_tasks():
    base = [0] * 20 + [1] * 20  # one call per task: the task bootstrap is the old call bootstrap
    ok, why, ci = promotion(_ev(base), _ev([1] * 16 + [0] * 4 + [1] * 20))  # +16 of 40 tasks fixed
    assert ok and ci["low"] > 0 and ci["n"] == ci["calls"] == 40 and "interval above zero" in why
    assert "on 40 tasks / 40 calls" in why
    ok, why, ci = promotion(_ev(base), _ev([1] * 3 + [0] * 17 + [1] * 18 + [0] * 2))  # +3 -2: noise
    assert not ok and ci["low"] <= 0 <= ci["high"] and "includes zero" in why
    ok, why, _ = promotion(_ev([0] * 9), _ev([1] * 9))  # a clear win, but only 9 tasks
    assert not ok and "fewer than 10 held-out tasks" in why
    assert promotion(_ev([0] * 9), _ev([1] * 9), min_tasks=5)[0]
    ok, why, _ = promotion(_ev(base), _ev([0] * 40))
    assert not ok and "worse than the base" in why


def test_a_cluster_the_base_already_aces_is_not_trained():
    """Where the base answers every held-out call correctly no adapter can be promoted (no paired difference is
    positive), so S5 spends nothing there and says why; one wrong call leaves room."""
    from slmshift.train.promotion import no_room

    aced = _ev([1] * 12)
    assert "all 12 held-out calls correctly" in no_room(aced)
    for after in ([1] * 12, [0] * 12, [1] * 6 + [0] * 6):
        assert not promotion(aced, _ev(after), min_tasks=5)[0]
    assert no_room(_ev([1] * 11 + [0])) is None


def test_a_new_adapter_must_also_beat_the_one_in_force():
    base, incumbent = _ev([0] * 40), _ev([1] * 20 + [0] * 20)
    better, same = _ev([1] * 36 + [0] * 4), _ev([1] * 21 + [0] * 19)
    ok, why, _ = promotion(base, better)
    won, why_won, fig = challenge(ok, why, "planner-intent", incumbent, better)
    assert won and fig["beats"] and fig["correct_rate"] == 0.5 and "over the adapter in force" in why_won
    ok, why, _ = promotion(base, same)
    assert ok  # better than the base ...
    kept, why_kept, fig = challenge(ok, why, "planner-intent", incumbent, same)
    assert not kept and not fig["beats"] and "not over the adapter in force 'planner-intent', which stays" in why_kept
    assert fig["interval"]["n"] == 40  # ... but paired with the incumbent by task, the +1 is noise
    lost, why_lost, _ = challenge(False, "interval includes zero", "planner-intent", incumbent, base)
    assert not lost and why_lost.startswith("interval includes zero; against the adapter in force")
    worse, why_worse, _ = challenge(ok, why, "planner-intent", _ev([1] * 40), same)  # beats the base only
    assert not worse and why_worse.endswith("worse than the adapter in force") and "than the base" not in why_worse


def test_convert_with_an_incumbent_measures_it_on_the_same_held_out_calls(converted, synthetic_log, tmp_path,
                                                                          tiny_model_dir):
    """`--incumbent` with the first convert's adapters marked in force: each task's new adapter is judged against
    the old one on the same held-out calls, and a missing registry fails before any work."""
    out, _ = converted
    doc = json.loads((out / "registry.json").read_text())
    for e in doc["entries"]:
        e["promoted"] = True
    (out / "in-force.json").write_text(json.dumps(doc))
    res = CliRunner().invoke(app, ["convert", synthetic_log.run_dir, "--out", str(tmp_path / "again"), "--base",
                                   tiny_model_dir, "--steps", "2", "--batch-size", "4",
                                   "--min-train-rows", "2", "--no-progress", "--incumbent", str(out / "in-force.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "again" / "report.json").read_text())
    assert rep["options"]["incumbent"] == str(out / "in-force.json")
    for c in rep["clusters"]:
        inc = c["incumbent"]
        assert inc["label"] == c["label"] and inc["interval"]["calls"] == c["n_val"]
        assert c["task_of"] == inc["label"]  # S3 kept each adapter's task whole: judged against it by name
        assert "adapter in force" in c["status"] and (c["promoted"] is False or inc["beats"])
    res = CliRunner().invoke(app, ["convert", synthetic_log.run_dir, "--out", str(tmp_path / "x"),
                                   "--incumbent", str(tmp_path / "nope.json")])
    assert res.exit_code != 0 and "nope.json: file not found" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x" / "curated.parquet").exists()


def test_an_earlier_turns_calls_train_but_are_never_held_out(converted, synthetic_log, tmp_path, tiny_model_dir):
    """`--train-also`: a flywheel's earlier turn adds training rows; every held-out call is this run's, and an earlier
    row of a task this run holds out is dropped (S5 would otherwise judge an adapter on a task it trained on)."""
    import glob
    import shutil

    early = tmp_path / "early"
    shutil.copytree(synthetic_log.run_dir, early, ignore=shutil.ignore_patterns("convert"))
    for f in glob.glob(str(early / "interactions" / "*.parquet")):  # the same tasks, asked in other words
        df = pd.read_parquet(f)
        df["id"] = "early-" + df["id"]
        msgs = [json.loads(p) for p in df["prompt"]]
        for i, m in enumerate(msgs):
            m[-1]["content"] = f"Earlier turn {i}: " + " ".join(reversed(m[-1]["content"].split()))
        df["prompt"] = [json.dumps(m) for m in msgs]
        df.to_parquet(f, index=False)
    res = CliRunner().invoke(app, ["convert", synthetic_log.run_dir, "--out", str(tmp_path / "both"), "--base",
                                   tiny_model_dir, "--steps", "2", "--batch-size", "4", "--min-train-rows", "2",
                                   "--no-progress", "--train-also", str(early)])
    assert res.exit_code == 0, res.output
    assert "from 1 earlier run(s), training only" in res.output
    rows = pd.read_parquet(tmp_path / "both" / "curated.parquet")
    earlier = rows["record_id"].str.startswith("early-")
    held = set(rows.loc[rows["split"] == "val", "task_id"])
    assert earlier.any() and held and (rows.loc[earlier, "split"] == "train").all()
    assert not (earlier & rows["task_id"].isin(held)).any()  # dropped: "(their task is held out in this run)"
    assert "dropped (their task is held out in this run)" in res.output
    res = CliRunner().invoke(app, ["convert", synthetic_log.run_dir, "--out", str(tmp_path / "self"),
                                   "--train-also", synthetic_log.run_dir])
    assert res.exit_code != 0 and "holds calls of RUN_DIR" in res.output and "Traceback" not in res.output


def _correlated(per_task: list[int], calls: int) -> tuple[list[int], list[int], list[str]]:
    """Held-out calls where each task's `calls` calls are identical: base always wrong, the adapter's verdict on
    task i is per_task[i] (1 right, -1: base right and adapter wrong, 0 both wrong)."""
    before = [int(v < 0) for v in per_task for _ in range(calls)]
    after = [int(v > 0) for v in per_task for _ in range(calls)]
    return before, after, [f"t{i}" for i, _ in enumerate(per_task) for _ in range(calls)]


def test_task_bootstrap_is_sqrt_calls_per_task_wider_than_the_call_bootstrap():
    """Known truth: with 6 perfectly correlated calls per task, the data hold as much information as one call per
    task, so the interval must be ~sqrt(6) wider than one that treats the 60 calls as independent."""
    from slmshift.train.promotion import paired_interval

    per_task = [1, 0, -1, 1, 1, 0, 0, 1, -1, 0] * 4  # 40 tasks: enough that the interval's ends are not too lumpy
    before, after, tasks = _correlated(per_task, 6)
    m_call, lo_call, hi_call = paired_interval(before, after)  # each call its own group: the old rule
    m_task, lo_task, hi_task = paired_interval(before, after, tasks)
    assert m_call == m_task == pytest.approx(0.2)
    ratio = (hi_task - lo_task) / (hi_call - lo_call)
    assert 6 ** 0.5 * 0.85 < ratio < 6 ** 0.5 * 1.15, ratio
    # one call per task: grouping changes nothing (same draws, same interval)
    b1, a1, t1 = _correlated(per_task, 1)
    assert paired_interval(b1, a1, t1) == paired_interval(b1, a1)


def test_correlated_calls_no_longer_promote_on_call_counts():
    """10 tasks x 6 identical calls: resampled as 60 calls the gain looks certain, resampled as 10 tasks it is not;
    and 60 calls of 5 tasks are 5 tasks of evidence, fewer than min_promotion_tasks."""
    from slmshift.train.promotion import paired_interval

    before, after, tasks = _correlated([1, 1, 1, 1, -1, 0, 0, 0, 0, 0], 6)  # +4 -1 of 10 tasks
    assert paired_interval(before, after)[1] > 0  # the call bootstrap would have promoted it
    ok, why, ci = promotion(_ev(before, tasks), _ev(after, tasks))
    assert not ok and ci["low"] <= 0 < ci["high"] and "includes zero" in why
    assert ci["n"] == 10 and ci["calls"] == 60 and "on 10 tasks / 60 calls" in why
    before, after, tasks = _correlated([1] * 5, 12)
    ok, why, ci = promotion(_ev(before, tasks), _ev(after, tasks))  # all fixed, 60 calls, but 5 tasks
    assert not ok and "fewer than 10 held-out tasks" in why and ci["n"] == 5 and ci["calls"] == 60
    assert ConvertOptions().min_promotion_tasks == 10
    assert promotion(_ev(before, tasks), _ev(after, tasks), min_tasks=5)[0]


def test_calls_without_a_task_id_are_their_own_tasks_and_the_reason_says_so():
    before, after, tasks = _correlated([1, 1, 0], 4)
    tasks = tasks[:8] + [""] * 4  # the last task's 4 calls carry no task id
    ok, why, ci = promotion(_ev(before, tasks), _ev(after, tasks), min_tasks=1)
    assert ci["n"] == 2 + 4 and ci["calls"] == 12 and "4 call(s) without a task id" in why
    ok, why, _ = promotion(_ev(before, tasks), _ev(after, ["x"] * 12), min_tasks=1)
    assert not ok and "different calls" in why


def test_report_shows_the_interval_with_tasks_and_calls():
    from slmshift.train.convert_report import CLUSTER_HEADER, ConvertReport, cluster_rows, to_markdown

    c = {"id": 0, "label": "planner-intent", "size": 60, "role": "planner", "call_kind": "intent", "n_train": 40,
         "n_val": 37, "chosen": "m", "before": {"correct_rate": 0.41}, "after": {"correct_rate": 0.59},
         "promoted": True, "status": "ok", "interval": {"diff": 0.19, "low": 0.08, "high": 0.32, "n": 24, "calls": 37}}
    rep = ConvertReport(run_dir="r", out_dir="o", counts={}, scrub_counts={}, clusters=[c], grading="scenario",
                        clustering={"k": 1, "criterion": "c", "silhouette": {}}, timings={}, registry=None)
    row = dict(zip(CLUSTER_HEADER, cluster_rows(rep)[0]))
    assert row["acc diff [95% CI, task bootstrap]"] == "+0.19 [+0.08, +0.32], n=24 tasks / 37 calls"
    assert "resampling held-out tasks" in to_markdown(rep)


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
    res = CliRunner().invoke(app, ["convert", synthetic_log.run_dir, "--precision", "fp8"])
    assert res.exit_code == 2 and "lora.precision" in res.output and "Traceback" not in res.output
    assert ConvertOptions().lora.max_length >= 768  # quickstart prompts fit whole


def test_ctrl_c_during_s5_stops_at_once_and_no_waiting_cluster_starts(synthetic_log, tiny_model_dir, tmp_path):
    """Ctrl-C while the first cluster trains: convert exits 130 in seconds, the cluster waiting for the CPUs never
    starts, and nothing waits for the running run to finish (it resumes from its checkpoint on the next convert).
    Before, every cluster trained to the end first."""
    out = tmp_path / "convert"
    proc = subprocess.Popen([sys.executable, "-m", "slmshift.cli", "convert", synthetic_log.run_dir, "--out", str(out),
                             "--base", tiny_model_dir, "--steps", "100000", "--batch-size", "4",
                             "--min-train-rows", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.glob("checkpoints/*/checkpoint_*")):
        time.sleep(0.5)  # the first cluster is stepping once it has written a checkpoint
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    t = time.time()
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"convert went on training after Ctrl-C: {proc.communicate()[0][-3000:]}")
    assert proc.returncode == 130, output[-3000:]
    assert time.time() - t < 60 and "interrupted" in output and "Traceback" not in output, output[-3000:]
    started = {p.name.rsplit("-", 1)[0] for p in out.glob("checkpoints/*") if p.is_dir()}
    assert len(started) == 1, started  # the other cluster never started


def test_printed_yaml_snippet_loads_as_an_experiment(converted, tmp_path, tiny_model_dir):
    """The snippet the report prints, merged with a teacher and a scenario, passes config validation."""
    import yaml

    import slmshift.scenarios  # noqa: F401
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options
    from slmshift.train.convert_report import serve_snippet

    out, _ = converted
    snippet = yaml.safe_load(serve_snippet(str(out / "registry.json"), tiny_model_dir))
    cfg = {"experiment": {"name": "tuned", "storage": str(tmp_path)},
           "models": snippet["models"] + [{"name": "teacher", "tier": "llm", "backend": "simulated"}],
           "router": snippet["router"], "scenarios": [{"kind": "operator", "episodes": 2}]}
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path, scenario_options())
    assert loaded.router.policies[0].kind == "adapters" and loaded.models[0].registry
