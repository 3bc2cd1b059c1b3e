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
