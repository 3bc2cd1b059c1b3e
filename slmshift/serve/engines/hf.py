"""The hf engine: a local transformers causal LM, batched greedy/sampled generation on CPU or GPU.

Two schedulers (`hf.scheduler`). 'continuous' (the default): `submit` hands each request to a step loop
(`scheduler.py`) that admits it into the running batch at the next decode step, prefills prompts in chunks
and reuses the KV of shared prompt prefixes; Serve feeds requests as they arrive. 'static': `@serve.batch`
waves, each through one `model.generate`, as described below. Both choose tokens the same way.

In the static path, one `generate` call runs the whole batch through a single `model.generate`, even when requests
differ in temperature, seed or max_tokens: a logits processor does the token choice per row
(argmax, or a draw from that row's own seeded generator), so a sampled request's output depends
only on its prompt, temperature and seed, never on which other requests share its batch.

LoRA adapters (`ModelSpec.adapters`, or the promoted ones of `ModelSpec.registry`) are served by peft's
mixed-batch inference: requests for different adapters and for the base model share one `generate` through
`adapter_names=[...]`. At most `hf.max_resident_adapters` are loaded; a batch that needs more is split into
groups, and loading another evicts the least recently used one.

Output constraints (`LMRequest.held`: a JSON schema, regex, Lark grammar, forced tool call, or under tools 'auto' a
well-formed call if the answer is one) are enforced per row by both schedulers with llguidance (constraints.py):
compiled once per content, masked into each constrained row's logits before its token is chosen, and closed before
the budget cuts it (`RowMatcher.pick`). Log-probs stay raw (before the mask).
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any

from slmshift.platform.errors import ModelLoadError, one_line_error
from slmshift.platform.artifacts import chat_prompt, served_adapters
from slmshift.platform.types import LMRequest, LMResponse, ModelSpec
from slmshift.serve.engines.base import Engine
from slmshift.serve.engines.constraints import ConstraintError, Grammars, RowMatcher, choose_tokens
from slmshift.serve.engines.scheduler import Row, Scheduler
from slmshift.serve.sources import load_model_and_tokenizer


class _RowSampler:
    """Logits processor that picks each row's next token itself and records its log-prob.

    Returns scores with every token but the chosen one at -inf, so generate's own argmax keeps it.
    The log-prob is taken from the raw logits (temperature 1): the model's own confidence, comparable
    across greedy and sampled calls. A row with a matcher chooses among the tokens its grammar allows, until it
    has emitted EOS or its max_tokens (generate keeps calling for finished rows; they are padded anyway).
    """

    def __init__(self, temperatures: list[float], seeds: list[int], matchers: list[RowMatcher | None],
                 max_tokens: list[int], eos_ids: set[int]):
        self.temperatures = temperatures
        self.seeds = seeds
        self.generators: list[Any] | None = None
        self.logprobs: list[Any] = []  # one (batch,) tensor per step
        self.matchers = list(matchers)
        self.max_tokens, self.eos_ids = max_tokens, eos_ids
        self.errors: list[str | None] = [None] * len(temperatures)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.generators is None:  # created lazily, on the device the logits live on
            self.generators = [
                torch.Generator(device=scores.device).manual_seed(s) if t > 0 else None
                for t, s in zip(self.temperatures, self.seeds)
            ]
        step = len(self.logprobs) + 1
        chosen, logprobs = choose_tokens(scores, self.matchers, self.temperatures, self.generators,
                                         [m - step for m in self.max_tokens])
        self.logprobs.append(logprobs)
        for i, m in enumerate(self.matchers):
            if m is not None:
                tok = int(chosen[i])
                self.errors[i] = m.advance(tok)
                if self.errors[i] or tok in self.eos_ids or step >= self.max_tokens[i]:
                    self.matchers[i] = None  # the row is done: stop masking it
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


class PromptTooLong(ValueError):
    """A prompt over hf.max_input_tokens: its request fails with this message."""


def adapter_dirs(spec: ModelSpec) -> dict[str, str]:
    """Every adapter a spec may serve: name -> dir (its `adapters` plus its registry's promoted ones trained on its
    source; `artifacts.served_adapters`)."""
    return served_adapters(spec)


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
        self.continuous = spec.hf.scheduler == "continuous"
        # on a GPU eager decoding is bound by per-step launch overhead: a static cache lets generate() compile it
        self.static_cache = spec.hf.static_cache if spec.hf.static_cache is not None else self.device.type == "cuda"
        self._scheduler: Scheduler | None = None
        self._grammars: Grammars | None = None  # made at the first constrained request (the vocabulary scan)
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

    def _prepare_adapters(self, names: set[str]) -> bool:
        """Continuous scheduler: make `names` resident together, evicting only others; False if they cannot be."""
        if len(names) > self.max_resident:
            return False
        self._ensure_resident(sorted(names))
        return True

    def num_parameters(self) -> float | None:
        return self._n_params  # the base model's: LoRA adds a rounding error to the FLOPs estimate

    # --- request preparation ------------------------------------------------------------------

    def _prompt_ids(self, req: LMRequest) -> list[int]:
        tok = self.tokenizer
        ids = tok(chat_prompt(tok, req.messages), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("the prompt is empty after applying the chat template")
        limit = self.spec.hf.max_input_tokens
        if len(ids) > limit:  # truncating would silently drop the instructions at the prompt's start
            raise PromptTooLong(
                f"prompt is {len(ids)} tokens, over the limit of {limit} (models[].hf.max_input_tokens of model "
                f"{self.spec.name!r}); shorten the prompt or raise hf.max_input_tokens (the model's context is "
                f"{getattr(self.model.config, 'max_position_embeddings', 'unknown')} tokens)")
        return ids

    def _prepare(self, req: LMRequest) -> list[int] | LMResponse:
        """Prompt ids, or the error response that ends this request here."""
        if req.adapter is not None and req.adapter not in self.adapter_dirs:
            known = ", ".join(sorted(self.adapter_dirs))
            return self._response(
                req, text="", error=f"adapter {req.adapter!r} requested, but it is not loaded on model "
                f"{self.spec.name!r} ({'adapters: ' + known if known else 'no adapters configured'})")
        try:
            return self._prompt_ids(req)
        except PromptTooLong as exc:
            return self._response(req, text="", error=str(exc))
        except Exception as exc:  # a bad prompt fails only its own request
            return self._response(req, text="", error=f"prompt preparation failed: {one_line_error(exc)}")

    async def _matcher(self, req: LMRequest) -> RowMatcher | LMResponse | None:
        """The row's grammar matcher when the request must be constrained, None when not, or the error response
        for a constraint that does not compile."""
        if req.held is None:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size, self.eos_ids)
        try:  # a cache hit is microseconds; a compile (or the first, tokenizer-scanning use) is not
            return await asyncio.to_thread(self._grammars.matcher, req.held)
        except ConstraintError as exc:
            return self._response(req, text="", error=str(exc))

    def _response(self, req: LMRequest, **kw: Any) -> LMResponse:
        return LMResponse(model=self.spec.name, tier=self.spec.tier, backend=self.backend, adapter=req.adapter, **kw)

    # --- generation ---------------------------------------------------------------------------

    # --- continuous scheduler -------------------------------------------------------------------

    def _forward(self, input_ids: Any, cache: Any, adapters: list[str | None], **kw: Any) -> Any:
        """One model step for the scheduler: last-position logits, rows' adapters applied (peft mixed batch)."""
        if any(adapters) or self._resident:
            kw["adapter_names"] = [a or BASE for a in adapters]
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1, :]

    def _get_scheduler(self) -> Scheduler:
        if self._scheduler is None:
            hf = self.spec.hf
            self._scheduler = Scheduler(
                forward=self._forward, prepare_adapters=self._prepare_adapters, config=self.model.config,
                eos_ids=self.eos_ids, decode=lambda t: self.tokenizer.decode(t, skip_special_tokens=True),
                device=self.device, dtype=next(self.model.parameters()).dtype,
                attn_impl=getattr(self.model.config, "_attn_implementation", None) or "eager",
                kv_bytes=hf.kv_cache_mb * 2**20, prefix_bytes=hf.prefix_cache_mb * 2**20,
                max_rows=self.spec.batching.max_batch_size, prefill_chunk=hf.prefill_chunk_tokens, lock=self._lock)
        return self._scheduler

    async def submit(self, request: LMRequest) -> LMResponse:
        """One request into the running batch (continuous scheduler); returns when its own tokens are done."""
        if not self.continuous:
            return (await self.generate([request]))[0]
        t0 = time.perf_counter()
        ids = self._prepare(request)
        if isinstance(ids, LMResponse):
            return ids
        matcher = await self._matcher(request)
        if isinstance(matcher, LMResponse):
            return matcher
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(result: dict[str, Any] | str) -> None:  # called from the scheduler thread
            try:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))
            except RuntimeError:  # the caller's loop is gone
                pass

        row = Row(ids=ids, max_tokens=request.max_tokens, temperature=request.temperature, seed=request.seed,
                  adapter=request.adapter, done=done, matcher=matcher)
        fut.add_done_callback(lambda f: setattr(row, "cancelled", f.cancelled()))
        self._get_scheduler().submit(row)
        result = await fut
        latency = time.perf_counter() - t0
        if isinstance(result, str):
            return self._response(request, text="", error=result, latency_s=latency, tokens_in=len(ids))
        result.pop("token_ids")
        result.pop("cached_tokens")
        return self._response(request, latency_s=latency, **result)

    def stats(self) -> dict[str, Any]:
        """Scheduler counters (steps, mean rows per decode step, prefix-cache hits) and grammar-cache counters."""
        return (self._scheduler.stats() if self._scheduler else {}) | (self._grammars.stats() if self._grammars else {})

    def check_health(self) -> None:
        if self._scheduler is not None and not self._scheduler.alive():
            raise RuntimeError(f"model {self.spec.name!r}: the continuous scheduler's step loop died; Serve restarts "
                               "this replica (the replica's log has the traceback)")

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()

    # --- static batches -------------------------------------------------------------------------

    async def generate(self, requests: list[LMRequest]) -> list[LMResponse]:
        if self.continuous:
            return list(await asyncio.gather(*(self.submit(r) for r in requests)))
        out: list[LMResponse | None] = [None] * len(requests)
        batch: list[tuple[int, LMRequest, list[int]]] = []
        matchers: dict[int, RowMatcher | None] = {}
        for i, req in enumerate(requests):
            ids = self._prepare(req)
            matcher = await self._matcher(req) if not isinstance(ids, LMResponse) else None
            if isinstance(ids, LMResponse) or isinstance(matcher, LMResponse):
                out[i] = ids if isinstance(ids, LMResponse) else matcher
            else:
                batch.append((i, req, ids))
                matchers[id(req)] = matcher
        for group in self._groups(batch):
            t0 = time.perf_counter()
            try:
                results = await asyncio.to_thread(self._run_batch, [(r, ids) for _, r, ids in group],
                                                  [matchers[id(r)] for _, r, _ in group])
                latency = time.perf_counter() - t0
                for (i, req, _), res in zip(group, results):
                    res.pop("token_ids")
                    if res.get("error"):
                        out[i] = self._response(req, text="", error=res["error"], latency_s=latency)
                    else:
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

    def _run_batch(self, items: list[tuple[LMRequest, list[int]]],
                   matchers: list[RowMatcher | None] | None = None) -> list[dict[str, Any]]:
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
        matchers = matchers or [None] * len(items)
        sampler = _RowSampler([req.temperature for req, _ in items], [req.seed for req, _ in items], matchers,
                              max_tokens, self.eos_ids)
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
            if self.static_cache and "adapter_names" not in extra:  # peft's per-row adapters are not compilable
                config.cache_implementation = "static"
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
                    "constrained": matchers[row] is not None,
                    **({"error": f"constrained decoding failed: {sampler.errors[row]}"} if sampler.errors[row] else {}),
                }
            )
        return results
