"""One experiment end to end on a local Ray: tiny hf SLM + simulated teacher on BFCL through every policy.
The printed summary must agree with the S1 log it was computed from."""

import json

import pandas as pd
import pytest

import slmshift.scenarios  # noqa: F401
from slmshift.platform.config import load_config
from slmshift.platform.log import read_episodes, read_interactions
from slmshift.platform.scenario import scenario_options
from slmshift.runner import run_experiment

CONFIG = """\
experiment: {{name: e2e, seed: 3, storage: {storage}}}
{models}router:
  policies:
    - {{kind: llm, name: all-llm}}
    - {{kind: slm, name: all-slm, constrain: none}}
    - {{kind: call_kind, name: split, map: {{intent: slm, function_call: llm}}}}
scenarios:
  - {{kind: operator, episodes: 6, teams: 2, concurrency: 4, options: {{categories: [simple, parallel], retries: 1}}}}
"""


@pytest.fixture(scope="module")
def run(ray_cluster, tiny_teacher_models, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    path = storage / "e2e.yaml"
    path.write_text(CONFIG.format(storage=storage, models=tiny_teacher_models))
    cfg = load_config(path, scenario_options())
    return run_experiment(cfg)


def test_every_episode_and_call_is_logged_once(run):
    df, ep = read_interactions(run.run_dir), read_episodes(run.run_dir)
    assert len(ep) == 18 and ep["episode_id"].is_unique
    assert df["id"].is_unique and len(df) == run.log_counts["interactions"]
    assert df.groupby("episode_id").size().to_dict() == ep.set_index("episode_id")["n_calls"].to_dict()
    assert df["episode_success"].notna().all()  # outcomes joined onto every record


def test_routes_follow_the_policies(run):
    df = read_interactions(run.run_dir)
    assert set(df[df.policy == "all-llm"]["model"]) == {"teacher"}
    assert set(df[df.policy == "all-slm"]["model"]) == {"tiny"}
    split = df[df.policy == "split"]
    assert set(split[split.call_kind == "intent"]["tier"]) == {"slm"}
    assert set(split[split.call_kind == "function_call"]["tier"]) == {"llm"}
    # constrain (default slm): the SLM's calls are held to their constraint, the LLM's are not; all-slm opted out
    assert split[split.tier == "slm"]["constrained"].all() and not split[split.tier == "llm"]["constrained"].any()
    assert not df[df.policy == "all-slm"]["constrained"].any()
    assert split["constraint"].notna().all()


def test_grading_with_bfcl_checker(run):
    arms = {a["policy"]: a for a in run.summary["arms"]}
    # a teacher declared 100% accurate answers from the reference: BFCL's checker accepts every call
    assert arms["all-llm"]["success_rate"] == 1.0
    # a random tiny model's output, left unconstrained, is unparsable: recorded as failed calls, the episodes finish
    df = read_interactions(run.run_dir)
    slm = df[df.policy == "all-slm"]
    assert arms["all-slm"]["success_rate"] == 0.0 and arms["all-slm"]["episode_errors"] == 0
    assert (slm["correct"] != True).all() and (slm["valid"] == False).any()  # noqa: E712
    bad = slm[slm["valid"] == False]  # noqa: E712
    assert bad["error"].notna().all()
    # an unparsable function call is retried once, then the episode ends as a failure
    tries = slm[slm.call_kind == "function_call"].groupby("episode_id")
    assert tries.size().between(1, 2).all()
    assert (tries["valid"].first() == False).sum() == (tries.size() == 2).sum()  # noqa: E712


def test_summary_matches_the_log(run):
    df = read_interactions(run.run_dir)
    s = run.summary
    by_model = {m["model"]: m for m in s["models"]}
    for model, g in df.groupby("model"):
        m = by_model[model]
        assert m["calls"] == len(g) and m["tokens_in"] == g.tokens_in.sum() and m["tokens_out"] == g.tokens_out.sum()
        assert m["cost_usd"] == pytest.approx(g.cost_usd.sum())
        assert m["latency_p95_s"] == pytest.approx(g.latency_s.quantile(0.95))
    assert by_model["teacher"]["simulated"] and not by_model["tiny"]["simulated"]
    assert s["totals"]["calls"] == len(df) and s["totals"]["cost_usd"] == pytest.approx(df.cost_usd.sum())
    for arm in s["arms"]:
        g = df[df.policy == arm["policy"]]
        assert arm["calls"] == len(g) and arm["slm_share"] == pytest.approx((g.tier == "slm").mean())
    assert {a["policy"]: a["slm_share"] for a in s["arms"]}["all-llm"] == 0.0
    # cost follows the declared prices, FLOPs the declared parameter count
    t = df[df.model == "teacher"]
    assert t.cost_usd.sum() == pytest.approx((3.0 * t.tokens_in.sum() + 15.0 * t.tokens_out.sum()) / 1e6)
    assert t.flops.sum() == pytest.approx(2 * 7e10 * (t.tokens_in.sum() + t.tokens_out.sum()))
    # files a researcher reads
    saved = json.loads(open(f"{run.run_dir}/report.json").read())
    assert saved["totals"]["calls"] == len(df)
    assert "all-slm" in open(f"{run.run_dir}/report.md").read()
    assert pd.read_parquet(f"{run.run_dir}/episodes.parquet").shape[0] == 18


def test_hidden_reference_never_logged(run):
    df = read_interactions(run.run_dir)
    teacher = df[(df.model == "teacher") & (df.call_kind == "function_call")]
    # the teacher's (correct) outputs are references; none of them may appear in any prompt
    for out in teacher.output.unique():
        assert not df.prompt.str.contains(out, regex=False).any()
