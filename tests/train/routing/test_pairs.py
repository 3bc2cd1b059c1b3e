"""Paired outcomes: from a run's S1 log (shadow pairs, cascade escalations) and from a CSV/Parquet file, and the
errors a user gets for bad input."""

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.log import LogWriter
from slmshift.platform.types import EpisodeResult, Interaction
from slmshift.train.routing.pairs import paired_from_file, paired_from_run


def rec(id_, tier, *, correct, valid=True, episode="ep1", task="t1", cost=0.0, **kw):
    fields = dict(scenario="operator", expect="json", output="{}", backend="simulated") | kw
    return Interaction(id=id_, experiment_id="exp", episode_id=episode, call_index=int(id_[1]), task_id=task,
                       policy="paired", role="planner", call_kind="intent", category="template",
                       prompt=json.dumps([{"role": "user", "content": f"pick for {id_}"}]),
                       model=tier + "-model", tier=tier, route_kind="llm", route_reason="", tokens_in=10, tokens_out=5,
                       latency_s=0.1, engine_latency_s=0.1, cost_usd=cost, flops=0.0, valid=valid, correct=correct,
                       **fields).model_dump()


def write_run(run_dir, records, episodes=(("ep1", "t1", True),)):
    w = LogWriter(str(run_dir))
    w.add(records)
    for ep, task, ok in episodes:
        w.add_episode(EpisodeResult(experiment_id="exp", episode_id=ep, scenario="operator", task_id=task,
                                    policy="paired", success=ok, reward=float(ok), n_calls=1))
    w.flush()
    return str(run_dir)


def test_shadow_pairs_and_cascade_escalations_from_a_run(tmp_path):
    run = write_run(tmp_path / "run", [
        rec("c1", "llm", correct=True, cost=2.0),  # an LLM call and its SLM shadow, wrong
        rec("c1:shadow", "slm", correct=False, cost=0.1, shadow=True, shadow_of="c1", mean_logprob=-0.2),
        rec("c2:cascade", "slm", correct=None, valid=False, cost=0.1, escalated=True, mean_logprob=-1.5),  # cascade
        rec("c2", "llm", correct=True, cost=2.0, escalated_from="c2:cascade"),
        rec("c3", "slm", correct=True, cost=0.1, mean_logprob=-0.1),  # an SLM call with an LLM shadow
        rec("c3:shadow", "llm", correct=True, cost=2.0, shadow=True, shadow_of="c3"),
        rec("c4", "llm", correct=True, cost=2.0),  # unpaired: left out
        rec("c5", "llm", correct=True, cost=2.0),  # its shadow never reached a model: left out
        rec("c5:shadow", "slm", correct=None, valid=False, shadow=True, shadow_of="c5", infra_error=True),
    ])
    t = paired_from_run(run)
    df = t.df.set_index("row").sort_index()
    assert list(df.index) == ["c1", "c2", "c3"]
    assert df.slm_ok.tolist() == [False, False, True] and df.llm_ok.tolist() == [True, True, True]
    assert df.obs_tier.tolist() == ["llm", "llm", "slm"]
    assert df.slm_cost.tolist() == [0.1, 0.1, 0.1] and df.llm_cost.tolist() == [2.0, 2.0, 2.0]
    assert df.slm_valid.tolist() == [True, False, True] and df.slm_logprob.tolist() == [-0.2, -1.5, -0.1]
    assert df.episode_success.tolist() == [True] * 3 and set(df.task) == {"t1"}
    assert t.has_cost and not t.has_cluster and t.has_logprob
    # c4 was never paired and c5's shadow never reached a model: the episode cannot be composed
    assert not t.has_episodes and not df.full_episode.any()
    # c2's SLM attempt was judged only by validity (no grader verdict): kept to fit scorers, not graded
    assert df.graded.tolist() == [True, False, True]
    assert any("infrastructure error" in n for n in t.notes)


def test_pairs_carry_their_sampling_weight_and_whole_episodes(tmp_path):
    """Shadows sampled by episode at shadow_rate 0.25 (from the run's config.yaml) weigh 4, an escalation (paired
    whatever the sample) 1; an episode all of whose calls are paired is marked whole, one with an unpaired call not."""
    import yaml

    run = tmp_path / "run"
    records = [rec("c1", "llm", correct=True, episode="ep1"),
               rec("c1:shadow", "slm", correct=False, shadow=True, shadow_of="c1", episode="ep1"),
               rec("c2:cascade", "slm", correct=False, escalated=True, episode="ep1", mean_logprob=-1.0),
               rec("c2", "llm", correct=True, escalated_from="c2:cascade", episode="ep1"),
               rec("c3:cascade", "slm", correct=False, escalated=True, episode="ep2", task="t2", mean_logprob=-1.0),
               rec("c3", "llm", correct=True, escalated_from="c3:cascade", episode="ep2", task="t2"),
               rec("c4", "slm", correct=True, episode="ep2", task="t2")]  # accepted, not in the shadow sample
    write_run(run, records, episodes=(("ep1", "t1", True), ("ep2", "t2", False)))
    (run / "config.yaml").write_text(yaml.safe_dump({"router": {"policies": [
        {"kind": "cascade", "name": "paired", "shadow": "llm", "shadow_rate": 0.25}]}}))
    df = paired_from_run(str(run)).df.set_index("row").sort_index()
    assert df.weight.to_dict() == {"c1": 4.0, "c2": 1.0, "c3": 1.0}
    assert df.full_episode.to_dict() == {"c1": True, "c2": True, "c3": False}
    assert df.call_index.to_dict() == {"c1": 1, "c2": 2, "c3": 3} and set(df.group) == {"t1", "t2"}


def test_a_run_without_paired_outcomes_says_how_to_produce_them(tmp_path):
    run = write_run(tmp_path / "run", [rec("c1", "llm", correct=True)])
    with pytest.raises(SlmshiftError, match=r"no paired outcomes.*shadow: slm.*cascade"):
        paired_from_run(run)
    with pytest.raises(SlmshiftError, match="no interaction log"):
        paired_from_run(str(tmp_path / "empty"))


def test_pairs_csv_with_costs_clusters_and_mixed_boolean_spellings(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("prompt,slm_correct,llm_correct,slm_cost,llm_cost,call_kind,cluster,task_id,extra\n"
                 "a,true,1,0.1,1.0,intent,0,t1,x\n"
                 "b,False,yes,0.1,1.0,,1,t1,x\n"
                 "c,0,TRUE,0.2,2.0,summary,,t2,x\n")
    t = paired_from_file(str(p))
    assert t.df.slm_ok.tolist() == [True, False, False] and t.df.llm_ok.tolist() == [True, True, True]
    assert t.df.call_kind.tolist() == ["intent", "call", "summary"]
    assert t.df.cluster.tolist()[:2] == [0, 1] and pd.isna(t.df.cluster.iloc[2])
    assert t.df.task.tolist() == ["t1", "t1", "t2"] and t.has_cost and t.df.llm_cost.tolist() == [1.0, 1.0, 2.0]
    assert any("extra" in n for n in t.notes)
    req = t.requirements()
    assert req["threshold"] is None and req["learned"] is None and "slm_logprob" in req["cascade"]


def test_pairs_parquet_without_costs_or_prompts(tmp_path):
    p = tmp_path / "pairs.parquet"
    pd.DataFrame({"slm_correct": [True, False], "llm_correct": [True, True]}).to_parquet(p)
    t = paired_from_file(str(p))
    # without cost columns, cost is the share of LLM calls: SLM 0, LLM 1 per call
    assert t.df.slm_cost.tolist() == [0, 0] and t.df.llm_cost.tolist() == [1, 1] and not t.has_cost
    assert any("share of LLM calls" in n for n in t.notes)
    req = t.requirements()
    assert "prompt" in req["learned"] and req["threshold_cluster"] is not None


@pytest.mark.parametrize("text, match", [
    ("prompt,slm_correct\na,true\n", r"missing column\(s\) llm_correct"),
    ("prompt,slm_correct,llm_correct\n", "no rows"),
    ("prompt,slm_correct,llm_correct\na,true,maybe\n", r"column 'llm_correct', row 1: 'maybe' is not a boolean"),
    ("prompt,slm_correct,llm_correct\na,,true\n", r"column 'slm_correct', row 1: empty"),
    ("prompt,slm_correct,llm_correct,slm_cost,llm_cost\na,1,1,cheap,1\n", r"column 'slm_cost', row 1"),
    ("prompt,slm_correct,llm_correct,cluster\na,1,1,0.5\n", r"column 'cluster'"),
])
def test_bad_pairs_files_name_the_file_and_column(tmp_path, text, match):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(SlmshiftError, match=match) as e:
        paired_from_file(str(p))
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(SlmshiftError, match="file not found"):
        paired_from_file(str(tmp_path / "nope.csv"))


def test_gateway_pairs_are_graded_by_agreement_with_the_teacher(tmp_path):
    """No scenario grades gateway traffic: the teacher's valid answer is the reference and the SLM shadow is right when
    it agrees with it (tool calls as parsed values). A scenario's validity-only call stays ungraded, and a simulated
    teacher's answer is no reference."""
    import yaml

    call = json.dumps({"tool_calls": [{"name": "track", "arguments": {"n": 2, "carrier": "DHL"}}]})
    same = json.dumps({"tool_calls": [{"name": "track", "arguments": '{"carrier": "DHL", "n": 2}'}]})
    gw = dict(correct=None, scenario="order-support", backend="workload", expect="text")
    records = [rec("c1", "llm", output=call, **gw),
               rec("c1:shadow", "slm", output=same, shadow=True, shadow_of="c1", **gw),
               rec("c2", "llm", output=call, **gw),
               rec("c2:shadow", "slm", output="The parcel is with DHL.", shadow=True, shadow_of="c2", **gw),
               rec("c3", "llm", output="summary", correct=None),  # the run's own scenario: judged by validity
               rec("c3:shadow", "slm", output="other", correct=None, shadow=True, shadow_of="c3"),
               rec("c4", "llm", output=call, simulated=True, **gw),
               rec("c4:shadow", "slm", output="x", shadow=True, shadow_of="c4", **gw)]
    run = tmp_path / "run"
    write_run(run, records)
    (run / "config.yaml").write_text(yaml.safe_dump({"scenarios": [{"kind": "operator"}], "router": {"policies": [
        {"kind": "llm", "name": "paired", "shadow": "slm"}]}}))
    df = paired_from_run(str(run)).df.set_index("row").sort_index()
    assert df.agreement.to_dict() == {"c1": True, "c2": True, "c3": False, "c4": False}
    assert df.slm_ok.to_dict() == {"c1": True, "c2": False, "c3": True, "c4": True}  # c3, c4: validity only
    assert df.graded.to_dict() == {"c1": True, "c2": True, "c3": False, "c4": False}


def test_a_workloads_pairs_alone_and_its_named_policy(tmp_path):
    """`slmshift tune --workload ID`: only that workload's pairs, and a policy named for it that the gateway's
    `gateway.workloads` can serve."""
    import yaml

    from slmshift.platform.config import RouterSection
    from slmshift.train.routing.tune import for_workload, name_for_workload

    gw = dict(correct=None, backend="workload", expect="text")
    run = write_run(tmp_path / "run", [
        rec("c1", "llm", output="a b c", scenario="travel", **gw),
        rec("c1:shadow", "slm", output="a b c", shadow=True, shadow_of="c1", scenario="travel", **gw),
        rec("c2", "llm", output="x y z", scenario="orders", **gw),
        rec("c2:shadow", "slm", output="q", shadow=True, shadow_of="c2", scenario="orders", **gw)])
    t = for_workload(paired_from_run(run), "orders")
    assert list(t.df.row) == ["c2"] and "pairs of workload 'orders' only (1 of 2)" in t.notes
    with pytest.raises(SlmshiftError, match=r"no paired calls of that workload .*: orders, travel. Fix"):
        for_workload(paired_from_run(run), "billing")
    policy = tmp_path / "policy.yaml"
    policy.write_text("# Written by `slmshift tune`.\nkind: threshold\nname: tuned-threshold\ntau: 0.5\n")
    assert name_for_workload(str(policy), "orders") == "tuned-orders"
    assert "gateway: {workloads: {orders: tuned-orders}}" in policy.read_text()
    arm = RouterSection.model_validate({"policies": [{"file": str(policy)}]}).policies[0]
    assert (arm.kind, arm.label, arm.tau) == ("threshold", "tuned-orders", 0.5)
    renamed = RouterSection.model_validate({"policies": [{"file": str(policy), "name": "x"}]}).policies[0]
    assert renamed.label == "x" and yaml.safe_load(policy.read_text())["name"] == "tuned-orders"


def test_shadow_attempts_are_logged_and_read_back_as_the_table_each_k_gives(tmp_path):
    """`shadow_attempts: 3`: the SLM shadow answers again while its answer fails the call's check, every attempt is
    logged ('<id>:shadow:try<n>', escalated), and the pairs say which attempt the answer came from and what the
    rejected ones cost; `at_attempts(k)` is the table an SLM answering up to k times would have made."""
    import asyncio

    import yaml

    from slmshift.agents.client import Session
    from slmshift.platform.policies import policy_spec
    from slmshift.platform.types import ModelSpec
    from slmshift.serve.engines.scripted import ScriptedEngine
    from slmshift.serve.pipeline import CallPipeline, LocalHandle, MemoryLog

    class Costed(ScriptedEngine):  # token counts, so each attempt has a cost of its own
        async def generate(self, requests):
            return [r.model_copy(update={"tokens_in": 100, "tokens_out": 10}) for r in await super().generate(requests)]

    llm = ModelSpec(name="teacher", tier="llm", backend="simulated", price={"input_per_m": 1.0, "output_per_m": 2.0})
    slm = ModelSpec(name="student", tier="slm", backend="simulated", price={"input_per_m": 0.1, "output_per_m": 0.2})
    engines = {"teacher": Costed(llm, {"k": ['{"a": 1}']}),
               "student": Costed(slm, {"k": ["prose", "more prose", '{"a": 1}', '{"a": 2}']})}
    arm = {"kind": "llm", "name": "arm", "shadow": "slm", "shadow_attempts": 3}
    log = MemoryLog()
    pipeline = CallPipeline(policy=policy_spec(arm), models=[llm, slm], params={}, log=log,
                            handles={n: LocalHandle(e) for n, e in engines.items()})

    def check(text: str) -> SimpleNamespace:
        try:
            return SimpleNamespace(valid=True, correct=json.loads(text) == {"a": 1}, reason=None)
        except ValueError:
            return SimpleNamespace(valid=False, correct=None, reason="not JSON")

    async def episode() -> list:
        s = Session(pipeline, experiment_id="exp", scenario="operator", episode_id="ep1", task_id="t1")
        return [await s.call(role="planner", call_kind="k", messages=[{"role": "user", "content": f"q{i}"}],
                             check=check) for i in range(2)]

    answers = asyncio.run(episode())
    assert [a.text for a in answers] == ['{"a": 1}'] * 2  # the episode only ever saw the LLM's answers
    first, second = (r["id"] for r in log.records if not r["shadow"])
    shadows = {r["id"]: r for r in log.records if r["shadow"]}
    assert set(shadows) == {f"{first}:shadow:try1", f"{first}:shadow:try2", f"{first}:shadow", f"{second}:shadow"}
    assert shadows[f"{first}:shadow"]["retried_from"] == f"{first}:shadow:try2"
    assert all(shadows[f"{first}:shadow:try{n}"]["escalated"] for n in (1, 2))
    run = tmp_path / "run"
    # and an arm that served the SLM with one attempt: its invalid answer is all there is for any k
    write_run(run, log.records + [rec("x1", "slm", correct=None, valid=False),
                                  rec("x1:shadow", "llm", correct=True, shadow=True, shadow_of="x1")])
    (run / "config.yaml").write_text(yaml.safe_dump({"router": {"policies": [arm, {"kind": "slm", "name": "paired"}]}}))
    t = paired_from_run(str(run))
    assert t.df.set_index("row").loc["x1", "slm_attempt_cap"] == 1
    assert any("1 pair(s) whose SLM side used every attempt its arm allowed" in n for n in t.notes), t.notes
    assert not t.at_attempts(3).df.set_index("row").loc["x1", "slm_ok"]
    df = t.df.set_index("row")
    attempt_cost = shadows[f"{second}:shadow"]["cost_usd"]
    assert attempt_cost > 0 and t.max_attempts == 3
    assert df.loc[first, ["slm_attempts", "slm_attempt_cap", "slm_ok"]].tolist() == [3, 3, True]
    assert df.loc[first, "slm_tries_cost"] == pytest.approx(2 * attempt_cost)
    assert df.loc[second, ["slm_attempts", "slm_ok"]].tolist() == [1, False]  # valid, wrong: no retry
    for k, ok, valid, cost in ((1, False, False, 1), (2, False, False, 2), (3, True, True, 3)):
        v = t.at_attempts(k).df.set_index("row")
        assert (v.loc[first, "slm_ok"], v.loc[first, "slm_valid"]) == (ok, valid)
        assert v.loc[first, "slm_cost"] == pytest.approx(cost * attempt_cost)  # k of its attempts paid
        assert (v.loc[second, "slm_ok"], v.loc[second, "slm_cost"]) == (False, pytest.approx(attempt_cost))
