"""`POST /v1/responses`: OpenAI's Responses request onto a `Call`, an `Answer` back as a Response object or as the
Responses event stream (created, in_progress, output item / content part / delta / done events, completed) from
which the openai SDK's `responses.stream()` rebuilds the output.

The input is turned into chat-shaped messages first (instructions as the system message, `function_call` items as an
assistant's tool calls, `function_call_output` items as tool results), so an agent's prompts read the same in the S1
log whichever API it speaks. The gateway keeps no responses: `previous_response_id`, `conversation` and `store: true`
are refused with a 400 naming them, and the client sends the whole conversation in `input` (what the OpenAI Agents
SDK does by default).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from pydantic import Field

from slmshift.serve.gateway.common import (Answer, Call, RequestBase, function_spec, new_id, text_of,
                                           to_messages, tool_choice_of)
from slmshift.serve.gateway.errors import APIError, unsupported

ROLES = ("user", "system", "developer", "assistant")


class ResponsesRequest(RequestBase):  # fields we do not use (include, reasoning, truncation, ...) are ignored
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None


def _refuse_state(req: ResponsesRequest) -> None:
    why = "this gateway stores no responses; send the whole conversation in `input`"
    if req.previous_response_id is not None:
        raise unsupported("previous_response_id", why)
    if req.conversation is not None:
        raise unsupported("conversation", why)
    if req.store:
        raise unsupported("store", "this gateway stores no responses; set store to false or leave it out")
    if req.background:
        raise unsupported("background", "responses are answered in the request; leave background out")


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """`instructions` + `input` as chat-shaped messages (role, content, tool_calls, tool_call_id)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return out + [{"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            if item.get("role") not in ROLES:
                raise APIError(400, f"input.{i}.role: expected one of {', '.join(ROLES)} (got {item.get('role')!r})",
                               param=f"input.{i}.role")
            out.append({"role": item["role"], "content": text_of(item.get("content"))})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise APIError(400, f"input.{i}.name: a function_call item needs the function's name",
                               param=f"input.{i}.name")
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments", "")}}
            if out and out[-1]["role"] == "assistant":  # one assistant turn: its text and the calls it made
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else text_of(output)})
        elif kind == "reasoning":
            continue  # another provider's reasoning replayed by the client: nothing a model here can read
        else:
            raise APIError(400, f"input.{i}.type: {kind!r} is not supported here (message, function_call, "
                           f"function_call_output)", param=f"input.{i}.type")
    return out


def to_call(req: ResponsesRequest) -> Call:
    _refuse_state(req)
    tools = [function_spec(t, f"tools.{i}") for i, t in enumerate(req.tools or [])]
    fmt = (req.text or {}).get("format") or {"type": "text"}
    if fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"text.format.type: expected text, json_object or json_schema (got {fmt.get('type')!r})",
                       param="text.format.type")
    wants_json = fmt["type"] != "text"
    meta = req.metadata or {}
    seed = getattr(req, "seed", None)  # not a Responses field; taken when a client sends it, as chat's
    return Call(model=req.model, messages=to_messages(chat_messages(req), tools, fmt.get("schema"), wants_json),
                tools=tools, tool_choice=tool_choice_of(req.tool_choice, {t["name"] for t in tools}),
                parallel_tool_calls=req.parallel_tool_calls is not False, json_schema=fmt.get("schema"),
                wants_json=wants_json, max_tokens=req.max_output_tokens or 512, temperature=req.temperature or 0.0,
                seed=seed if isinstance(seed, int) else 0, user=req.user, metadata=meta,
                kind="tool_call" if tools else "json" if wants_json else "chat")


def response(req: ResponsesRequest, call: Call, a: Answer, created: int, rid: str) -> dict[str, Any]:
    """The Response object: the answer's output items (function calls, or one assistant message), usage, and the
    request's settings echoed as OpenAI does."""
    incomplete = a.finish == "length"
    if a.tool_calls:
        output = [{"type": "function_call", "id": new_id("fc_"), "call_id": c["id"],
                   "name": c["name"], "arguments": c["arguments"], "status": "completed"} for c in a.tool_calls]
    else:
        output = [{"type": "message", "id": new_id("msg_"), "role": "assistant",
                   "status": "incomplete" if incomplete else "completed",
                   "content": [{"type": "output_text", "text": a.text, "annotations": [], "logprobs": []}]}]
    return {"id": rid, "object": "response", "created_at": created, "completed_at": created,
            "status": "incomplete" if incomplete else "completed", "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "metadata": req.metadata or {}, "model": req.model, "output": output,
            "parallel_tool_calls": call.parallel_tool_calls, "temperature": req.temperature, "top_p": req.top_p,
            "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "max_output_tokens": req.max_output_tokens, "previous_response_id": None, "store": False,
            "text": req.text or {"format": {"type": "text"}}, "truncation": "disabled", "user": req.user,
            "usage": {"input_tokens": a.tokens_in, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": a.tokens_out, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": a.tokens_in + a.tokens_out}}


def sse_events(done: dict[str, Any]) -> list[str]:
    """A finished Response as the Responses event stream. The engines answer a call whole, so each output item
    comes as one delta; the events still build the output up item by item as OpenAI's stream does."""
    seq = itertools.count()

    def ev(type_: str, **body: Any) -> str:
        return f"event: {type_}\ndata: {json.dumps({'type': type_, 'sequence_number': next(seq), **body})}\n\n"

    start = {**done, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None,
             "completed_at": None}
    out = [ev("response.created", response=start), ev("response.in_progress", response=start)]
    for i, item in enumerate(done["output"]):
        at = {"item_id": item["id"], "output_index": i}
        if item["type"] == "message":
            part = item["content"][0]
            out += [ev("response.output_item.added", output_index=i, item={**item, "status": "in_progress",
                                                                          "content": []}),
                    ev("response.content_part.added", **at, content_index=0, part={**part, "text": ""}),
                    ev("response.output_text.delta", **at, content_index=0, delta=part["text"], logprobs=[]),
                    ev("response.output_text.done", **at, content_index=0, text=part["text"], logprobs=[]),
                    ev("response.content_part.done", **at, content_index=0, part=part)]
        else:
            out += [ev("response.output_item.added", output_index=i, item={**item, "status": "in_progress",
                                                                          "arguments": ""}),
                    ev("response.function_call_arguments.delta", **at, delta=item["arguments"]),
                    ev("response.function_call_arguments.done", **at, name=item["name"],
                       arguments=item["arguments"])]
        out.append(ev("response.output_item.done", output_index=i, item=item))
    out.append(ev("response.completed" if done["status"] == "completed" else "response.incomplete", response=done))
    return out
