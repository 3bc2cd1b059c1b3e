"""The call pipeline inside an actor: routes, checks, logs, escalates (cascade), shadows (paired outcomes), and
exports Ray metrics that Prometheus can scrape."""

import json
import time
import urllib.request
from types import SimpleNamespace

import pytest
import ray
from ray import serve

from slmshift.platform.log import InteractionLog, read_interactions
from slmshift.platform.policies import policy_spec
from slmshift.platform.types import Hidden, ModelSpec
from slmshift.serve.deployment import deploy_models

TEACHER = ModelSpec(name="teacher", tier="llm", backend="simulated", resources={"num_cpus": 0},
                    price={"input_per_m": 1.0, "output_per_m": 2.0}, params=1e9,
                    profile={"accuracy": {"default": 1.0}})
# A simulated SLM: wrong on `hard` calls (it answers the distractor), right and unsure on `unsure`, right and sure
# elsewhere; log-probs without spread so a cascade's decisions are exact here.
STUDENT = ModelSpec(name="student", tier="slm", backend="simulated", resources={"num_cpus": 0},
                    price={"input_per_m": 0.1, "output_per_m": 0.2},
                    profile={"accuracy": {"default": 1.0, "hard": 0.0}, "mean_logprob_right": -0.05,
                             "mean_logprob_wrong": -0.05, "mean_logprob_sd": 0.0})
UNSURE = STUDENT.model_copy(update={"name": "unsure", "profile": STUDENT.profile.model_copy(
    update={"mean_logprob_right": -3.0})})


@ray.remote(num_cpus=0)
class Agent:
    def __init__(self, handles, log, policy=None, models=(TEACHER,)):
        import logging

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        from slmshift.agents.client import Session
        from slmshift.platform.log import LogClient
        from slmshift.serve.pipeline import CallPipeline

        self.log = LogClient(log)
        self.pipeline = CallPipeline(policy=policy or policy_spec(kind="llm", name="arm"), models=list(models),
                                     handles=handles, params={"teacher": 1e9}, log=self.log)
        self.session = lambda episode_id: Session(self.pipeline, experiment_id="exp", scenario="scn",
                                                  episode_id=episode_id, task_id="task-1")

    async def episode(self, episode_id: str, answers: list[str], call_kind: str = "intent"):
        s = self.session(episode_id)
        out = []
        for a in answers:
            r = await s.call(role="planner", call_kind=call_kind, messages=[{"role": "user", "content": "pick"}],
                             hidden=Hidden(answer=a, distractors=["prose, not JSON"]),
                             check=lambda text: SimpleNamespace(valid=text.startswith("{"), correct=text == "{ok}",
                                                                reason="not JSON"))
            out.append((r.text, r.valid, r.correct, r.error))
        await self.log.drain()
        return out


@pytest.fixture(scope="module")
def agent(ray_cluster, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    handles = deploy_models([TEACHER, STUDENT, UNSURE], available_cpus=2)
    log = InteractionLog.remote(run_dir)
    return Agent.remote(handles, log), log, run_dir, handles


def test_calls_are_checked_and_logged(agent):
    actor, log, run_dir, _ = agent
    out = ray.get(actor.episode.remote("ep1", ["{ok}", "prose, not JSON"]))
    assert out == [("{ok}", True, True, None), ("prose, not JSON", False, False, "not JSON")]
    ray.get(actor.episode.remote("ep1", ["{ok}", "{ok}"]))  # a retried episode overwrites its records
    ray.get(log.flush.remote())
    df = read_interactions(run_dir).sort_values("call_index")
    assert len(df) == 2 and list(df.output) == ["{ok}", "{ok}"]
    row = df.iloc[0]
    assert (row.model, row.tier, row.policy, row.route_kind, row.role) == ("teacher", "llm", "arm", "llm", "planner")
    assert row.cost_usd == pytest.approx((row.tokens_in * 1.0 + row.tokens_out * 2.0) / 1e6)
    assert row.flops == pytest.approx(2e9 * (row.tokens_in + row.tokens_out)) and row.latency_s > 0
    assert row.max_tokens == 128  # the budget it was served with (Session's default): S4/S5 generate with it


def test_metrics_reach_rays_prometheus_endpoint(agent):
    actor, _, _, _ = agent
    ray.get(actor.episode.remote("ep2", ["{ok}"]))
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:  # Ray exports on an interval
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        if "ray_slmshift_calls_total" in text and "ray_slmshift_engine_batch_size" in text:
            break
        time.sleep(2)
    calls = [ln for ln in text.splitlines() if ln.startswith("ray_slmshift_calls_total{")]
    assert any('model="teacher"' in ln and 'call_kind="intent"' in ln and 'policy="arm"' in ln for ln in calls), calls
    assert "ray_slmshift_call_latency_s_bucket" in text and "ray_slmshift_cost_usd_total" in text
    assert "ray_slmshift_engine_batch_size_bucket" in text


def test_records_survive_the_agent_being_killed_after_drain(agent, ray_cluster):
    _, log, run_dir, _ = agent
    handles = {"teacher": serve.get_app_handle("teacher")}
    for k in range(3):  # the runner kills team actors as soon as an arm is drained
        a = Agent.remote(handles, log)
        ray.get(a.episode.remote(f"kill{k}", ["{ok}"] * 40))
        ray.kill(a)
    ray.get(log.flush.remote())
    df = read_interactions(run_dir)
    assert df[df.episode_id.str.startswith("kill")].groupby("episode_id").size().to_dict() == \
        {"kill0": 40, "kill1": 40, "kill2": 40}


def records(log, run_dir, prefix, include_shadow=True):
    ray.get(log.flush.remote())
    df = read_interactions(run_dir, include_shadow=include_shadow)
    return df[df.episode_id.str.startswith(prefix)].sort_values(["episode_id", "call_index", "id"])


def test_cascade_escalates_invalid_output_and_links_both_records(agent):
    _, log, run_dir, handles = agent
    a = Agent.remote(handles, log, policy_spec(kind="cascade", tau=0.5), (TEACHER, STUDENT))
    out = ray.get(a.episode.remote("casc-hard", ["{ok}"], "hard"))
    assert out == [("{ok}", True, True, None)]  # the LLM's answer reached the agent
    df = records(log, run_dir, "casc-hard")
    slm, llm = df[df.tier == "slm"].iloc[0], df[df.tier == "llm"].iloc[0]
    assert slm.escalated and slm.id == f"{llm.id}:cascade" and llm.escalated_from == slm.id and not llm.escalated
    assert slm.output == "prose, not JSON" and slm.valid is False or slm.valid == False  # noqa: E712
    assert "check failed" in slm.route_reason and slm.cost_usd > 0 and llm.cost_usd > 0


def test_cascade_escalates_low_confidence_and_keeps_confident_answers(agent):
    _, log, run_dir, handles = agent
    unsure = Agent.remote(handles, log, policy_spec(kind="cascade", tau=0.5), (TEACHER, UNSURE))
    ray.get(unsure.episode.remote("casc-unsure", ["{ok}"]))
    df = records(log, run_dir, "casc-unsure")
    assert sorted(df.tier) == ["llm", "slm"] and "confidence 0.050 < 0.5" in df[df.tier == "slm"].iloc[0].route_reason
    sure = Agent.remote(handles, log, policy_spec(kind="cascade", tau=0.5), (TEACHER, STUDENT))
    ray.get(sure.episode.remote("casc-sure", ["{ok}"]))
    df = records(log, run_dir, "casc-sure")
    assert list(df.tier) == ["slm"] and not df.iloc[0].escalated and "accepted: confidence 0.951" in df.iloc[0].route_reason


def test_shadow_calls_are_graded_logged_apart_and_never_change_the_episode(agent):
    _, log, run_dir, handles = agent
    a = Agent.remote(handles, log, policy_spec(kind="llm", name="paired", shadow="slm"), (TEACHER, STUDENT))
    out = ray.get(a.episode.remote("shadow-1", ["{ok}", "{ok}"], "hard"))
    assert out == [("{ok}", True, True, None)] * 2  # the wrong shadow answer never reached the agent
    df = records(log, run_dir, "shadow-1")
    main, shadow = df[~df.shadow.astype(bool)], df[df.shadow.astype(bool)]
    assert len(main) == 2 and len(shadow) == 2 and set(shadow.tier) == {"slm"}
    assert set(shadow.id) == {f"{i}:shadow" for i in main.id} and set(shadow.shadow_of) == set(main.id)
    assert list(shadow.correct) == [False, False] and list(main.correct) == [True, True]
    assert len(records(log, run_dir, "shadow-1", include_shadow=False)) == 2  # excluded from the log by default


def test_shadow_rate_samples_whole_episodes(agent):
    """shadow_rate draws episodes, not calls: a sampled episode has every call shadowed, any other none, so tune
    can compose an episode's outcome from its pairs."""
    _, log, run_dir, handles = agent
    a = Agent.remote(handles, log, policy_spec(kind="llm", shadow="slm", shadow_rate=0.3), (TEACHER, STUDENT))
    sampled = 0
    for i in range(30):
        ray.get(a.episode.remote(f"rate-{i:02d}", ["{ok}"] * 3))
        n = int(records(log, run_dir, f"rate-{i:02d}").shadow.astype(bool).sum())
        assert n in (0, 3), n
        sampled += n == 3
    assert 3 <= sampled <= 17, sampled  # ~9 of 30


@pytest.mark.parametrize("constrain, slm_on, llm_on", [("slm", True, False), ("all", True, True),
                                                        ("none", False, False)])
def test_constrain_option_sets_each_tiers_request_and_the_record_says_so(constrain, slm_on, llm_on):
    """An arm's `constrain` decides per tier whether the engine enforces the call's constraint (here: an SLM call
    shadowed on the LLM); each S1 record keeps the constraint and whether it was enforced."""
    import asyncio

    from slmshift.agents.client import Session
    from slmshift.platform.types import LMResponse, OutputConstraint
    from slmshift.serve.engines.scripted import ScriptedEngine
    from slmshift.serve.pipeline import CallPipeline, LocalHandle, MemoryLog

    class Enforcing(ScriptedEngine):  # reports what an enforcing engine would
        async def generate(self, requests):
            self.requests += requests
            return [LMResponse(text='{"a":1}', model=self.spec.name, tier=self.spec.tier, backend=self.backend,
                               constrained=r.enforced is not None) for r in requests]

    engines = {m.name: Enforcing(m) for m in (TEACHER, STUDENT)}
    log = MemoryLog()
    pipeline = CallPipeline(policy=policy_spec(kind="slm", name="arm", shadow="llm", constrain=constrain),
                            models=[TEACHER, STUDENT], handles={n: LocalHandle(e) for n, e in engines.items()},
                            params={}, log=log)
    session = Session(pipeline, experiment_id="exp", scenario="scn", episode_id="ep", task_id="t")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    asyncio.run(session.call(role="r", call_kind="k", messages=[{"role": "user", "content": "x"}], expect="json",
                             json_schema=schema))
    assert [r.constrained for r in engines["student"].requests] == [slm_on]
    assert [r.constrained for r in engines["teacher"].requests] == [llm_on]
    by_tier = {r["tier"]: r for r in log.records}
    assert (by_tier["slm"]["constrained"], by_tier["llm"]["constrained"]) == (slm_on, llm_on)
    assert OutputConstraint.model_validate_json(by_tier["slm"]["constraint"]) == OutputConstraint(
        format="json", json_schema=schema)


def _retry_run(attempts: int, answers: list[str], episode: str = "ep", **policy: object
               ) -> tuple[list[dict], object, list]:
    """One SLM call of an arm with `slm_attempts`, the SLM scripted to give `answers` in turn, checked for JSON."""
    import asyncio

    from slmshift.agents.client import Session
    from slmshift.serve.engines.scripted import ScriptedEngine
    from slmshift.serve.pipeline import CallPipeline, LocalHandle, MemoryLog

    engines = {"teacher": ScriptedEngine(TEACHER, {"k": ['{"a":1}']}),
               "student": ScriptedEngine(STUDENT, {"k": answers})}
    log = MemoryLog()
    pipeline = CallPipeline(policy=policy_spec({"kind": "slm", "name": "arm", "slm_attempts": attempts, **policy}),
                            models=[TEACHER, STUDENT], handles={n: LocalHandle(e) for n, e in engines.items()},
                            params={}, log=log)
    session = Session(pipeline, experiment_id="exp", scenario="scn", episode_id=episode, task_id="t")

    def is_json(text: str) -> SimpleNamespace:  # the call's own check: a positive signal, never an exit status
        try:
            json.loads(text)
            return SimpleNamespace(valid=True, correct=True, reason=None)
        except ValueError:
            return SimpleNamespace(valid=False, correct=None, reason="not JSON")

    result = asyncio.run(session.call(role="r", call_kind="k", messages=[{"role": "user", "content": "x"}],
                                      expect="json", check=is_json))
    return log.records, result, engines["student"].requests


def test_slm_attempts_retry_until_the_check_passes_and_log_every_attempt():
    """slm_attempts: an answer that fails the call's check is logged as a rejected attempt and sampled again; the
    first that passes is the answer, and names the last rejected attempt. Attempts stop at the limit."""
    records, result, asked = _retry_run(4, ["not json", "still not", '{"a":2}'])
    assert result.text == '{"a":2}' and result.valid is True
    assert [r["id"].rsplit(":", 1)[-1] if r["escalated"] else "answer" for r in records] == ["try1", "try2", "answer"]
    assert [r["valid"] for r in records] == [False, False, True]
    answer = records[-1]
    assert answer["retried_from"] == records[1]["id"] and not answer["escalated"]
    assert answer["latency_s"] >= records[0]["latency_s"] + records[1]["latency_s"]
    assert [r.temperature for r in asked] == [0.0, 0.7, 0.7] and len({r.seed for r in asked}) == 3
    other = _retry_run(4, ["not json", "still not", '{"a":2}'], episode="ep2")[2]
    assert asked[0].seed == other[0].seed and asked[1].seed != other[1].seed  # each call's retries draw their own
    records, result, asked = _retry_run(2, ["not json", "nope", '{"a":2}'])
    assert len(asked) == 2 and result.valid is False and records[-1]["retried_from"].endswith(":try1")
    records, result, asked = _retry_run(4, ['{"a":3}'])  # a valid first answer: no retry
    assert len(asked) == 1 and len(records) == 1 and records[0]["retried_from"] is None


def test_slm_attempts_come_before_a_cascade_escalates():
    """A cascade escalates only once every SLM attempt failed its check; the LLM's record names the last one."""
    records, result, asked = _retry_run(3, ["x", "y", "z"], kind="cascade", tau=0.0)
    assert len(asked) == 3 and result.escalated and result.text == '{"a":1}'
    assert [r["tier"] for r in records] == ["slm", "slm", "slm", "llm"]
    assert [r["escalated"] for r in records] == [True, True, True, False]
    assert records[2]["id"].endswith(":cascade") and records[2]["retried_from"].endswith(":try2")
    assert records[3]["escalated_from"] == records[2]["id"]


def test_a_detached_shadow_never_delays_the_answer_and_is_logged_when_done():
    """The gateway's pipelines (`detached_shadows`): a call returns while its shadow is still running on a slow tier;
    the shadow is logged when it finishes, or when `settle` waits for it. Past the bound a call waits for its own
    shadow, so shadows cannot pile up."""
    import asyncio

    from slmshift.serve.engines.scripted import ScriptedEngine
    from slmshift.serve.pipeline import CallPipeline, LocalHandle, MemoryLog
    from slmshift.platform.types import LMRequest

    class Gated(ScriptedEngine):  # the SLM: answers only once the test opens the gate
        async def generate(self, requests):
            await self.gate.wait()
            return await super().generate(requests)

    async def run() -> None:
        slm = Gated(STUDENT, {"k": ["slow"]})
        slm.gate = asyncio.Event()
        log = MemoryLog()
        pipeline = CallPipeline(policy=policy_spec(kind="llm", name="arm", shadow="slm"), models=[TEACHER, STUDENT],
                                handles={"teacher": LocalHandle(ScriptedEngine(TEACHER, {"k": ["fast"]})),
                                         "student": LocalHandle(slm)}, params={}, log=log, detached_shadows=1)

        def req(i: int) -> LMRequest:
            return LMRequest(experiment_id="e", episode_id="s", call_index=i, scenario="w", role="r", call_kind="k",
                             task_id="t", policy="arm", messages=[{"role": "user", "content": "x"}])

        first = await asyncio.wait_for(pipeline.call(req(0)), 5)  # answered with the SLM gate still shut
        assert first.text == "fast" and pipeline.running_shadows == 1
        assert [r["shadow"] for r in log.records] == [False]
        second = asyncio.ensure_future(pipeline.call(req(1)))  # the bound (1) is taken: this one waits for its shadow
        await asyncio.sleep(0.2)
        assert not second.done() and len(log.records) == 2
        slm.gate.set()
        assert (await asyncio.wait_for(second, 5)).text == "fast"
        assert await pipeline.settle(5) == 0 and pipeline.running_shadows == 0
        shadows = [r for r in log.records if r["shadow"]]
        assert sorted(r["shadow_of"] for r in shadows) == sorted(r["id"] for r in log.records if not r["shadow"])
        assert {r["output"] for r in shadows} == {"slow"} and len(log.records) == 4

    asyncio.run(run())
