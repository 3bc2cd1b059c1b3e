"""`POST /v1/chat/completions`: OpenAI's chat request onto a `Call`, an `Answer` back as a completion or SSE chunks."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmshift.serve.gateway.common import (Answer, Call, SampledRequestBase, function_spec, sse, stop_list,
                                           to_messages, tool_choice_of)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatRequest(SampledRequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def to_call(req: ChatRequest) -> Call:
    tools = [function_spec(t, f"tools.{i}") for i, t in enumerate(req.tools or [])]
    fmt = req.response_format or {}
    wants_json = fmt.get("type") in ("json_object", "json_schema")
    return Call(model=req.model, messages=to_messages([m.model_dump() for m in req.messages], tools,
                                                       fmt.get("json_schema", {}).get("schema"), wants_json),
                tools=tools, tool_choice=tool_choice_of(req.tool_choice, {t["name"] for t in tools}),
                parallel_tool_calls=req.parallel_tool_calls is not False,
                json_schema=fmt.get("json_schema", {}).get("schema"), wants_json=wants_json,
                max_tokens=req.max_completion_tokens or req.max_tokens or 512, temperature=req.temperature or 0.0,
                seed=req.seed or 0, stop=stop_list(req.stop), user=req.user, metadata=req.metadata or {},
                kind="tool_call" if tools else "json" if wants_json else "chat")


def completion(req: ChatRequest, a: Answer, created: int, cid: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None if a.tool_calls else a.text}
    if a.tool_calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in a.tool_calls]
    return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
            "system_fingerprint": a.fingerprint,
            "choices": [{"index": 0, "message": message, "finish_reason": a.finish, "logprobs": None}],
            "usage": {"prompt_tokens": a.tokens_in, "completion_tokens": a.tokens_out,
                      "total_tokens": a.tokens_in + a.tokens_out}}


def sse_chunks(done: dict[str, Any]) -> list[str]:
    """A finished completion as OpenAI's SSE chunks: role, content (or tool calls), finish, usage, [DONE]. The
    engines answer a request whole, so the content comes as one chunk."""
    base = {"id": done["id"], "object": "chat.completion.chunk", "created": done["created"], "model": done["model"],
            "system_fingerprint": done["system_fingerprint"]}
    msg, finish = done["choices"][0]["message"], done["choices"][0]["finish_reason"]
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    if msg.get("tool_calls"):
        deltas.append({"tool_calls": [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]})
    elif msg.get("content"):
        deltas.append({"content": msg["content"]})
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({**base, "choices": [], "usage": done["usage"]})
    return [sse(c) for c in chunks] + ["data: [DONE]\n\n"]
