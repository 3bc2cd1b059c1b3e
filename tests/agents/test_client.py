"""LMClient inside an actor: routes, checks, logs, and exports Ray metrics that Prometheus can scrape."""

import time
import urllib.request
from types import SimpleNamespace

import pytest
import ray
from ray import serve

from slmshift.platform.config import PolicySpec
from slmshift.platform.log import InteractionLog, read_interactions
from slmshift.platform.types import Hidden, ModelSpec
from slmshift.serve.deployment import deploy_models

TEACHER = ModelSpec(name="teacher", tier="llm", backend="simulated", resources={"num_cpus": 0},
                    price={"input_per_m": 1.0, "output_per_m": 2.0}, params=1e9,
                    profile={"accuracy": {"default": 1.0}})


@ray.remote(num_cpus=0)
class Agent:
    def __init__(self, handles, log):
        import logging

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        from slmshift.agents.client import LMClient

        self.client = LMClient("exp", "scn", PolicySpec(kind="llm", name="arm"), [TEACHER], handles,
                               {"teacher": 1e9}, log)

    async def episode(self, episode_id: str, answers: list[str]):
        s = self.client.episode(episode_id, "task-1")
        out = []
        for a in answers:
            r = await s.call(role="planner", call_kind="intent", messages=[{"role": "user", "content": "pick"}],
                             hidden=Hidden(answer=a),
                             check=lambda text: SimpleNamespace(valid=text.startswith("{"), correct=text == "{ok}",
                                                                reason="not JSON"))
            out.append((r.text, r.valid, r.correct, r.error))
        await self.client.drain()
        return out


@pytest.fixture(scope="module")
def agent(ray_cluster, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    handles = deploy_models([TEACHER], available_cpus=2)
    log = InteractionLog.remote(run_dir)
    return Agent.remote(handles, log), log, run_dir


def test_calls_are_checked_and_logged(agent):
    actor, log, run_dir = agent
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


def test_metrics_reach_rays_prometheus_endpoint(agent):
    actor, _, _ = agent
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
    _, log, run_dir = agent
    handles = {"teacher": serve.get_app_handle("teacher")}
    for k in range(3):  # the runner kills team actors as soon as an arm is drained
        a = Agent.remote(handles, log)
        ray.get(a.episode.remote(f"kill{k}", ["{ok}"] * 40))
        ray.kill(a)
    ray.get(log.flush.remote())
    df = read_interactions(run_dir)
    assert df[df.episode_id.str.startswith("kill")].groupby("episode_id").size().to_dict() == \
        {"kill0": 40, "kill1": 40, "kill2": 40}
