"""The openai engine against an OpenAI-compatible server on loopback: text, usage, log-probs, retries."""

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from slmshift.platform.errors import ModelLoadError
from slmshift.platform.types import LMRequest, ModelSpec, OutputConstraint
from slmshift.serve.engines.openai_engine import OpenAIEngine

SEEN: list[dict] = []


async def chat(request):
    body = await request.json()
    SEEN.append(body)
    if body["messages"][0]["content"] == "flaky" and sum(b["messages"][0]["content"] == "flaky" for b in SEEN) == 1:
        return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)  # retried by the SDK
    if body.get("logprobs") and body["model"] == "no-logprobs":
        return JSONResponse({"error": {"message": "logprobs are not supported"}}, status_code=400)
    text = "echo: " + body["messages"][-1]["content"]
    message = {"role": "assistant", "content": text}
    if body.get("tool_choice") == "required":
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone":"UTC"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]}
    content = [{"token": t, "logprob": -0.5, "bytes": None, "top_logprobs": []} for t in text.split()]
    return JSONResponse({
        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop", "message": message,
                     "logprobs": {"content": content} if body.get("logprobs") else None}],
        "usage": {"prompt_tokens": 7, "completion_tokens": len(content), "total_tokens": 7 + len(content)}})


@pytest.fixture(scope="module")
def base_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True


def engine(base_url, monkeypatch, model="m"):
    monkeypatch.setenv("TEST_KEY", "k")
    return OpenAIEngine(ModelSpec(name="remote", tier="llm", backend="openai", source=model,
                                  openai={"base_url": base_url, "api_key_env": "TEST_KEY", "max_retries": 2}))


def req(content: str, **kw) -> LMRequest:
    return LMRequest(experiment_id="e", episode_id="ep", call_index=0, scenario="s", role="r", call_kind="k",
                     messages=[{"role": "user", "content": content}], max_tokens=20, temperature=0.3, seed=5, **kw)


def test_response_format_tools_and_tool_choice_pass_through(base_url, monkeypatch):
    tools = [{"name": "get_time", "parameters": {"type": "object"}}]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = asyncio.run(engine(base_url, monkeypatch).generate([
        req("fmt", json_schema=schema), req("free", json_schema=schema, constrained=False),
        req("tools", constraint=OutputConstraint(tools=tools, tool_choice="required")),
        req("auto", constraint=OutputConstraint(tools=tools, tool_choice="auto")),
        req("rx", constraint=OutputConstraint(regex="a+"))]))
    body = {b["messages"][0]["content"]: b for b in SEEN}
    assert body["fmt"]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "output", "schema": schema, "strict": True}} and out[0].constrained
    assert "response_format" not in body["free"] and not out[1].constrained
    assert body["tools"]["tools"] == [{"type": "function", "function": tools[0]}]
    assert json.loads(out[2].text) == {"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}},
                                                      {"name": "get_time", "arguments": "not json"}]}
    assert body["auto"]["tool_choice"] == "auto" and not out[3].constrained
    assert "cannot enforce a regex constraint" in out[4].error and "rx" not in body


def test_text_usage_logprobs_and_params(base_url, monkeypatch):
    out = asyncio.run(engine(base_url, monkeypatch).generate([req("hello there"), req("b")]))
    assert [r.text for r in out] == ["echo: hello there", "echo: b"]
    assert (out[0].tokens_in, out[0].tokens_out, out[0].mean_logprob) == (7, 3, -0.5)
    assert out[0].error is None and out[0].backend == "openai" and out[0].tier == "llm"
    body = next(b for b in SEEN if b["messages"][0]["content"] == "hello there")
    assert (body["model"], body["max_tokens"], body["temperature"], body["seed"]) == ("m", 20, 0.3, 5)


def test_transient_errors_are_retried(base_url, monkeypatch):
    out = asyncio.run(engine(base_url, monkeypatch).generate([req("flaky")]))
    assert out[0].text == "echo: flaky" and out[0].error is None


def test_endpoint_without_logprobs(base_url, monkeypatch):
    e = engine(base_url, monkeypatch, model="no-logprobs")
    out = asyncio.run(e.generate([req("x")]))
    assert out[0].text == "echo: x" and out[0].mean_logprob is None and not e.logprobs


def test_unreachable_endpoint_is_a_failed_call(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = asyncio.run(engine(f"http://127.0.0.1:{port}/v1", monkeypatch).generate([req("x")]))
    assert out[0].text == "" and "APIConnectionError" in out[0].error


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    spec = ModelSpec(name="remote", tier="llm", backend="openai", source="m",
                     openai={"base_url": "http://127.0.0.1:1/v1", "api_key_env": "NOPE_KEY"})
    with pytest.raises(ModelLoadError, match="NOPE_KEY .* is not set"):
        OpenAIEngine(spec)
