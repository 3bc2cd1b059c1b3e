"""Router policies pick the tier and the model the config names."""

import pytest

from slmshift.platform.policies import policy_spec
from slmshift.platform.types import LMRequest, ModelSpec
from slmshift.serve.router import RouterPolicy, build_policy, register_policy

MODELS = [ModelSpec(name="big", tier="llm", backend="simulated"),
          ModelSpec(name="small", tier="slm", backend="simulated"),
          ModelSpec(name="small2", tier="slm", backend="simulated")]


def req(kind: str) -> LMRequest:
    return LMRequest(experiment_id="e", episode_id="ep", call_index=0, scenario="s", role="r", call_kind=kind,
                     messages=[{"role": "user", "content": "hi"}])


def test_llm_and_slm_policies():
    assert build_policy(policy_spec(kind="llm"), MODELS).route(req("x")).model == "big"
    d = build_policy(policy_spec(kind="slm", name="tiny"), MODELS).route(req("x"))
    assert (d.model, d.tier, d.policy, d.kind) == ("small", "slm", "tiny", "slm")


def test_named_model_overrides_first_of_tier():
    assert build_policy(policy_spec(kind="slm", slm_model="small2"), MODELS).route(req("x")).model == "small2"


def test_call_kind_map_and_default():
    p = build_policy(policy_spec(kind="call_kind", map={"intent": "slm"}, default="llm"), MODELS)
    assert p.route(req("intent")).tier == "slm"
    d = p.route(req("function_call"))
    assert d.tier == "llm" and "default" in d.reason


def test_unknown_policy_lists_available():
    with pytest.raises(ValueError, match="available: adapters, call_kind, cascade, learned, llm, random, slm, threshold"):
        policy_spec(kind="bandit")


def test_new_policies_drop_in_with_their_own_options_model(tmp_path):
    """A new kind registers its options model and its behaviour; the YAML schema picks it up, config.py unchanged."""
    from typing import ClassVar, Literal

    from pydantic import Field

    from slmshift.platform.config import load_config
    from slmshift.platform.policies import PolicySpec, register_policy_options

    @register_policy_options
    class ByLengthOptions(PolicySpec):
        kind: Literal["by_length"] = Field(description="SLM for short prompts.")
        max_chars: int = Field(default=10, ge=1, description="Longest prompt the SLM takes.")
        tiers_used: ClassVar[frozenset[str]] = frozenset({"llm", "slm"})

    @register_policy("by_length")
    class ByLength(RouterPolicy):
        def route(self, request):
            n = len(request.messages[0]["content"])
            return self.decision("slm" if n <= self.spec.max_chars else "llm", "prompt length", score=float(n))

    d = build_policy(policy_spec(kind="by_length", max_chars=5), MODELS).route(req("x"))
    assert (d.tier, d.score) == ("slm", 2.0)
    yml = tmp_path / "x.yaml"
    yml.write_text("experiment: {name: x}\nmodels:\n  - {name: big, tier: llm, backend: simulated}\n"
                   "  - {name: small, tier: slm, backend: simulated}\n"
                   "router: {policies: [{kind: by_length, max_chars: 0}]}\nscenarios: [{kind: operator}]\n")
    with pytest.raises(Exception, match=r"router.policies\[0\].max_chars \(line 5\): Input should be greater"):
        load_config(yml)


# --- the `adapters` policy: call -> task cluster -> promoted adapter ------------------------------------

INTENT_PROMPTS = [f"Identify which functions the user request needs. Request: book a flight to city {i}" for i in range(6)]
CALL_PROMPTS = [f"Call the function with JSON arguments. Function get_weather(city). Input: weather in town {i}"
                for i in range(6)]


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def convert_dir(tmp_path_factory):
    """A convert dir as `slmshift convert` lays it out: clusters/ (S3's index) and registry.json."""
    import numpy as np

    from slmshift.platform.artifacts import ClusterIndex, prompt_text
    from slmshift.platform.embeddings import embed
    from slmshift.train.registry import AdapterEntry, AdapterRegistry

    d = tmp_path_factory.mktemp("convert")
    groups = [embed([prompt_text(msgs(t)) for t in g]).mean(axis=0) for g in (INTENT_PROMPTS, CALL_PROMPTS)]
    clusters = [{"id": 0, "label": "planner-intent", "size": 6, "role": "planner", "call_kind": "intent"},
                {"id": 1, "label": "executor-function_call", "size": 6, "role": "executor", "call_kind": "function_call"}]
    ClusterIndex(np.stack(groups), clusters).save(d / "clusters")
    reg = AdapterRegistry.create(d / "registry.json", d / "clusters")
    for c in clusters:
        (d / "adapters" / c["label"]).mkdir(parents=True)
        (d / "adapters" / c["label"] / "adapter_config.json").write_text("{}")
        reg.add(AdapterEntry(cluster=c["id"], label=c["label"], base_model="packaged:smollm2-135m",
                             adapter_dir=str(d / "adapters" / c["label"]), promoted=c["id"] == 0))
    reg.save()
    return d


def adapter_policy(convert_dir, **kw):
    spec = policy_spec(kind="adapters", name="tuned", registry=str(convert_dir / "registry.json"), **kw)
    return build_policy(spec, MODELS)


def call(text: str) -> LMRequest:
    return LMRequest(experiment_id="e", episode_id="ep", call_index=0, scenario="s", role="r", call_kind="k",
                     messages=msgs(text))


def test_adapters_policy_routes_cluster_to_its_promoted_adapter(convert_dir):
    policy = adapter_policy(convert_dir)
    r = call("Identify which functions the user request needs. Request: book a hotel in Lyon")
    d = policy.route(r)
    assert (d.tier, d.model, d.adapter, d.kind, d.policy) == ("slm", "small", "planner-intent", "adapters", "tuned")
    assert r.adapter is None and 0.5 < d.score <= 1.0  # the decision names the adapter; the request is untouched
    # cluster 1's adapter was not promoted: the call goes to the fallback tier, without an adapter
    r2 = call("Call the function with JSON arguments. Function get_time(zone). Input: time in Tokyo")
    d2 = policy.route(r2)
    assert (d2.tier, d2.model, d2.adapter) == ("llm", "big", None)
    assert "cluster 1 has no promoted adapter" in d2.reason


def test_adapters_policy_similarity_floor_and_slm_fallback(convert_dir):
    policy = adapter_policy(convert_dir, min_similarity=0.99, default="slm", slm_model="small2")
    d = policy.route(call("Identify which functions the user request needs. Request: book a hotel in Lyon"))
    assert (d.tier, d.model, d.adapter) == ("slm", "small2", None) and "too far" in d.reason
