"""`POST /v1/completions`, the legacy prompt API that eval harnesses still use. Each prompt is one call: the model reads
it as a single user message (the engines serve chat models) and the S1 record's call kind is `completion`. A list of
prompts is served as that many calls, one choice each, in order."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from slmshift.serve.gateway.common import Answer, Call, SampledRequestBase, sse, stop_list
from slmshift.serve.gateway.errors import APIError, unsupported


class CompletionRequest(SampledRequestBase):
    prompt: str | list[Any]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this API
    n: int = Field(default=1, ge=1)
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None


def to_calls(req: CompletionRequest) -> list[Call]:
    for name, value, ok in (("n", req.n, req.n == 1), ("best_of", req.best_of, req.best_of in (None, 1)),
                            ("echo", req.echo, not req.echo), ("suffix", req.suffix, req.suffix is None),
                            ("logprobs", req.logprobs, not req.logprobs)):
        if not ok:
            raise unsupported(name, f"not supported by this gateway (got {value!r})")
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt: send a string or a non-empty list of strings (token ids are not supported)",
                       param="prompt")
    return [Call(model=req.model, messages=[{"role": "user", "content": p}], max_tokens=req.max_tokens or 16,
                 temperature=req.temperature or 0.0, seed=req.seed or 0, stop=stop_list(req.stop), user=req.user,
                 metadata=req.metadata or {}, kind="completion") for p in prompts]


def completion(req: CompletionRequest, answers: list[Answer], created: int, cid: str) -> dict[str, Any]:
    tokens_in, tokens_out = sum(a.tokens_in for a in answers), sum(a.tokens_out for a in answers)
    return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
            "system_fingerprint": answers[0].fingerprint,
            "choices": [{"index": i, "text": a.text, "finish_reason": a.finish, "logprobs": None}
                        for i, a in enumerate(answers)],
            "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                      "total_tokens": tokens_in + tokens_out}}


def sse_chunks(req: CompletionRequest, done: dict[str, Any]) -> list[str]:
    """A finished completion as SSE chunks: each choice's text, then its finish reason, the usage when the client
    asked for it (`stream_options.include_usage`), [DONE]."""
    base = {k: done[k] for k in ("id", "object", "created", "model", "system_fingerprint")}
    chunks = [{**base, "choices": [{"index": c["index"], "text": c["text"], "finish_reason": None, "logprobs": None}]}
              for c in done["choices"]]
    chunks += [{**base, "choices": [{"index": c["index"], "text": "", "finish_reason": c["finish_reason"],
                                     "logprobs": None}]} for c in done["choices"]]
    if (req.stream_options or {}).get("include_usage"):
        chunks.append({**base, "choices": [], "usage": done["usage"]})
    return [sse(c) for c in chunks] + ["data: [DONE]\n\n"]
