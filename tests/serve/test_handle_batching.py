"""Handle-side micro-batching: calls gathered into one Serve request, each answered (or failed) on its own."""

from __future__ import annotations

import asyncio

import pytest

from slmshift.platform.types import Hidden, LMRequest, ModelSpec
from slmshift.serve.handle_batching import BatchingHandle, handle_batch_ms, wrap_handles


def req(i: int) -> LMRequest:
    return LMRequest(experiment_id="e", episode_id=f"ep{i}", call_index=i, scenario="s", role="r", call_kind="k",
                     task_id=f"t{i}", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8,
                     hidden=Hidden(answer=f"answer {i}", distractors=[f"wrong {i}"]))


def teacher(**batching) -> ModelSpec:
    return ModelSpec(name="teacher", tier="llm", backend="simulated", resources={"num_cpus": 0},
                     profile={"accuracy": {"default": 0.5}}, batching=batching)


def test_window_defaults_on_for_simulated_engines_only():
    assert handle_batch_ms(teacher()) == 2.0
    assert handle_batch_ms(teacher(handle_batch_ms=0)) == 0.0
    assert handle_batch_ms(teacher(handle_batch_ms=7.5)) == 7.5
    hf = ModelSpec(name="slm", tier="slm", backend="hf", source="packaged:smollm2-135m")
    assert handle_batch_ms(hf) == 0.0
    wrapped = wrap_handles({"teacher": "h1", "slm": "h2"}, [teacher(), hf])
    assert isinstance(wrapped["teacher"], BatchingHandle) and wrapped["slm"] == "h2"
    with pytest.raises(ValueError, match="window_ms > 0"):
        BatchingHandle("h", 0)


def test_calls_through_serve_are_gathered_and_answered_one_by_one(ray_cluster):
    from slmshift.serve.deployment import deploy_models

    handle = deploy_models([teacher()], available_cpus=2)["teacher"]
    requests = [req(i) for i in range(40)]

    async def plain():
        return await asyncio.gather(*(handle.remote(q) for q in requests))

    async def batched(h):
        return await asyncio.gather(*(h.remote(q) for q in requests), return_exceptions=True)

    expected = asyncio.run(plain())
    wrapped = BatchingHandle(handle, window_ms=5, max_batch=16)
    got = asyncio.run(batched(wrapped))
    assert [r.text for r in got] == [r.text for r in expected]  # each call got its own answer, in its place
    assert len({r.text for r in got}) > 20 and 3 <= wrapped.batches <= 6  # 40 calls, batches of <= 16
    assert wrapped.info.remote().result(timeout_s=30)["backend"] == "simulated"  # other methods pass through

    # one bad call fails alone; the calls batched with it are answered
    mixed = [req(0), "not a request", req(2)]

    async def with_bad():
        return await asyncio.gather(*(wrapped.remote(q) for q in mixed), return_exceptions=True)

    good0, bad, good2 = asyncio.run(with_bad())
    assert good0.text == expected[0].text and good2.text == expected[2].text
    assert isinstance(bad, Exception) and "str" in str(bad)

    # a failure of the Serve request itself reaches every call in it
    broken = BatchingHandle(handle, window_ms=5, method="no_such_method")
    outs = asyncio.run(batched(broken))
    assert len(outs) == 40 and all(isinstance(o, Exception) for o in outs) and broken.batches <= 3


class _Recorder:
    """Stands in for a deployment's generate_many, in-process, to check the wrapper's own timing rules."""

    def __init__(self):
        self.sizes: list[int] = []

    @property
    def generate_many(self):
        return self

    def remote(self, requests):
        self.sizes.append(len(requests))

        async def answer():
            return [ValueError(f"bad {r}") if r < 0 else r * 10 for r in requests]
        return answer()


def test_window_and_max_batch_decide_what_travels_together():
    rec = _Recorder()
    h = BatchingHandle(rec, window_ms=20, max_batch=4)

    async def run():
        first = [h.remote(i) for i in range(6)]  # 4 fill a batch at once, 2 wait for the window
        await asyncio.sleep(0.05)
        late = h.remote(7)  # after the window: its own batch
        return await asyncio.gather(*first, late, h.remote(-1), return_exceptions=True)

    out = asyncio.run(run())
    assert out[:7] == [0, 10, 20, 30, 40, 50, 70] and isinstance(out[7], ValueError)
    assert rec.sizes == [4, 2, 2]
    # a fresh event loop starts clean

    async def again():
        return await h.remote(3)

    assert asyncio.run(again()) == 30 and rec.sizes[-1] == 1
