import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray per test module (start-up costs seconds)."""
    import ray
    from ray import serve

    # address="local": a new cluster of our own even when a `ray start` cluster runs on the machine (plain init would
    # join it and refuse num_cpus)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             namespace="slmshift")
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from slmshift.serve.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama"))


# The models block of the end-to-end tests: a tiny random hf SLM and a perfect, near-instant simulated teacher.
MODELS_YAML = """\
models:
  - name: tiny
    tier: slm
    backend: hf
    source: {tiny}
    resources: {{num_cpus: 1}}
    price: {{input_per_m: 0.1, output_per_m: 0.2}}
    batching: {{max_batch_size: 16, batch_wait_timeout_s: 0.02}}
  - name: teacher
    tier: llm
    backend: simulated
    params: 7.0e10
    resources: {{num_cpus: 0}}
    price: {{input_per_m: 3.0, output_per_m: 15.0}}
    profile: {{accuracy: {{default: 1.0}}, latency_base_s: 0.01}}
"""


@pytest.fixture(scope="session")
def tiny_teacher_models(tiny_model_dir):
    """The `models:` YAML section shared by the end-to-end tests."""
    return MODELS_YAML.format(tiny=tiny_model_dir)


@pytest.fixture(scope="session")
def breaks_constraint():
    """`breaks_constraint(constraint, text)`: why `text` does not satisfy an OutputConstraint, or None when it does
    (llguidance, as the hf engine enforces it, over the tiny byte-level tokenizer)."""
    from slmshift.serve.engines.constraints import Grammars
    from slmshift.serve.tiny import build_tokenizer

    tok = build_tokenizer()
    return Grammars(tok, len(tok), {tok.eos_token_id}).check
