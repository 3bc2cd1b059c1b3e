"""The simulated teacher follows its declared profile and answers only from the hidden reference."""

import asyncio

from slmshift.platform.types import Hidden, LMRequest, ModelSpec, SimulatedProfile
from slmshift.serve.engines.simulated import SimulatedEngine


def reqs(n, kind="intent", hidden=Hidden(answer="RIGHT", distractors=["WRONG1", "WRONG2"])):
    return [LMRequest(experiment_id="e", episode_id=f"ep{i}", task_id=f"t{i}", call_index=0, scenario="s", role="r", call_kind=kind,
                      messages=[{"role": "user", "content": "question " * 10}], hidden=hidden) for i in range(n)]


def engine(**profile):
    return SimulatedEngine(ModelSpec(name="t", tier="llm", backend="simulated", profile=SimulatedProfile(**profile)))


def test_accuracy_follows_profile_and_is_reproducible():
    e = engine(accuracy={"intent": 0.7, "default": 0.0})
    out = asyncio.run(e.generate(reqs(2000)))
    right = sum(r.text == "RIGHT" for r in out) / len(out)
    assert 0.66 < right < 0.74
    assert {r.text for r in out} == {"RIGHT", "WRONG1", "WRONG2"}
    assert [r.text for r in asyncio.run(e.generate(reqs(2000)))] == [r.text for r in out]
    assert all(r.simulated and r.tokens_in > 0 for r in out)
    assert all(r.text != "RIGHT" for r in asyncio.run(e.generate(reqs(50, kind="other"))))


def test_latency_profile_is_applied():
    e = engine(latency_base_s=0.2, latency_per_token_s=0.0)
    import time
    start = time.perf_counter()
    out = asyncio.run(e.generate(reqs(4)))
    assert time.perf_counter() - start >= 0.2
    assert all(abs(r.latency_s - 0.2) < 1e-9 for r in out)


def test_without_reference_it_answers_a_labelled_placeholder_not_a_guess():
    """A gateway call has no scenario reference: the teacher says so (deterministically, with tokens), never guesses."""
    out = asyncio.run(engine().generate(reqs(2, hidden=None)))
    assert out[0].error is None and out[0].tokens_out > 0 and out[0].simulated
    assert "[simulated" in out[0].text and "no scenario reference" in out[0].text and out[0].text == out[1].text


def test_confidence_overlaps_so_a_cascade_on_it_is_not_an_oracle():
    e = engine(accuracy={"intent": 0.5})
    out = asyncio.run(e.generate(reqs(400)))
    right = sorted(r.mean_logprob for r in out if r.text == "RIGHT")
    wrong = sorted(r.mean_logprob for r in out if r.text != "RIGHT")
    assert len(right) > 100 and len(wrong) > 100
    # a fair share of wrong answers look more confident than the median right one
    median_right = right[len(right) // 2]
    assert 0.1 < sum(w > median_right for w in wrong) / len(wrong) < 0.6


def test_same_task_same_answer_across_runs_and_arms():
    e = engine(accuracy={"intent": 0.5})
    a = asyncio.run(e.generate(reqs(200)))
    b = asyncio.run(e.generate([r.model_copy(update={"experiment_id": "other-run", "policy": "arm2",
                                                     "episode_id": "x" + r.episode_id}) for r in reqs(200)]))
    assert [r.text for r in a] == [r.text for r in b]


def test_wrong_upstream_output_costs_the_teacher_its_declared_penalty():
    bad = Hidden(answer="RIGHT", distractors=["WRONG"], upstream_ok=False)
    e = engine(accuracy={"intent": 0.9}, upstream_penalty=0.5)
    ok = sum(r.text == "RIGHT" for r in asyncio.run(e.generate(reqs(2000)))) / 2000
    hurt = sum(r.text == "RIGHT" for r in asyncio.run(e.generate(reqs(2000, hidden=bad)))) / 2000
    assert 0.87 < ok < 0.93 and 0.41 < hurt < 0.49
    unhurt = engine(accuracy={"intent": 0.9}, upstream_penalty=0.0).generate(reqs(2000, hidden=bad))
    assert 0.87 < sum(r.text == "RIGHT" for r in asyncio.run(unhurt)) / 2000 < 0.93
