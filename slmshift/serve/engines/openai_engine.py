"""Any OpenAI-compatible chat endpoint (a hosted frontier model, a vLLM or Ray Serve LLM server).

`ChatCompletionsEngine` holds the one LMRequest -> chat completion -> LMResponse mapping; `OpenAIEngine` points
it at a configured endpoint, `VLLMEngine` (vllm_engine.py) at the vLLM server its replica starts.

Output constraints go through as the endpoint's own fields (`_structured`): here, OpenAI's `response_format`
(a strict JSON schema) and `tools` / `tool_choice`; a regex or grammar is refused with an error naming the fix, as
a hosted OpenAI API cannot enforce it. Tool calls the endpoint returns come back as the platform's tool-call text
(`{"tool_calls":[{"name":...,"arguments":{...}}]}`), the form the hf engine writes and the gateway parses.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any

from slmshift.platform.errors import ModelLoadError
from slmshift.platform.constraint import call_arguments, tool_call_text
from slmshift.platform.types import LMRequest, LMResponse, ModelSpec, OutputConstraint
from slmshift.serve.engines.base import Engine


class ChatCompletionsEngine(Engine):
    """Engines that talk to an OpenAI-compatible `/chat/completions`: call `_connect` in the constructor."""

    def _connect(self, base_url: str, api_key: str, timeout_s: float, max_retries: int) -> None:
        import openai

        # The SDK retries connection errors, 408/409/429 and 5xx with exponential backoff.
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s,
                                         max_retries=max_retries)
        self.logprobs = True  # switched off for endpoints that reject it

    def _structured(self, c: OutputConstraint, enforce: bool) -> dict[str, Any] | str:
        """Request fields for the constraint `c` (enforced when `enforce`), or why this endpoint cannot enforce it.
        Tools are sent whenever declared (the model may call them); an unenforced choice goes as 'auto'."""
        if c.kind == "tools" and c.tool_choice != "none":
            out = {"tools": openai_tools(c.tools), "tool_choice": c.tool_choice if enforce else "auto"}
            return out | ({"parallel_tool_calls": False} if c.parallel_tool_calls is False else {})
        if not enforce:
            return {}
        if c.kind == "json_schema":
            return {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "output", "schema": c.json_schema, "strict": True}}}
        return (f"backend {self.backend!r} cannot enforce a {c.kind} constraint (an OpenAI API takes a JSON schema or "
                "tools); serve this call on an hf or vllm model, or set the router arm's `constrain` so this tier "
                "is not constrained")

    def _error(self, message: str, t0: float, adapter: str | None = None) -> LMResponse:
        return LMResponse(text="", model=self.spec.name, tier=self.spec.tier, backend=self.backend,
                          adapter=adapter, latency_s=time.perf_counter() - t0, error=message)

    async def _complete(self, req: LMRequest, model: str, adapter: str | None = None) -> LMResponse:
        """One request as `model` at the endpoint; `adapter` is the LoRA adapter that name stands for, if any."""
        import openai

        t0 = time.perf_counter()
        base = dict(model=model, messages=req.messages, max_tokens=req.max_tokens,
                    temperature=req.temperature, seed=req.seed)
        extra = self._structured(req.constraint, req.enforced is not None)
        if isinstance(extra, str):
            return self._error(extra, t0, adapter)
        base |= extra
        try:
            try:
                r = await self.client.chat.completions.create(**base, logprobs=self.logprobs)
            except openai.BadRequestError as e:
                if not self.logprobs or "logprob" not in str(e).lower():
                    raise
                self.logprobs = False
                r = await self.client.chat.completions.create(**base)
        except Exception as e:
            return self._error(f"{type(e).__name__}: {str(e)[:300]}", t0, adapter)
        choice = r.choices[0]
        lps = [t.logprob for t in (choice.logprobs.content or [])] if choice.logprobs else []
        lps = [x for x in lps if x is not None and math.isfinite(x)]
        calls = choice.message.tool_calls or []
        text = choice.message.content or ""
        if calls:  # the platform's tool-call text; arguments that are not JSON stay as the string the model wrote
            text = tool_call_text([(c.function.name, call_arguments(c.function.arguments)) for c in calls])
        return LMResponse(
            text=text, constrained=req.enforced is not None, model=self.spec.name, tier=self.spec.tier,
            backend=self.backend,
            adapter=adapter, tokens_in=r.usage.prompt_tokens if r.usage else 0,
            tokens_out=r.usage.completion_tokens if r.usage else 0,
            latency_s=time.perf_counter() - t0, mean_logprob=sum(lps) / len(lps) if lps else None)


def openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools in the API's shape ({"type": "function", "function": {...}}), bare function specs wrapped."""
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


class OpenAIEngine(ChatCompletionsEngine):
    backend = "openai"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        opts = spec.openai
        if opts is None:
            raise ModelLoadError(f"model {spec.name!r}: backend 'openai' needs an `openai:` section with base_url")
        key = os.environ.get(opts.api_key_env)
        if key is None:
            raise ModelLoadError(
                f"model {spec.name!r}: environment variable {opts.api_key_env} (models[].openai.api_key_env) is not set. "
                f"Fix: export {opts.api_key_env}=<key> (any non-empty value for servers without auth).")
        self._connect(opts.base_url, key, opts.timeout_s, opts.max_retries)

    async def generate(self, requests: list[LMRequest]) -> list[LMResponse]:
        return list(await asyncio.gather(*(self._complete(r, self.spec.source) for r in requests)))
