"""Models on Ray Serve: a tiny random Llama behind the hf engine, batching, and clear load errors."""

import asyncio

import pytest

from slmshift.platform.errors import ModelLoadError
from slmshift.platform.types import LMRequest, ModelSpec
from slmshift.serve.deployment import deploy_models


def req(i: int, max_tokens: int = 8) -> LMRequest:
    return LMRequest(experiment_id="e", episode_id=f"ep{i}", call_index=0, scenario="s", role="r", call_kind="k",
                     messages=[{"role": "user", "content": f"say something about {i}"}], max_tokens=max_tokens)


def test_tiny_llama_served_through_serve_with_batching(ray_cluster, tiny_model_dir):
    spec = ModelSpec(name="tiny", tier="slm", backend="hf", source=tiny_model_dir,
                     resources={"num_cpus": 1}, batching={"max_batch_size": 8})
    handle = deploy_models([spec], available_cpus=2)["tiny"]
    assert handle.info.remote().result(timeout_s=60)["params"] > 0

    async def many():
        return await asyncio.gather(*(handle.remote(req(i)) for i in range(8)))

    out = asyncio.run(many())
    assert len(out) == 8 and all(r.error is None and r.model == "tiny" and r.tier == "slm" for r in out)
    assert all(0 < r.tokens_out <= 8 and r.tokens_in > 0 and r.mean_logprob <= 0 for r in out)
    # the eight concurrent requests reached the continuous engine as they arrived and ran in one batch
    stats = handle.info.remote().result(timeout_s=60)["stats"]
    assert stats["peak_rows"] > 1 and stats["mean_decode_rows"] > 1
    # greedy decoding is the same alone and in a batch
    alone = handle.remote(req(3)).result(timeout_s=60)
    assert alone.text == out[3].text
    # several calls in one Serve request: one answer each, in order, and a failure stays with its own call
    many_out = handle.generate_many.remote([req(3), "not a request", req(5)]).result(timeout_s=60)
    assert many_out[0].text == out[3].text and many_out[2].text == out[5].text
    assert isinstance(many_out[1], Exception) and "str" in str(many_out[1])


def test_engine_that_fails_to_load_is_a_clear_error(ray_cluster, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    spec = ModelSpec(name="broken", tier="slm", backend="hf", source=str(empty), resources={"num_cpus": 0})
    with pytest.raises(ModelLoadError, match="Model 'broken' .* failed to load: .*Fix: check models"):
        deploy_models([spec], available_cpus=2)


def test_too_many_cpus_reserved_fails_before_serve_hangs():
    spec = ModelSpec(name="big", tier="slm", backend="simulated", resources={"num_cpus": 2}, replicas=2)
    with pytest.raises(ModelLoadError, match="reserve 4 CPUs .* has 2"):
        deploy_models([spec], available_cpus=2)


def test_overload_is_rejected_fast_with_backpressure(ray_cluster):
    """10x the load a deployment is configured for: a bounded queue, the rest rejected at once, the replica lives."""
    import time

    from ray.serve.exceptions import BackPressureError

    from slmshift.platform.types import Hidden

    spec = ModelSpec(name="slow", tier="llm", backend="simulated", max_ongoing_requests=1, max_queued_requests=2,
                     resources={"num_cpus": 0}, batching={"max_batch_size": 1, "handle_batch_ms": 0},
                     profile={"accuracy": {"default": 1.0}, "latency_base_s": 1.0})
    handle = deploy_models([spec], available_cpus=2)["slow"]

    def ask(i):
        return req(i).model_copy(update={"hidden": Hidden(answer="ok")})

    async def fire():
        async def one(i):
            t0 = time.perf_counter()
            try:
                await handle.remote(ask(i))
                return "ok", time.perf_counter() - t0
            except BackPressureError:
                return "rejected", time.perf_counter() - t0
        return await asyncio.gather(*(one(i) for i in range(12)))

    out = asyncio.run(fire())
    ok = [t for o, t in out if o == "ok"]
    rejected = [t for o, t in out if o == "rejected"]
    assert 1 <= len(ok) <= 4 and len(rejected) >= 8, out
    assert max(rejected) < 1.0  # rejected before the 1 s model time, not after waiting
    assert asyncio.run(asyncio.wait_for(handle.remote(ask(99)), 30)).text == "ok"
    with pytest.raises(ValueError, match="-1 .no bound. or a positive"):
        ModelSpec(name="z", tier="llm", backend="simulated", max_queued_requests=0)


def test_pipeline_waits_the_retry_after_a_shedding_deployment_states(ray_cluster):
    """A deployment that sheds load says how long to wait (the model's `retry_after_s`, on every BackPressureError);
    the call pipeline waits at least that long before sending a shed call again, and every call gets through once
    the burst has drained."""
    import time

    from ray.serve.exceptions import BackPressureError

    from slmshift.platform.policies import policy_spec
    from slmshift.platform.types import Hidden
    from slmshift.serve.pipeline import CallPipeline, MemoryLog

    spec = ModelSpec(name="shedder", tier="llm", backend="simulated", max_ongoing_requests=1, max_queued_requests=1,
                     retry_after_s=2.0, resources={"num_cpus": 0},
                     batching={"max_batch_size": 1, "handle_batch_ms": 0},
                     profile={"accuracy": {"default": 1.0}, "latency_base_s": 1.0})
    handle = deploy_models([spec], available_cpus=2)["shedder"]

    class Recorded:  # the real handle; notes when each attempt was sent, how it ended and the wait it was told
        def __init__(self, handle):
            self.handle, self.attempts = handle, []

        def remote(self, request):
            return self._send(request)

        async def _send(self, request):
            t0 = time.monotonic()
            try:
                out = await self.handle.remote(request)
            except BackPressureError as e:
                self.attempts.append((request.episode_id, t0, time.monotonic(), e.retry_after_s))
                raise
            self.attempts.append((request.episode_id, t0, time.monotonic(), None))
            return out

    recorded = Recorded(handle)
    log = MemoryLog()
    pipeline = CallPipeline(policy=policy_spec(kind="llm", name="arm"), models=[spec], handles={"shedder": recorded},
                            params={}, log=log)

    async def burst():
        return await asyncio.gather(*(pipeline.call(req(i).model_copy(update={"hidden": Hidden(answer="ok")}))
                                      for i in range(4)))

    out = asyncio.run(burst())
    shed = [a for a in recorded.attempts if a[3] is not None]
    assert shed, "the burst was not shed: the test proves nothing"
    assert {a[3] for a in shed} == {2.0}  # what the deployment states is the model's retry_after_s
    for episode, _, rejected_at, _ in shed:
        later = [t0 for e, t0, _, _ in recorded.attempts if e == episode and t0 > rejected_at]
        assert later and min(later) - rejected_at >= 2.0, (episode, rejected_at, later)
    assert [r.text for r in out] == ["ok"] * 4 and not any(r["infra_error"] for r in log.records)
