"""S4 candidate registry: the SLMs a task cluster may be moved to, with what selection weighs.

Built in (both work offline): the packaged SmolLM2-135M-Instruct (Apache-2.0) and Gemma-3-270M, the base model
(Gemma Terms of Use). More candidates are added with
`register_candidate` (tests add tiny models built by `slmshift.serve.tiny`; users add local dirs or hub ids).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.types import Batching, HFOptions, ModelSpec, Price, Resources

__all__ = ["Candidate", "register_candidate", "get_candidate", "candidates", "candidate_for_source"]


class Candidate(BaseModel):
    """One SLM that selection may pick."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Registry name.")
    source: str = Field(description="An hf source: 'packaged:…', a local model dir or a hub id.")
    params: float = Field(gt=0, description="Parameter count.")
    license: str = Field(description="Licence of the weights.")
    memory_mb: float = Field(gt=0, description="Weights footprint when served (fp32 unless stated).")
    context_length: int = Field(gt=0, description="Longest prompt + output the model takes, in tokens.")
    price: Price = Field(default_factory=Price, description="USD per 1M tokens when self-hosted (estimate).")

    def model_spec(self, *, threads: int | None = None, adapters: dict[str, str] | None = None,
                   scheduler: str = "continuous") -> ModelSpec:
        """The hf ModelSpec that serves (or evaluates) this candidate (`scheduler`: the hf engine's)."""
        fields = dict(name=self.name, tier="slm", backend="hf", source=self.source, params=self.params,
                      price=self.price, resources=Resources(num_cpus=1), batching=Batching(),
                      hf=HFOptions(threads=threads, max_input_tokens=min(self.context_length, 2048), scheduler=scheduler))
        if adapters:
            fields["adapters"] = adapters  # C2's adapter field on ModelSpec
        return ModelSpec(**fields)


_CANDIDATES: dict[str, Candidate] = {}


def register_candidate(c: Candidate) -> Candidate:
    _CANDIDATES[c.name] = c
    return c


def get_candidate(name: str) -> Candidate:
    if name not in _CANDIDATES:
        raise SlmshiftError(f"unknown SLM candidate {name!r}; registered: {', '.join(sorted(_CANDIDATES))}. "
                            "Fix: pick one of those, or pass a model source (a local dir or 'packaged:…').")
    return _CANDIDATES[name]


def candidates() -> list[Candidate]:
    return list(_CANDIDATES.values())


def candidate_for_source(source: str) -> Candidate:
    """A registered candidate by name or source; otherwise one described from the model's own config."""
    for c in _CANDIDATES.values():
        if source in (c.name, c.source):
            return c
    from pathlib import Path

    cfg_path = Path(source) / "config.json"
    if not cfg_path.is_file():
        raise SlmshiftError(f"base model {source!r} is neither a registered candidate ({', '.join(sorted(_CANDIDATES))}) "
                            "nor a local model directory with a config.json. Fix: pass one of those.")
    import json

    cfg = json.loads(cfg_path.read_text())
    params = _estimate_params(cfg)
    name = Path(source).name.replace(" ", "-") or "local"
    return Candidate(name=name, source=source, params=params, license="unknown (local model)",
                     memory_mb=round(params * 4 / 2**20, 1), context_length=int(cfg.get("max_position_embeddings", 2048)))


def _estimate_params(cfg: dict) -> float:
    """A Llama-shape estimate from config.json (embeddings + attention + MLP per layer)."""
    h, v = cfg.get("hidden_size", 64), cfg.get("vocab_size", 512)
    inter, layers = cfg.get("intermediate_size", 4 * h), cfg.get("num_hidden_layers", 1)
    emb = v * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return float(emb + layers * (4 * h * h + 3 * h * inter))


register_candidate(Candidate(
    name="smollm2-135m", source="packaged:smollm2-135m", params=134.5e6, license="Apache-2.0",
    memory_mb=round(134.5e6 * 4 / 2**20, 1), context_length=8192,
    price=Price(input_per_m=0.01, output_per_m=0.02)))
# The base (pre-trained, not instruction-tuned) Gemma-3-270M: no chat template, prompted in
# `artifacts.plain_prompt`'s format, so it needs its adapter to follow a task. ~170M of its 268M parameters are the
# 262k-token embedding, a lookup: the same two BFCL calls (12 tokens each) cost it 22.8 CPU-s against SmolLM2's
# 23.2 (2026-12-05, busy, continuous hf engine, 2 threads), and it writes ~5% fewer tokens for the same text. So
# its self-hosted price per token is SmolLM2's; what it costs more is memory (twice the footprint), which the
# rule's gate and tie-break weigh. Weights under the Gemma Terms of Use (https://ai.google.dev/gemma/terms).
register_candidate(Candidate(
    name="gemma3-270m", source="packaged:gemma3-270m", params=268.1e6, license="Gemma Terms of Use",
    memory_mb=round(268.1e6 * 4 / 2**20, 1), context_length=32768,
    price=Price(input_per_m=0.01, output_per_m=0.02)))
