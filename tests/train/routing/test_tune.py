"""`slmshift tune`: a real Ray Tune + Optuna search on paired outcomes (from a CSV, and from a run with simulated
models), its outputs, the policy file it writes (loaded by the config and routed with), calibration, --verify."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from slmshift.cli import app
from slmshift.platform.types import LMRequest
from slmshift.train.routing import metrics as rm

runner = CliRunner()


def synthetic_pairs(n_tasks: int = 80, seed: int = 0) -> pd.DataFrame:
    """Three call kinds per task; the SLM is good at one, poor at another; its log-prob is informative, not decisive."""
    rng = np.random.default_rng(seed)
    acc = {"intent": 0.92, "function_call": 0.35, "summary": 0.7}
    words = {"intent": "choose which tool fits the user request", "function_call": "write the exact python call",
             "summary": "summarise the answer for the user"}
    rows = []
    for t in range(n_tasks):
        ep_ok = rng.random() < 0.97
        for k, a in acc.items():
            llm_ok, slm_ok = rng.random() < 0.95, rng.random() < a
            lp = rng.normal(-0.3, 0.2) if slm_ok else rng.normal(-0.9, 0.3)
            rows.append({"prompt": json.dumps([{"role": "user", "content": f"{words[k]} (task {t})"}]),
                         "slm_correct": slm_ok, "llm_correct": llm_ok, "slm_cost": 0.0001, "llm_cost": 0.002,
                         "call_kind": k, "task_id": f"t{t}", "episode_id": f"e{t}",
                         "episode_success": bool(ep_ok and llm_ok), "slm_logprob": min(lp, 0.0),
                         "slm_valid": bool(slm_ok or rng.random() < 0.5)})
    return pd.DataFrame(rows)


def held_out_tasks(m: dict, df: pd.DataFrame) -> set:
    from slmshift.train.routing.estimate import split
    from slmshift.train.routing.pairs import paired_from_file

    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
        df.to_csv(f.name, index=False)
    t = paired_from_file(f.name)
    return set(df["task_id"].iloc[split(t, 0.4, 0.3, m["seed"]).held])


def assert_front_non_dominated(front: list[dict], key: str) -> None:
    q = np.array([p["choose"][key] for p in front])
    c = np.array([p["choose"]["cost"] for p in front])
    assert len(front) >= 2
    for i in range(len(front)):
        dominated = (q >= q[i]) & (c <= c[i]) & ((q > q[i]) | (c < c[i]))
        assert not dominated.any(), front[i]
    assert rm.pareto_mask(q, c).all()


def test_calibration_prints_tau_for_an_llm_share(tmp_path):
    from slmshift.train.routing.pairs import paired_from_file
    from slmshift.train.routing.tune import TuneOptions, calibrate

    p = tmp_path / "pairs.csv"
    synthetic_pairs(60).to_csv(p, index=False)
    res = runner.invoke(app, ["tune", "--pairs", str(p), "--out", str(tmp_path / "o"), "--llm-share", "0.3",
                              "--policies", "threshold,cascade"])
    assert res.exit_code == 0, res.output
    assert "tau for an LLM-call share of 0.3" in res.output and "cascade" in res.output
    cal = calibrate(paired_from_file(str(p)), 0.3, TuneOptions(kinds=["learned", "cascade"]))
    for kind in ("learned", "cascade"):  # continuous scores: within 2 points of the target on the calls scored
        assert abs(cal[kind]["llm_share_calibrated"] - 0.3) <= 0.02, (kind, cal[kind])


def test_bad_pairs_file_exits_2_naming_the_column(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("prompt,slm_correct,llm_correct\na,1,perhaps\n")
    res = runner.invoke(app, ["tune", "--pairs", str(p), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "llm_correct" in res.output and str(p) in res.output
    res = runner.invoke(app, ["tune", "--pairs", str(p)])
    assert res.exit_code == 2 and "--out" in res.output


def test_six_trial_search_on_a_pairs_csv(ray_cluster, tmp_path):
    p = tmp_path / "pairs.csv"
    synthetic_pairs(80).to_csv(p, index=False)
    out = tmp_path / "out"
    res = runner.invoke(app, ["tune", "--pairs", str(p), "--out", str(out), "--trials", "6", "--time-budget", "600",
                              "--policies", "threshold,learned,cascade,random", "--no-progress"])
    assert res.exit_code == 0, res.output
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials["trial"].nunique() == 6 and len(trials) > 6 * 5  # each trial replays a grid of thresholds
    front = json.loads((out / "pareto.json").read_text())
    assert_front_non_dominated(front, "quality_episode")
    m = json.loads((out / "metrics.json").read_text())
    assert m["quality"] == "episode" and m["tune"]["trials"] == 6
    df = synthetic_pairs(80)
    invalid_share = (~df["slm_valid"][df["task_id"].isin(held_out_tasks(m, df))]).mean()
    for kind in set(trials["kind"]) | {"oracle"}:
        for level in ("call", "episode"):
            pm = m["policies"][kind][level]
            assert {"apgr", "cpt50", "cpt80", "aiq", "curve", "apgr_ci"} <= set(pm)
            assert pm["curve"][-1]["llm_share"] == 1.0  # a cascade always escalates a failed check:
            assert pm["curve"][0]["llm_share"] == (0.0 if kind != "cascade" else pytest.approx(invalid_share))
    # the oracle bounds every deployable policy's call-level APGR (its curve is the best at every share)
    for kind in set(trials["kind"]):
        assert m["policies"][kind]["call"]["apgr"] <= m["policies"]["oracle"]["call"]["apgr"] + 1e-9
    ch = m["chosen"]
    assert 0 <= ch["held_out"]["slm_share"] <= 1 and ch["held_out"]["quality_ratio_to_llm"]["verdict"] in (
        "yes", "no", "not shown")
    assert ch["held_out"]["quality_call_ci"][0] <= ch["held_out"]["quality_call"] <= ch["held_out"]["quality_call_ci"][1]
    for f in ("report.md", "curves.png", "pareto.png", "policy.yaml"):
        assert (out / f).stat().st_size > 0
    spec = yaml.safe_load((out / "policy.yaml").read_text())
    assert spec["kind"] in {"threshold", "learned", "cascade", "random", "llm"}
    if spec["kind"] == "learned":
        assert (out / "learned.joblib").is_file()
    assert "episode level" in (out / "report.md").read_text()


# --- run -> tune -> run with policy.yaml, simulated models -------------------------------------------------------

MODELS = {"models": [
    {"name": "student", "tier": "slm", "backend": "simulated", "resources": {"num_cpus": 0},
     "price": {"input_per_m": 0.1, "output_per_m": 0.2}, "profile": {"accuracy": {"intent": 0.95, "default": 0.3}}},
    {"name": "teacher", "tier": "llm", "backend": "simulated", "resources": {"num_cpus": 0},
     "price": {"input_per_m": 3.0, "output_per_m": 15.0}, "profile": {"accuracy": {"default": 1.0}}}]}


@pytest.fixture(scope="module")
def paired_run(ray_cluster, tmp_path_factory):
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options
    from slmshift.runner import run_experiment

    storage = tmp_path_factory.mktemp("runs")
    doc = {"experiment": {"name": "paired", "seed": 1, "storage": str(storage)}, **MODELS,
           "router": {"policies": [{"kind": "llm", "name": "paired", "shadow": "slm"},
                                   {"kind": "cascade", "name": "cascade", "tau": 0.5, "shadow": "llm"}]},
           "scenarios": [{"kind": "operator", "episodes": 16, "teams": 1, "concurrency": 8,
                          "options": {"categories": ["simple"], "retries": 0}}]}
    path = storage / "paired.yaml"
    path.write_text(yaml.safe_dump(doc))
    return run_experiment(load_config(path, scenario_options()))


def test_run_tune_verify_and_load_the_policy_file(paired_run, tmp_path):
    import slmshift.scenarios  # noqa: F401
    from slmshift.platform.config import load_config
    from slmshift.platform.log import read_interactions
    from slmshift.platform.scenario import scenario_options
    from slmshift.serve.router import build_policy

    from slmshift.train.routing.pairs import paired_from_run

    run_dir = paired_run.run_dir
    pairs = paired_from_run(run_dir).df  # both arms pair: shadows of LLM calls, cascade escalations and shadows
    assert set(pairs.obs_tier) == {"llm", "slm"} and pairs.episode.str.contains("/cascade/").any()
    assert pairs.slm_logprob.notna().all()
    res = runner.invoke(app, ["tune", run_dir, "--trials", "6", "--time-budget", "600", "--policies",
                              "threshold,cascade,random", "--verify", "--verify-episodes", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    out = f"{run_dir}/tune"
    m = json.loads(open(f"{out}/metrics.json").read())
    assert m["quality"] == "episode" and m["split"]["unit"] == "task"
    assert_front_non_dominated(json.loads(open(f"{out}/pareto.json").read()), "quality_episode")
    # the SLM is right on most intents and wrong on most function calls: routing beats random
    assert m["policies"]["threshold"]["call"]["apgr"] > m["policies"]["random"]["call"]["apgr"]

    # the policy file loads exactly as documented, and the router routes with it
    cfg_path = tmp_path / "use.yaml"
    cfg_path.write_text(yaml.safe_dump({"experiment": {"name": "use"}, **MODELS,
                                        "router": {"policies": [{"file": f"{out}/policy.yaml"}]},
                                        "scenarios": [{"kind": "operator"}]}))
    cfg = load_config(cfg_path, scenario_options())
    policy = build_policy(cfg.router.policies[0], cfg.models)
    for kind in ("intent", "function_call"):
        d = policy.route(LMRequest(experiment_id="x", episode_id="e", call_index=0, scenario="operator", role="r",
                                   call_kind=kind, messages=[{"role": "user", "content": "hi"}]))
        assert d.tier in ("llm", "slm") and d.model in ("student", "teacher")

    # --verify ran both arms on tasks the tuned run never saw
    v = json.loads(open(f"{out}/verify.json").read())
    assert v["measured"]["episodes"] == 4 and v["measured"]["tasks"] == 4
    seen = set(read_interactions(run_dir)["task_id"])
    new = set(read_interactions(v["run_dir"])["task_id"])
    assert new and not (seen & new)
    assert "predicted" in res.output and "measured" in res.output


@pytest.mark.parametrize("kind", ["threshold", "learned", "cascade", "random"])
def test_each_kind_writes_a_policy_file_the_config_loads_and_the_router_uses(kind, tmp_path):
    """write_policy for every deployable kind -> `router: {policies: [{file: PATH}]}` -> build_policy -> a decision
    that matches the replayed one."""
    import slmshift.scenarios  # noqa: F401
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options
    from slmshift.serve.router import build_policy
    from slmshift.train.routing.pairs import paired_from_file
    from slmshift.train.routing.estimate import split
    from slmshift.train.routing.scorers import fit_scorer
    from slmshift.train.routing.tune import write_policy

    p = tmp_path / "pairs.csv"
    synthetic_pairs(30).to_csv(p, index=False)
    table = paired_from_file(str(p))
    search = split(table, 0.4, 0.3, 0).fit
    params = {"prior_strength": 3.0} if kind == "threshold" else {"C": 1.0} if kind == "learned" else {}
    fitted = fit_scorer(kind, params, table, search)
    tau = 0.6
    held = {"quality_call": 0.9, "cost": 0.001, "llm_share": 0.4, "slm_share": 0.6}
    out = tmp_path / "tune"
    out.mkdir()
    path = write_policy({"kind": kind, "params": params, "tau": tau, "held_out": held}, table, out,
                        lambda k, p: fitted)
    cfg_path = tmp_path / "use.yaml"
    cfg_path.write_text(yaml.safe_dump({"experiment": {"name": "use"}, **MODELS,
                                        "router": {"policies": [{"file": str(path)}]},
                                        "scenarios": [{"kind": "operator"}]}))
    cfg = load_config(cfg_path, scenario_options())
    spec = cfg.router.policies[0]
    assert spec.kind == kind and spec.label == f"tuned-{kind}"
    policy = build_policy(spec, cfg.models)
    df = table.df
    for i in range(6):
        msgs = json.loads(df.prompt.iloc[i])
        d = policy.route(LMRequest(experiment_id="x", episode_id="e", call_index=i, scenario="operator", role="r",
                                   call_kind=df.call_kind.iloc[i], messages=msgs))
        assert d.model == ("student" if d.tier == "slm" else "teacher")
        if kind in ("threshold", "learned"):  # the deployed score is the replayed one
            assert d.score == pytest.approx(fitted.scores[i], abs=1e-5)
            assert d.tier == ("slm" if fitted.scores[i] >= tau else "llm")
        if kind == "cascade":
            assert d.accept_confidence == tau


def test_per_cluster_thresholds_write_a_policy_with_its_cluster_index(tmp_path):
    """threshold_cluster: clusters placed by the same index the router loads, per-cluster tau offsets, and a
    policy file whose `clusters:` path is relative to the file."""
    import slmshift.scenarios  # noqa: F401
    from sklearn.cluster import KMeans

    from slmshift.platform.artifacts import ClusterIndex
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options
    from slmshift.serve.router import build_policy
    from slmshift.train.routing.pairs import _assign_clusters, paired_from_file
    from slmshift.train.routing.estimate import split
    from slmshift.train.routing.scorers import fit_scorer
    from slmshift.train.routing.tune import write_policy

    p = tmp_path / "pairs.csv"
    synthetic_pairs(20).to_csv(p, index=False)
    table = paired_from_file(str(p))
    km = KMeans(n_clusters=3, n_init=4, random_state=0).fit(table.embeddings())
    ClusterIndex(km.cluster_centers_, [{"id": i, "label": f"c{i}"} for i in range(3)]).save(tmp_path / "clusters")
    table.clusters_dir = str(tmp_path / "clusters")
    _assign_clusters(table)
    assert table.has_cluster and set(table.df.cluster) <= {0, 1, 2}
    search = split(table, 0.4, 0.3, 0).fit
    params = {"prior_strength": 2.0, "off_0": 0.2, "off_1": -0.2, "off_2": 0.0}
    fitted = fit_scorer("threshold_cluster", params, table, search)
    out = tmp_path / "run" / "tune"
    out.mkdir(parents=True)
    held = {"quality_call": 0.9, "cost": 0.001, "llm_share": 0.4, "slm_share": 0.6}
    path = write_policy({"kind": "threshold_cluster", "params": params, "tau": 0.5, "held_out": held}, table, out,
                        lambda k, p: fitted)
    spec_doc = yaml.safe_load(path.read_text())
    assert spec_doc["clusters"] == "../../clusters" and spec_doc["tau_per_cluster"] == {0: 0.7, 1: 0.3, 2: 0.5}
    cfg_path = tmp_path / "use.yaml"
    cfg_path.write_text(yaml.safe_dump({"experiment": {"name": "use"}, **MODELS,
                                        "router": {"policies": [{"file": str(path)}]},
                                        "scenarios": [{"kind": "operator"}]}))
    policy = build_policy(load_config(cfg_path, scenario_options()).router.policies[0], MODELS_SPECS())
    for i in range(len(table.df)):
        row = table.df.iloc[i]
        d = policy.route(LMRequest(experiment_id="x", episode_id="e", call_index=i, scenario="operator", role="r",
                                   call_kind=row.call_kind, messages=json.loads(row.prompt)))
        assert d.cluster == row.cluster and d.score == pytest.approx(fitted.scores[i])
        assert d.tier == ("slm" if fitted.mask(np.array([i]), np.array([0.5]))[0, 0] else "llm")


def MODELS_SPECS():
    from slmshift.platform.types import ModelSpec

    return [ModelSpec.model_validate(m) for m in MODELS["models"]]


def test_verify_with_no_unseen_task_left_exits_2_and_says_why(tmp_path):
    """A run that used every task of its pool: `tune --verify` stops before the search with the pool's size and the
    number the run used, instead of printing n/a and exiting 0."""
    from slmshift.platform.log import LogWriter
    from slmshift.platform.types import Interaction, record_id

    run = tmp_path / "run"
    doc = {"experiment": {"name": "tiny-pool"}, **MODELS, "router": {"policies": [{"kind": "llm", "shadow": "slm"}]},
           "scenarios": [{"kind": "metagpt", "episodes": 2, "options": {"problems": ["HumanEval/0", "HumanEval/1"]}}]}
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    w = LogWriter(str(run))
    w.add([Interaction(id=record_id("x", f"e{i}", 0), experiment_id="x", episode_id=f"e{i}", call_index=0,
                       scenario="metagpt", task_id=f"HumanEval/{i}", policy="llm", role="r", call_kind="code",
                       category="", expect="", prompt="[]", output="", model="teacher", tier="llm", backend="simulated",
                       route_kind="llm", route_reason="", tokens_in=1, tokens_out=1, latency_s=0.1,
                       engine_latency_s=0.1, cost_usd=0.0, flops=0.0, valid=True, correct=True).model_dump()
           for i in range(2)])
    w.flush()
    res = runner.invoke(app, ["tune", str(run), "--verify"])
    assert res.exit_code == 2, res.output
    assert "has 2 task(s) in its pool" in res.output and "the tuned run used 2" in res.output
