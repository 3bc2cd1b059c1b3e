"""The hf engine: a local transformers causal LM, batched greedy/sampled generation on CPU or GPU.

One `generate` call runs the whole batch through a single `model.generate`, even when requests
differ in temperature, seed or max_tokens: a logits processor does the token choice per row
(argmax, or a draw from that row's own seeded generator), so a sampled request's output depends
only on its prompt, temperature and seed, never on which other requests share its batch.

LoRA adapters (`ModelSpec.adapters`, or the promoted ones of `ModelSpec.registry`) are served by peft's
mixed-batch inference: requests for different adapters and for the base model share one `generate` through
`adapter_names=[...]`. At most `hf.max_resident_adapters` are loaded; a batch that needs more is split into
groups, and loading another evicts the least recently used one.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any

from slmshift.platform.errors import ModelLoadError
from slmshift.platform.types import AdapterRegistryFile, LMRequest, LMResponse, ModelSpec
from slmshift.serve.engines.base import Engine
from slmshift.serve.sources import one_line_error, load_model_and_tokenizer


class _RowSampler:
    """Logits processor that picks each row's next token itself and records its log-prob.

    Returns scores with every token but the chosen one at -inf, so generate's own argmax keeps it.
    The log-prob is taken from the raw logits (temperature 1): the model's own confidence, comparable
    across greedy and sampled calls.
    """

    def __init__(self, temperatures: list[float], seeds: list[int]):
        self.temperatures = temperatures
        self.seeds = seeds
        self.generators: list[Any] | None = None
        self.logprobs: list[Any] = []  # one (batch,) tensor per step

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.generators is None:  # created lazily, on the device the logits live on
            self.generators = [
                torch.Generator(device=scores.device).manual_seed(s) if t > 0 else None
                for t, s in zip(self.temperatures, self.seeds)
            ]
        chosen = scores.argmax(dim=-1)
        for i, (t, gen) in enumerate(zip(self.temperatures, self.generators)):
            if gen is not None:
                probs = torch.softmax(scores[i] / t, dim=-1)
                chosen[i] = torch.multinomial(probs, 1, generator=gen)[0]
        self.logprobs.append(torch.log_softmax(scores, dim=-1).gather(1, chosen[:, None])[:, 0])
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, chosen[:, None], 0.0)
        return forced


class _RowMaxTokens:
    """Stopping criterion: row i is done once it has generated max_tokens[i] tokens."""

    def __init__(self, prompt_len: int, max_tokens: list[int]):
        import torch

        self.prompt_len = prompt_len
        self.max_tokens = torch.tensor(max_tokens)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        done = (input_ids.shape[1] - self.prompt_len) >= self.max_tokens
        return done.to(input_ids.device)


BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text a chat becomes; serving and LoRA training share it so an adapter sees the same prompts."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # base models without a template: a plain transcript ending with the assistant's turn
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def adapter_dirs(spec: ModelSpec) -> dict[str, str]:
    """Every adapter a spec may serve: name -> dir (its `adapters` plus its registry's promoted ones)."""
    dirs = dict(spec.adapters)
    if spec.registry:
        dirs.update(AdapterRegistryFile.read(spec.registry).promoted_dirs(spec.registry))
    return dirs


class HFEngine(Engine):
    backend = "hf"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-replica weight-loading bars would flood the driver's console
        if not spec.source:
            raise ModelLoadError(f"model {spec.name!r}: the hf backend needs a 'source'.")
        # Replicas share a host: use the CPUs this replica reserved, not every core.
        torch.set_num_threads(spec.hf.threads or max(1, int(spec.resources.num_cpus)))
        self.model, self.tokenizer = load_model_and_tokenizer(spec.source, spec.hf.dtype, spec.hf.device)
        self.device = next(self.model.parameters()).device
        self._n_params = sum(p.numel() for p in self.model.parameters())
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])
        self.pad_id: int = self.tokenizer.pad_token_id
        # generate() is not re-entrant and concurrent batches would only fight for the same cores.
        self._lock = threading.Lock()
        try:
            self.adapter_dirs = adapter_dirs(spec)
        except Exception as exc:
            raise ModelLoadError(f"model {spec.name!r}: {exc}") from None
        self.max_resident = spec.hf.max_resident_adapters
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.loads = 0  # adapter loads so far (evictions make it exceed the number of adapters)
        # Load the first few now, so a broken adapter dir fails the deployment, not the first request.
        for name in list(self.adapter_dirs)[: self.max_resident]:
            try:
                self._ensure_resident([name])
            except Exception as exc:
                raise ModelLoadError(f"model {spec.name!r}: adapter {name!r} ({self.adapter_dirs[name]}) failed to "
                                     f"load: {one_line_error(exc)}. Fix: point it at a peft adapter trained on "
                                     f"{spec.source!r}.") from None

    # --- adapters -----------------------------------------------------------------------------

    @property
    def resident_adapters(self) -> list[str]:
        return list(self._resident)

    def _ensure_resident(self, names: list[str]) -> None:
        """Load `names` (at most max_resident of them), then evict the least recently used others. The caller
        holds `_lock` (or is the constructor), so no generate runs meanwhile."""
        from peft import PeftModel

        for name in names:
            if name in self._resident:
                self._resident.move_to_end(name)
                continue
            # Load before evicting: a failed load then leaves the resident set as it was.
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(self.adapter_dirs[name], adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, self.adapter_dirs[name], adapter_name=name,
                                                       is_trainable=False).eval()
            self._resident[name] = None
            self.loads += 1
            while len(self._resident) > self.max_resident:
                victim = next(v for v in self._resident if v not in names)
                with warnings.catch_warnings():  # "active adapter deleted": we pass adapter_names per batch anyway
                    warnings.simplefilter("ignore", UserWarning)
                    self.model.delete_adapter(victim)
                del self._resident[victim]

    def num_parameters(self) -> float | None:
        return self._n_params  # the base model's: LoRA adds a rounding error to the FLOPs estimate

    # --- request preparation ------------------------------------------------------------------

    def _prompt_ids(self, req: LMRequest) -> list[int]:
        tok = self.tokenizer
        ids = tok(chat_prompt(tok, req.messages), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("the prompt is empty after applying the chat template")
        return ids[-self.spec.hf.max_input_tokens :]  # left-truncate: keep the latest turns

    def _response(self, req: LMRequest, **kw: Any) -> LMResponse:
        return LMResponse(model=self.spec.name, tier=self.spec.tier, backend=self.backend, adapter=req.adapter, **kw)

    # --- generation ---------------------------------------------------------------------------

    async def generate(self, requests: list[LMRequest]) -> list[LMResponse]:
        out: list[LMResponse | None] = [None] * len(requests)
        batch: list[tuple[int, LMRequest, list[int]]] = []
        for i, req in enumerate(requests):
            if req.adapter is not None and req.adapter not in self.adapter_dirs:
                known = ", ".join(sorted(self.adapter_dirs))
                out[i] = self._response(
                    req, text="", error=f"adapter {req.adapter!r} requested, but it is not loaded on model "
                    f"{self.spec.name!r} ({'adapters: ' + known if known else 'no adapters configured'})"
                )
                continue
            try:
                batch.append((i, req, self._prompt_ids(req)))
            except Exception as exc:  # a bad prompt fails only its own request
                out[i] = self._response(req, text="", error=f"prompt preparation failed: {one_line_error(exc)}")
        for group in self._groups(batch):
            t0 = time.perf_counter()
            try:
                results = await asyncio.to_thread(self._run_batch, [(r, ids) for _, r, ids in group])
                latency = time.perf_counter() - t0
                for (i, req, _), res in zip(group, results):
                    res.pop("token_ids")
                    out[i] = self._response(req, latency_s=latency, **res)
            except Exception as exc:
                err = f"generation failed: {one_line_error(exc)}"
                for i, req, _ in group:
                    out[i] = self._response(req, text="", error=err, latency_s=time.perf_counter() - t0)
        return [r for r in out if r is not None]

    def _groups(self, batch: list[tuple[int, LMRequest, list[int]]]) -> list[list[tuple[int, LMRequest, list[int]]]]:
        """Split a batch so each part needs at most `max_resident` adapters (usually one part: all of it)."""
        groups: list[list[tuple[int, LMRequest, list[int]]]] = []
        by_adapter: dict[str | None, list[tuple[int, LMRequest, list[int]]]] = {}
        for item in batch:
            by_adapter.setdefault(item[1].adapter, []).append(item)
        current: list[tuple[int, LMRequest, list[int]]] = []
        names: set[str] = set()
        for name, items in by_adapter.items():
            if name is not None and len(names) >= self.max_resident:
                groups.append(current)
                current, names = [], set()
            current += items
            if name is not None:
                names.add(name)
        if current:
            groups.append(current)
        return groups

    def _run_batch(self, items: list[tuple[LMRequest, list[int]]]) -> list[dict[str, Any]]:
        """Blocking: left-pad, generate, cut each row at its own max_tokens / EOS, decode."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        width = max(len(ids) for _, ids in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, (_, ids) in enumerate(items):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        max_tokens = [req.max_tokens for req, _ in items]
        sampler = _RowSampler([req.temperature for req, _ in items], [req.seed for req, _ in items])
        # A clean config: the model's own sampling defaults (top_k, repetition penalty, ...) would
        # otherwise reshape the logits before our sampler sees them.
        config = GenerationConfig(
            max_new_tokens=max(max_tokens),
            do_sample=False,
            num_beams=1,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            bos_token_id=self.model.generation_config.bos_token_id,
        )
        wanted = [req.adapter for req, _ in items]
        with self._lock, torch.inference_mode():
            extra: dict[str, Any] = {}
            if any(wanted):
                self._ensure_resident(sorted({a for a in wanted if a}))
                extra["adapter_names"] = [a or BASE for a in wanted]
            elif self._resident:  # a peft-wrapped model: base-only batches run with every adapter off
                extra["adapter_names"] = [BASE] * len(items)
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([_RowMaxTokens(width, max_tokens)]),
                **extra,
            )
        generated = sequences[:, width:].cpu().tolist()
        logprobs = torch.stack(sampler.logprobs).float().cpu() if sampler.logprobs else None
        results = []
        for row, (req, ids) in enumerate(items):
            toks = generated[row][: req.max_tokens]
            end = next((j for j, t in enumerate(toks) if t in self.eos_ids), None)
            if end is not None:
                toks = toks[: end + 1]  # count the EOS: the model spent a step emitting it
            mean_lp = float(logprobs[: len(toks), row].mean()) if toks and logprobs is not None else None
            results.append(
                {
                    "text": self.tokenizer.decode(toks, skip_special_tokens=True),
                    "tokens_in": len(ids),
                    "tokens_out": len(toks),
                    "mean_logprob": mean_lp,
                    "token_ids": toks,
                }
            )
        return results
