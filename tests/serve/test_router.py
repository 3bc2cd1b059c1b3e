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


def test_cascade_with_a_registry_answers_first_with_the_clusters_adapter(convert_dir):
    spec = policy_spec(kind="cascade", name="tuned", tau=0.4, registry=str(convert_dir / "registry.json"))
    p = build_policy(spec, MODELS)
    d = p.route(call("Identify which functions the user request needs. Request: book a hotel in Lyon"))
    assert (d.tier, d.adapter, d.cluster, d.accept_confidence) == ("slm", "planner-intent", 0, 0.4)
    # a cluster without a promoted adapter: still SLM first (it is a cascade), on the base model
    d2 = p.route(call("Call the function with JSON arguments. Function get_time(zone). Input: time in Tokyo"))
    assert (d2.tier, d2.adapter, d2.cluster, d2.accept_confidence) == ("slm", None, 1, 0.4)
    plain = build_policy(policy_spec(kind="cascade", tau=0.4), MODELS).route(call("anything"))
    assert (plain.tier, plain.adapter, plain.cluster) == ("slm", None, None)


def test_each_cluster_goes_to_the_model_of_its_chosen_base(convert_dir, tmp_path):
    """S4 chose a base per cluster: a registry whose two promoted adapters were trained on two sources. Each model
    with the registry serves the adapters of its own source, and the policy sends each cluster's calls (and shadows)
    to that model; a registry of one base keeps routing to the one slm_model as before."""
    import json

    from slmshift.platform.artifacts import served_adapters

    doc = json.loads((convert_dir / "registry.json").read_text())
    doc["entries"][1].update(promoted=True, base_model="packaged:gemma3-270m")
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps(doc | {"clusters_dir": str(convert_dir / "clusters")}))
    models = [ModelSpec(name="big", tier="llm", backend="simulated"),
              ModelSpec(name="smol", tier="slm", backend="hf", source="packaged:smollm2-135m", registry=str(reg)),
              ModelSpec(name="gemma", tier="slm", backend="hf", source="packaged:gemma3-270m", registry=str(reg))]
    assert list(served_adapters(models[1])) == ["planner-intent"]
    assert list(served_adapters(models[2])) == ["executor-function_call"]
    policy = build_policy(policy_spec(kind="adapters", registry=str(reg)), models)
    d1 = policy.route(call("Identify which functions the user request needs. Request: book a hotel in Lyon"))
    d2 = policy.route(call("Call the function with JSON arguments. Function get_time(zone). Input: time in Tokyo"))
    assert (d1.model, d1.adapter) == ("smol", "planner-intent")
    assert (d2.model, d2.adapter) == ("gemma", "executor-function_call")
    assert policy.model_for("slm") == "smol" and policy.model_for("slm", "executor-function_call") == "gemma"
    cascade = build_policy(policy_spec(kind="cascade", tau=0.4, registry=str(reg), slm_model="gemma"), models)
    d3 = cascade.route(call("Identify which functions the user request needs. Request: book a hotel in Lyon"))
    assert (d3.model, d3.adapter) == ("smol", "planner-intent")  # its adapter's base, not the policy's slm_model


def test_fixed_policies_with_a_registry_serve_and_shadow_with_the_clusters_adapter(convert_dir):
    """The next iteration's collect: a fixed policy (what tune may choose) given the registry in force. Its own SLM
    calls and the SLM side of its LLM calls' shadows carry their cluster's promoted adapter, so tune learns from the
    adapter rather than the base SLM again; a cluster without one, and a policy without a registry, use the base."""
    import asyncio

    from slmshift.agents.client import Session
    from slmshift.serve.engines.scripted import ScriptedEngine
    from slmshift.serve.pipeline import CallPipeline, LocalHandle, MemoryLog

    registry = str(convert_dir / "registry.json")
    intent = "Identify which functions the user request needs. Request: book a hotel in Lyon"
    other = "Call the function with JSON arguments. Function get_time(zone). Input: time in Tokyo"
    for kind, kw in [("slm", {}), ("random", {"slm_share": 1.0}), ("call_kind", {"map": {"k": "slm"}})]:
        p = build_policy(policy_spec(kind=kind, registry=registry, **kw), MODELS)
        d = p.route(call(intent))
        assert (d.tier, d.model, d.adapter, d.cluster) == ("slm", "small", "planner-intent", 0), kind
        assert p.route(call(other)).adapter is None and "cluster 1" in p.route(call(other)).reason
    assert build_policy(policy_spec(kind="random", slm_share=0.0, registry=registry), MODELS).route(
        call(intent)).tier == "llm"

    teacher, student = MODELS[:2]
    for spec, want in [(policy_spec(kind="llm", shadow="slm", registry=registry), ["planner-intent", None]),
                       (policy_spec(kind="llm", shadow="slm"), [None, None])]:
        engines = {"big": ScriptedEngine(teacher, {"k": ["teacher says"]}),
                   "small": ScriptedEngine(student, {"k": ["student says"]})}
        log = MemoryLog()
        pipeline = CallPipeline(policy=spec, models=[teacher, student], log=log, params={},
                                handles={n: LocalHandle(e) for n, e in engines.items()})
        session = Session(pipeline, experiment_id="e", scenario="s", episode_id="ep", task_id="t")
        for text in (intent, other):
            asyncio.run(session.call(role="r", call_kind="k", messages=msgs(text)))
        assert [r.adapter for r in engines["small"].requests] == want
        shadows = [r for r in log.records if r["shadow"]]
        assert [r["adapter"] for r in shadows] == want and {r["tier"] for r in shadows} == {"slm"}
        assert [r.adapter for r in engines["big"].requests] == [None, None]


# --- scored policies: threshold, learned, random; failures fall back to `default` ------------------------------


def test_threshold_scores_by_call_kind_and_routes_against_tau():
    from slmshift.platform.policies import Estimate

    est = [Estimate(call_kind="intent", successes=9, trials=10), Estimate(call_kind="function_call", successes=1,
                                                                          trials=10)]
    p = build_policy(policy_spec(kind="threshold", tau=0.6, estimates=est), MODELS)
    hi, lo = p.route(req("intent")), p.route(req("function_call"))
    assert (hi.tier, lo.tier) == ("slm", "llm")
    # Beta-smoothed towards the parent (all calls: 10/20 = 0.5) with 2 pseudo-trials: (9 + 2*0.5...) / 12
    pooled = (10 + 2 * 0.5) / (20 + 2)
    assert hi.score == pytest.approx((9 + 2 * pooled) / 12) and "tau 0.600" in hi.reason
    assert p.route(req("unseen")).score == pytest.approx(pooled)  # an unseen kind gets the parent's estimate


def test_threshold_per_cluster_tau_and_broken_index_fallback(convert_dir, tmp_path):
    from slmshift.platform.policies import Estimate

    est = [Estimate(cluster=0, call_kind="k", successes=6, trials=10), Estimate(cluster=1, call_kind="k",
                                                                             successes=6, trials=10)]
    p = build_policy(policy_spec(kind="threshold", tau=0.9, tau_per_cluster={0: 0.5}, estimates=est,
                                 clusters=str(convert_dir / "clusters")), MODELS)
    d0 = p.route(call("Identify which functions the user request needs. Request: book a hotel in Lyon"))
    d1 = p.route(call("Call the function with JSON arguments. Function get_time(zone). Input: time in Tokyo"))
    assert (d0.cluster, d0.tier, d1.cluster, d1.tier) == (0, "slm", 1, "llm")  # same score, cluster 0's own tau
    (tmp_path / "clusters.json").write_text("[]")  # an index that cannot load: every call goes to `default`
    broken = build_policy(policy_spec(kind="threshold", estimates=est, clusters=str(tmp_path), default="slm"), MODELS)
    d = broken.route(call("anything"))
    assert d.tier == "slm" and "failed to load" in d.reason and "default" in d.reason


def test_learned_policy_scores_with_the_saved_classifier(tmp_path):
    import numpy as np

    from slmshift.platform.embeddings import embed
    from slmshift.platform.scorers import LearnedScorer

    texts = INTENT_PROMPTS + CALL_PROMPTS
    x = embed([f"system: You are an agent.\nuser: {t}" for t in texts])
    y = np.array([1] * len(INTENT_PROMPTS) + [0] * len(CALL_PROMPTS))
    LearnedScorer.fit(x, ["k"] * len(texts), y).save(tmp_path / "learned.joblib")
    p = build_policy(policy_spec(kind="learned", model=str(tmp_path / "learned.joblib"), tau=0.5), MODELS)
    good = p.route(call("Identify which functions the user request needs. Request: rent a car in Oslo"))
    bad = p.route(call("Call the function with JSON arguments. Function get_stock(sym). Input: price of X"))
    assert good.tier == "slm" and bad.tier == "llm" and good.score > 0.5 > bad.score


def test_random_policy_hits_its_share_and_repeats():
    p = build_policy(policy_spec(kind="random", slm_share=0.3, seed=1), MODELS)
    reqs = [LMRequest(experiment_id="e", episode_id=f"ep{i}", call_index=0, scenario="s", role="r", call_kind="k",
                      messages=[{"role": "user", "content": "hi"}]) for i in range(2000)]
    tiers = [p.route(r).tier for r in reqs]
    assert abs(tiers.count("slm") / len(tiers) - 0.3) < 0.03
    assert tiers == [p.route(r).tier for r in reqs]  # keyed by the call, so relaunches repeat it


def test_policy_file_loads_with_paths_relative_to_it_and_bad_values_name_the_field(tmp_path, convert_dir):
    from slmshift.platform.config import load_config
    from slmshift.platform.errors import ConfigError

    pol = tmp_path / "tune" / "policy.yaml"
    pol.parent.mkdir()
    (tmp_path / "clusters").symlink_to(convert_dir / "clusters")
    pol.write_text("kind: threshold\nname: tuned\ntau: 0.4\ntau_per_cluster: {1: 0.7}\nclusters: ../clusters\n"
                   "estimates: [{call_kind: k, successes: 3, trials: 4}]\n")
    head = ("experiment: {name: x}\nmodels:\n  - {name: big, tier: llm, backend: simulated}\n"
            "  - {name: small, tier: slm, backend: simulated}\n")
    yml = tmp_path / "x.yaml"
    yml.write_text(head + f"router: {{policies: [{{file: {pol}}}]}}\nscenarios: [{{kind: operator}}]\n")
    spec = load_config(yml).router.policies[0]
    assert (spec.kind, spec.label, spec.tau_per_cluster) == ("threshold", "tuned", {1: 0.7})
    assert spec.clusters == str((tmp_path / "clusters").resolve())
    assert build_policy(spec, MODELS).route(call("Identify which functions the user request needs.")).cluster == 0
    bad = [("tau: 1.5", "router.policies[0].tau (line 7): Input should be less than or equal to 1"),
           ("tau_per_cluster: {7: 0.5}, clusters: CL", "router.policies[0].tau_per_cluster (line 7): unknown cluster "
            "id(s) [7]")]
    for body, expected in bad:
        yml.write_text(head + "router:\n  policies:\n    - {kind: threshold, estimates: [{successes: 1, trials: 2}], "
                       + body.replace("CL", str(convert_dir / "clusters")) + "}\nscenarios: [{kind: operator}]\n")
        with pytest.raises(ConfigError) as e:
            load_config(yml)
        assert expected in str(e.value), str(e.value)
    pol.write_text("tau: 0.5\n")
    yml.write_text(head + f"router: {{policies: [{{file: {pol}}}]}}\nscenarios: [{{kind: operator}}]\n")
    with pytest.raises(ConfigError, match="policy file .*policy.yaml: must be a mapping with at least `kind:`"):
        load_config(yml)
    yml.write_text(head + f"router: {{policies: [{{file: {tmp_path}}}]}}\nscenarios: [{{kind: operator}}]\n")
    with pytest.raises(ConfigError, match="cannot read it \\(IsADirectoryError: .*Fix: point at a policy YAML"):
        load_config(yml)  # a directory, not a file
