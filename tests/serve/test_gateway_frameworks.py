"""Agent frameworks as users run them, against the gateway: the OpenAI Agents SDK in both of its API modes (Responses,
its default, and chat completions) and Pydantic AI, each running a multi-turn tool-using agent (tool call -> tool
result -> tool call on that result -> final answer), streamed and not. Also the Responses and legacy completions
APIs driven by the plain openai SDK (the stream rebuilt from its deltas, the 400s that name a field).

The model is a scripted teacher behind the real call pipeline and a real Serve deployment: it reads the
conversation the gateway built, calls `find_city_code` on the city asked about, then `get_forecast` with the code
that tool returned, then answers with the forecast that tool returned. The tools answer with values made up per
test run, so a final answer that holds them went through both tool results.
"""

import asyncio
import json
import re
import secrets
import socket
import sys
import time

import openai
import pytest
import ray
from ray import serve

from slmshift.platform.log import read_interactions

RUN = secrets.token_hex(3)  # per run: no model could know the tools' answers without calling them
CODES = {"Oslo": f"OSL-{RUN}", "Lima": f"LIM-{RUN}", "Kyoto": f"KYO-{RUN}"}
FORECASTS = {code: f"{14 + i}C and light rain (report {RUN}{i})" for i, code in enumerate(CODES.values())}
RESULT = re.compile(r"^Result of tool call [^:]*: (.*)$", re.S)


def workload_teacher(request) -> str:
    """The scripted teacher: its next step depends on the tool results already in the conversation."""
    msgs = request.messages
    question = next(m["content"] for m in msgs if m["role"] == "user" and not RESULT.match(m["content"]))
    results = [RESULT.match(m["content"]).group(1) for m in msgs if m["role"] == "user" and RESULT.match(m["content"])]
    city = re.search(r"in (\w+)", question).group(1)
    if not results:
        return json.dumps({"tool_calls": [{"name": "find_city_code", "arguments": {"city": city}}]})
    if len(results) == 1:
        return json.dumps({"tool_calls": [{"name": "get_forecast", "arguments": {"code": results[0].strip()}}]})
    return f"The forecast for {city}: {results[-1].strip()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(ray_cluster, tmp_path_factory):
    from slmshift.platform.config import GatewaySection
    from slmshift.platform.log import InteractionLog
    from slmshift.platform.policies import policy_spec
    from slmshift.platform.types import ModelSpec
    from slmshift.serve.deployment import ModelServer
    from slmshift.serve.engines.scripted import ScriptedEngine
    from slmshift.serve.gateway import build_app

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replica imports no test module

    class ScriptedServer(ModelServer.func_or_class):  # the real model deployment, with the scripted engine
        def __init__(self, spec):
            super().__init__(spec)
            self.engine = ScriptedEngine(self.spec, answer=workload_teacher)

    port, run_dir = free_port(), str(tmp_path_factory.mktemp("gw-frameworks"))
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    teacher = ModelSpec(name="teacher", tier="llm", backend="simulated", resources={"num_cpus": 0})
    handle = serve.run(serve.deployment(ScriptedServer, name="model-teacher", max_ongoing_requests=64,
                                        ray_actor_options={"num_cpus": 0})
                       .bind(teacher.model_dump()), name="teacher", route_prefix=None)
    log = InteractionLog.remote(run_dir)
    gw = serve.run(build_app([teacher], [policy_spec(kind="llm", name="agent")], {"teacher": handle}, log, "fw",
                             GatewaySection(), [], scrub=True), name="gateway", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1", gw, run_dir
    serve.delete("gateway")
    serve.delete("teacher")


def records(gw, run_dir: str, session: str):
    gw.drain.remote().result(timeout_s=60)
    deadline = time.time() + 30
    while time.time() < deadline:
        df = read_interactions(run_dir)
        if (df.episode_id == session).any():
            return df[df.episode_id == session].sort_values("call_index")
        time.sleep(0.5)
    raise AssertionError(f"no records for session {session}")


def find_city_code(city: str) -> str:
    """The city's code."""
    return CODES[city]


def get_forecast(code: str) -> str:
    """The forecast for a city code."""
    return FORECASTS[code]


def assert_three_logged_calls(gw, run_dir, session, city, api):
    df = records(gw, run_dir, session)
    assert list(df.call_index) == [0, 1, 2] and set(df.scenario) == {f"fw-{api}"}
    assert df.error.isna().all() and (df.call_kind == "tool_call").all() and (df.backend == "scripted").all()
    assert df.valid.eq(True).all()  # two parseable tool calls and a text answer: each has its verdict
    assert json.loads(df.iloc[0].output)["tool_calls"][0]["arguments"] == {"city": city}
    assert CODES[city] in df.iloc[2].prompt and FORECASTS[CODES[city]] in df.iloc[2].output


@pytest.mark.parametrize("api,stream", [("responses", False), ("responses", True), ("chat_completions", False),
                                        ("chat_completions", True)])
def test_openai_agents_sdk_runs_a_two_tool_agent(gateway, api, stream):
    import agents

    url, gw, run_dir = gateway
    session = f"agents-{api}-{stream}"
    agents.set_tracing_disabled(True)  # its exporter would call api.openai.com
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0),
                                     use_for_tracing=False)
    agents.set_default_openai_api(api)
    try:
        agent = agents.Agent(name="forecaster", instructions="Answer weather questions with the tools.",
                             model="router:agent", tools=[agents.function_tool(find_city_code),
                                                          agents.function_tool(get_forecast)],
                             model_settings=agents.ModelSettings(extra_headers={
                                 "X-Workload-Id": f"fw-{api}", "X-Session-Id": session}))
        question = "What is the weather in Oslo?"
        if stream:
            async def run():
                result = agents.Runner.run_streamed(agent, question)
                kinds = [e.item.type async for e in result.stream_events() if e.type == "run_item_stream_event"]
                return result, kinds
            result, kinds = asyncio.run(run())
            assert kinds.count("tool_call_item") == 2 and kinds.count("tool_call_output_item") == 2
        else:
            result = agents.Runner.run_sync(agent, question)
    finally:
        agents.set_default_openai_api("responses")
    assert result.final_output == f"The forecast for Oslo: {FORECASTS[CODES['Oslo']]}"
    assert len(result.raw_responses) == 3 and all(r.usage.requests == 1 for r in result.raw_responses)
    assert_three_logged_calls(gw, run_dir, session, "Oslo", api)


@pytest.mark.parametrize("stream", [False, True])
def test_pydantic_ai_runs_a_two_tool_agent(gateway, stream):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    url, gw, run_dir = gateway
    session = f"pydantic-ai-{stream}"
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0,
                                default_headers={"X-Workload-Id": "fw-pydantic-ai", "X-Session-Id": session})
    agent = Agent(OpenAIChatModel("router:agent", provider=OpenAIProvider(openai_client=client)),
                  instructions="Answer weather questions with the tools.", tools=[find_city_code, get_forecast])
    question = "What is the weather in Lima?"
    if stream:
        async def run():
            async with agent.run_stream(question) as result:
                return "".join([d async for d in result.stream_text(delta=True)]), result
        text, result = asyncio.run(run())
    else:
        result = agent.run_sync(question)
        text = result.output
    assert text == f"The forecast for Lima: {FORECASTS[CODES['Lima']]}"
    calls = [p for m in result.all_messages() for p in m.parts if p.part_kind == "tool-call"]
    assert [c.tool_name for c in calls] == ["find_city_code", "get_forecast"]
    assert_three_logged_calls(gw, run_dir, session, "Lima", "pydantic-ai")


def test_responses_stream_rebuilds_the_output_from_its_deltas(gateway):
    url, gw, run_dir = gateway
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    tools = [{"type": "function", "name": "find_city_code", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
             {"type": "function", "name": "get_forecast", "parameters": {
                 "type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}]
    items: list = [{"role": "user", "content": "Weather in Kyoto?"}]
    with client.responses.stream(model="router:agent", input=items, tools=tools, instructions="Use the tools.",
                                 max_output_tokens=64, metadata={"session_id": "sdk-stream"}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    (call,) = final.output
    assert call.type == "function_call" and call.name == "find_city_code" and "".join(deltas) == call.arguments
    assert json.loads(call.arguments) == {"city": "Kyoto"} and final.usage is not None
    items += [call.model_dump(exclude_none=True), {"type": "function_call_output", "call_id": call.call_id,
                                                   "output": CODES["Kyoto"]}]
    second = client.responses.create(model="router:agent", input=items, tools=tools, tool_choice="required",
                                     metadata={"session_id": "sdk-stream"})
    items += [second.output[0].model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": second.output[0].call_id,
               "output": FORECASTS[CODES["Kyoto"]]}]
    with client.responses.stream(model="router:agent", input=items, tools=tools,
                                 metadata={"session_id": "sdk-stream"}) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == text == \
        f"The forecast for Kyoto: {FORECASTS[CODES['Kyoto']]}"
    df = records(gw, run_dir, "sdk-stream")
    assert list(df.call_index) == [0, 1, 2] and df.iloc[1].valid  # tool_choice required: checked, and it holds


def test_responses_refuses_what_it_cannot_do_naming_the_field(gateway):
    url, *_ = gateway
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    for kwargs, field in (({"previous_response_id": "resp_1"}, "previous_response_id"), ({"store": True}, "store"),
                          ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
                          ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
                          ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
                          ({"max_output_tokens": 0}, "max_output_tokens"), ({"model": "nope"}, "model")):
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as e:
            client.responses.create(**{"model": "router:agent", "input": "hi in Oslo", **kwargs})
        assert e.value.body["param"] == field and field.split(".")[0] in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="teacher", prompt=[1, 2, 3])
    assert e.value.body["param"] == "prompt"


def test_legacy_completions_streamed_and_not(gateway):
    url, *_ = gateway
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    r = client.completions.create(model="teacher", prompt=["Weather in Oslo?", "Weather in Lima?"], max_tokens=64,
                                  stop=["\"arguments\""])
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].text == '{"tool_calls": [{"name": "find_city_code", ' and r.choices[1].finish_reason == "stop"
    chunks = list(client.completions.create(model="teacher", prompt="Weather in Kyoto?", max_tokens=64, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices).endswith('"arguments": {"city": "Kyoto"}}]}')
    assert chunks[-1].usage is not None and not chunks[-1].choices
