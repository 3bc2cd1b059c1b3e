"""Router policies pick the tier and the model the config names."""

import pytest

from slmshift.platform.config import PolicySpec
from slmshift.platform.types import LMRequest, ModelSpec
from slmshift.serve.router import RouterPolicy, build_policy, register_policy

MODELS = [ModelSpec(name="big", tier="llm", backend="simulated"),
          ModelSpec(name="small", tier="slm", backend="simulated"),
          ModelSpec(name="small2", tier="slm", backend="simulated")]


def req(kind: str) -> LMRequest:
    return LMRequest(experiment_id="e", episode_id="ep", call_index=0, scenario="s", role="r", call_kind=kind,
                     messages=[{"role": "user", "content": "hi"}])


def test_llm_and_slm_policies():
    assert build_policy(PolicySpec(kind="llm"), MODELS).route(req("x")).model == "big"
    d = build_policy(PolicySpec(kind="slm", name="tiny"), MODELS).route(req("x"))
    assert (d.model, d.tier, d.policy, d.kind) == ("small", "slm", "tiny", "slm")


def test_named_model_overrides_first_of_tier():
    assert build_policy(PolicySpec(kind="slm", slm_model="small2"), MODELS).route(req("x")).model == "small2"


def test_call_kind_map_and_default():
    p = build_policy(PolicySpec(kind="call_kind", map={"intent": "slm"}, default="llm"), MODELS)
    assert p.route(req("intent")).tier == "slm"
    d = p.route(req("function_call"))
    assert d.tier == "llm" and "default" in d.reason


def test_unknown_policy_lists_available():
    with pytest.raises(KeyError, match="available: call_kind, llm, slm"):
        build_policy(PolicySpec.model_construct(kind="bandit"), MODELS)


def test_new_policies_drop_in():
    @register_policy("by_length")
    class ByLength(RouterPolicy):
        def choose(self, request):
            n = len(request.messages[0]["content"])
            return ("slm" if n < 10 else "llm"), "short prompt", float(n)

    d = build_policy(PolicySpec.model_construct(kind="by_length", map={}, default="llm", name=None,
                                                llm_model=None, slm_model=None), MODELS).route(req("x"))
    assert (d.tier, d.score) == ("slm", 2.0)
