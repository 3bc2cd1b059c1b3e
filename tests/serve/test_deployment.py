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
