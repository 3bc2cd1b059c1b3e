"""The OpenAI-compatible gateway, driven by the real `openai` SDK (sync, async, streaming, tool calls, JSON mode),
against `slmshift gateway` started as users start it; its calls land in the S1 log."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest

from slmshift.platform.log import read_interactions

YAML = """\
experiment: {{name: gw, storage: {storage}}}
ray: {{num_cpus: 2, dashboard: false}}
models:
  - {{name: teacher, tier: llm, backend: simulated, resources: {{num_cpus: 0}},
     price: {{input_per_m: 3.0, output_per_m: 15.0}}}}
  - {{name: tiny, tier: slm, backend: hf, source: {tiny}, resources: {{num_cpus: 1}}}}
router:
  policies:
    - {{kind: call_kind, name: mixed, map: {{chat: slm}}, default: llm}}
    - {{kind: llm, name: tuned-for-mapped}}
    - {{kind: llm, name: strict, constrain: all}}
    - {{kind: llm, name: paired, shadow: slm}}
gateway: {{port: {port}, workloads: {{mapped-agent: tuned-for-mapped}}, inline: [teacher]}}
"""
# The teacher is served inside the ingress replica (gateway.inline), the tiny SLM by its own deployment: the tests
# below cross both paths.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("gw")
    port = free_port()
    cfg = tmp / "gw.yaml"
    cfg.write_text(YAML.format(storage=tmp / "runs", tiny=tiny_model_dir, port=port))
    env = {k: v for k, v in os.environ.items() if k != "SLMSHIFT_GATEWAY_API_KEYS"}
    # started with SIGINT ignored, as a background job (`nohup ... &`, some CI runners) starts it: Ctrl-C must still
    # stop it cleanly (the last test)
    proc = subprocess.Popen([sys.executable, "-m", "slmshift.cli", "gateway", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gateway exited: {proc.stdout.read()}")
        try:
            client.models.list()
            break
        except (openai.APIConnectionError, openai.NotFoundError):  # the proxy answers 404 until the app is up
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("gateway did not come up")
    yield client, port, tmp, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_models_lists_policies_and_deployed_models(gateway):
    client, *_ = gateway
    assert {m.id for m in client.models.list()} == {"router:mixed", "router:tuned-for-mapped", "router:strict",
                                                    "router:paired", "teacher", "tiny"}


def test_chat_through_the_router_sync_and_async(gateway):
    client, port, *_ = gateway
    r = client.chat.completions.create(model="router:mixed", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=5, extra_headers={"X-Workload-Id": "my-agent",
                                                                    "X-Session-Id": "s1"})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens > 0 and r.system_fingerprint.startswith("slmshift:tiny")  # chat -> the SLM

    async def many():
        aclient = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(aclient.chat.completions.create(
            model="teacher", messages=[{"role": "user", "content": f"q{i}"}], user="async-agent") for i in range(4)))

    outs = asyncio.run(many())
    assert all("[simulated teacher" in o.choices[0].message.content for o in outs)  # labelled, never an error


def test_streaming_in_openai_sse_format(gateway):
    client, *_ = gateway
    stream = client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "[simulated teacher" in text and chunks[-1].usage.total_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tool_calls_come_back_in_openai_shape(gateway):
    """The tiny random model cannot call tools; a scripted prior turn shows the parser on untrusted text instead,
    and a real call with tools still answers (content, since the output is not a tool call)."""
    from slmshift.serve.gateway import parse_tool_calls

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    calls = parse_tool_calls('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}', tools)
    assert calls[0]["type"] == "function" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert parse_tool_calls('get_weather(city="Oslo")', tools)[0]["function"]["name"] == "get_weather"
    assert parse_tool_calls('__import__("os").system("x")', tools) is None  # never evaluated, not a declared tool
    assert parse_tool_calls('{"name": "rm_rf", "arguments": {}}', tools) is None
    client, *_ = gateway
    r = client.chat.completions.create(
        model="tiny", tools=tools, max_tokens=4,
        messages=[{"role": "user", "content": "weather?"},
                  {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                      "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_required_tool_call_is_enforced_on_the_slm(gateway):
    """`tool_choice` reaches the engine as the call's output constraint: the tiny random SLM (its arm constrains the
    SLM tier) answers with a call of the named tool, in both APIs; a schema llguidance rejects is a 400 naming it."""
    client, *_ = gateway
    params = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"],
              "additionalProperties": False}  # else a random model writes keys until max_tokens
    r = client.chat.completions.create(
        model="tiny", max_tokens=48, messages=[{"role": "user", "content": "weather?"}], tool_choice="required",
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": params}}])
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["city"] in ("Oslo", "Lima")
    # The grammar admits several calls (parallel tool calls; `parallel_tool_calls: false` bounds it to one, tested
    # below): on some prompts the random model keeps adding calls until max_tokens. On these two it stops after one.
    r = client.responses.create(model="tiny", input="Weather in Oslo?", max_output_tokens=48,
                                tool_choice={"type": "function", "name": "get_weather"},
                                tools=[{"type": "function", "name": "get_weather", "parameters": params},
                                       {"type": "function", "name": "get_time",
                                        "parameters": {"type": "object", "additionalProperties": False}}])
    assert [(o.type, o.name) for o in r.output] == [("function_call", "get_weather")]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="x", text={"format": {
            "type": "json_schema", "name": "n", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}})
    assert e.value.body["param"] == "text.format" and e.value.body["code"] == "invalid_format"


def test_a_format_a_routed_engine_cannot_enforce_is_a_400_naming_the_option(gateway):
    """An arm that holds the LLM tier to the format (`constrain: all`) while a simulated engine serves it: a forced
    tool call or a JSON schema is refused with a 400 naming the option, never silently ignored; the same arm without
    a format, or with tools left to the model (`auto`), answers."""
    client, *_ = gateway
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "weather?"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="router:strict", messages=msgs, tools=tools, tool_choice="required")
    assert e.value.body["param"] == "tool_choice" and "'teacher' (simulated)" in e.value.body["message"]
    assert "constrain: all" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="router:strict", messages=msgs, response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"
    assert client.chat.completions.create(model="router:strict", messages=msgs, tools=tools).choices
    assert client.chat.completions.create(model="router:strict", messages=msgs).choices
    # the default arm leaves the LLM free (constrain: slm): a required tool call goes through
    assert client.chat.completions.create(model="router:mixed", messages=msgs, tools=tools, tool_choice="required",
                                          max_tokens=16).choices


def test_errors_in_openai_shape(gateway):
    client, *_ = gateway
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found" and "router:mixed" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="teacher", messages=[])


def test_calls_are_in_the_s1_log_with_workload_and_session(gateway):
    client, port, tmp, proc = gateway
    client.chat.completions.create(model="router:mixed", messages=[{"role": "user", "content": "key sk-proj-"
                                   "abcdefghijklmnopqrstuvwxyz0123456789ABCD please"}],
                                   max_tokens=3, extra_headers={"X-Workload-Id": "scrub-me", "X-Session-Id": "s9"})
    runs = list((tmp / "runs").iterdir())
    deadline = time.time() + 30
    while time.time() < deadline:
        df = read_interactions(str(runs[0]))
        if (df.scenario == "scrub-me").any() and (df.scenario == "async-agent").sum() == 4:
            break
        time.sleep(1)
    row = df[df.scenario == "scrub-me"].iloc[0]
    assert row.episode_id == "s9" and row.policy == "mixed" and row.tier == "slm" and row.call_kind == "chat"
    assert row.task_id == "s9"  # a session is the unit held-out splits and intervals resample
    assert "sk-proj-abcdefghij" not in row.prompt  # scrubbed before it was written
    mine = df[df.episode_id == "s1"]
    assert list(mine.scenario) == ["my-agent"] and list(mine.call_index) == [0]


def test_ids_the_client_sends_are_scrubbed_before_they_are_logged(gateway):
    """`log.scrub` (on for the gateway): the workload (`user`), session and metadata ids a client sends are free text
    from outside; they are scrubbed where they come in, so no string the log holds has the secret."""
    client, port, tmp, proc = gateway
    email, token = "bob.smith@corp-mail.example", "ghp_R7tY2uI9oP4aS6dF1gH3jK8lZ5xC0vB7nM2q"
    client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   user=email, extra_headers={"X-Session-Id": f"session of {email}"},
                                   extra_body={"metadata": {"task_id": f"task {token}", "role": email,
                                                            "call_kind": f"mail {email}"}})
    runs = list((tmp / "runs").iterdir())
    deadline = time.time() + 30
    while time.time() < deadline:
        df = read_interactions(str(runs[0]))
        if (df.scenario == "[EMAIL]").any():
            break
        time.sleep(1)
    assert (df.scenario == "[EMAIL]").any(), sorted(set(df.scenario))  # the workload is the `user` field, scrubbed
    row = df[df.scenario == "[EMAIL]"].iloc[0]
    assert (row.episode_id, row.task_id, row.role, row.call_kind) == ("session of [EMAIL]", "task [SECRET]",
                                                                      "[EMAIL]", "mail [EMAIL]")
    cells = [v for col in df.columns for v in df[col] if isinstance(v, str)]
    assert not [v for v in cells if email in v or token in v]


def test_responses_and_completions_are_logged_like_chat(gateway):
    """The Responses and legacy completions APIs share chat's path: routing by `model`, the workload and session ids,
    scrubbing, the S1 record (call kinds `chat` and `completion`)."""
    client, port, tmp, proc = gateway
    email = "ann.lee@corp-mail.example"
    r = client.responses.create(model="router:mixed", input=f"mail {email} please", instructions="Be brief.",
                                max_output_tokens=4, user="resp-agent", metadata={"session_id": "r1"})
    assert r.object == "response" and r.output[0].type == "message" and r.usage.output_tokens > 0
    c = client.completions.create(model="teacher", prompt="q", extra_headers={"X-Workload-Id": "resp-agent",
                                                                              "X-Session-Id": "r1"})
    assert c.choices[0].text.startswith("[simulated teacher")
    runs = list((tmp / "runs").iterdir())
    deadline = time.time() + 30
    while time.time() < deadline:
        df = read_interactions(str(runs[0]))
        if len(df[df.scenario == "resp-agent"]) == 2:
            break
        time.sleep(1)
    mine = df[df.scenario == "resp-agent"].sort_values("call_index")
    assert list(mine.episode_id) == ["r1", "r1"] and list(mine.call_kind) == ["chat", "completion"]
    assert list(mine.tier) == ["slm", "llm"] and email not in mine.iloc[0].prompt
    assert json.loads(mine.iloc[0].prompt)[0] == {"role": "system", "content": "Be brief."}
    # every call gets a verdict; the simulated teacher's placeholder (the engine's own wording) is never valid
    assert mine.iloc[0].valid is not None and not mine.iloc[1].valid and "placeholder" in mine.iloc[1].error


def test_a_workload_is_served_by_the_policy_chosen_for_it(gateway):
    """gateway.workloads: a call of a mapped workload that names any router policy is routed by the workload's arm
    (here all-LLM where the client asked for `mixed`, which sends chat to the SLM); a pinned model stays pinned."""
    client, port, tmp, proc = gateway
    for model, session in (("router:mixed", "w1"), ("tiny", "w2")):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_headers={"X-Workload-Id": "mapped-agent", "X-Session-Id": session})
    client.chat.completions.create(model="router:mixed", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                   extra_headers={"X-Workload-Id": "other-agent", "X-Session-Id": "w3"})
    run = next((tmp / "runs").iterdir())
    deadline = time.time() + 120  # records reach the log within a second or so, longer on a loaded machine
    while time.time() < deadline:
        df = read_interactions(str(run)).set_index("episode_id")
        if {"w1", "w2", "w3"} <= set(df.index):
            break
        time.sleep(1)
    assert (df.loc["w1", "policy"], df.loc["w1", "tier"]) == ("tuned-for-mapped", "llm")
    assert (df.loc["w2", "policy"], df.loc["w2", "tier"]) == ("tiny", "slm")
    assert (df.loc["w3", "policy"], df.loc["w3", "tier"]) == ("mixed", "slm")


def test_parallel_tool_calls_false_allows_one_call_in_both_apis(gateway):
    """`parallel_tool_calls: false` reaches the engine as the constraint's one-call bound (the tiny SLM's grammar closes
    the list after one call) and is logged with the call, in chat and Responses alike."""
    client, port, tmp, proc = gateway
    params = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}}, "required": ["city"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    r = client.chat.completions.create(model="tiny", max_tokens=64, messages=[{"role": "user", "content": "weather?"}],
                                       tools=tools, tool_choice="required", parallel_tool_calls=False,
                                       extra_headers={"X-Session-Id": "p1"})
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    r = client.responses.create(model="tiny", input="Weather in Lima?", max_output_tokens=64, tool_choice="required",
                                parallel_tool_calls=False, extra_headers={"X-Session-Id": "p2"},
                                tools=[{"type": "function", "name": "get_weather", "parameters": params}])
    assert [o.type for o in r.output] == ["function_call"] and r.parallel_tool_calls is False
    run = next((tmp / "runs").iterdir())
    deadline = time.time() + 120  # records reach the log within a second or so, longer on a loaded machine
    while time.time() < deadline:
        df = read_interactions(str(run)).set_index("episode_id")
        if {"p1", "p2"} <= set(df.index):
            break
        time.sleep(1)
    for s in ("p1", "p2"):
        assert json.loads(df.loc[s, "constraint"])["parallel_tool_calls"] is False and df.loc[s, "valid"]
        assert len(json.loads(df.loc[s, "output"])["tool_calls"]) == 1


def test_parallel_tool_calls_false_answers_and_judges_one_call():
    """Whatever the model wrote, the client gets at most one call, and an output with two is no valid training
    target for a client that forbade them."""
    from types import SimpleNamespace

    from slmshift.platform.constraint import tool_call_schema
    from slmshift.serve.gateway.common import Call, answer_of, constraint_of, output_check

    tools = [{"name": "f", "parameters": {"type": "object"}}, {"name": "g"}]
    two = '{"tool_calls": [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]}'
    one_only = Call(model="m", messages=[], tools=tools, tool_choice="required", parallel_tool_calls=False)
    assert not output_check(one_only)(two).valid and "parallel_tool_calls is false" in output_check(one_only)(two).reason
    assert output_check(Call(model="m", messages=[], tools=tools))(two).valid
    result = SimpleNamespace(text=two, response=SimpleNamespace(tokens_in=1, tokens_out=9, model="m", adapter=None))
    assert [c["name"] for c in answer_of(one_only, result).tool_calls] == ["f"]
    c = constraint_of(one_only)
    assert c.parallel_tool_calls is False and c.enforceable
    assert tool_call_schema(c.tools, parallel=False)["properties"]["tool_calls"]["maxItems"] == 1
    assert "maxItems" not in tool_call_schema(c.tools)["properties"]["tool_calls"]
    assert constraint_of(Call(model="m", messages=[], tools=tools)).parallel_tool_calls is None


def test_every_call_gets_a_validity_verdict():
    """What S2's `valid` keep rule reads for ungraded gateway traffic: the format the call asked for, else an answer."""
    from slmshift.serve.gateway.common import Call, output_check

    tools = [{"name": "get_weather", "parameters": {"type": "object"}}, {"name": "get_time"}]
    call = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}'
    cases = [({}, "Hello.", True), ({}, "  ", False), ({"tools": tools}, call, True),
             ({"tools": tools}, "It is sunny.", True), ({"tools": tools}, '{"name": "rm_rf", "arguments": {}}', False),
             ({"tools": tools, "tool_choice": "required"}, "It is sunny.", False),
             ({"tools": tools, "tool_choice": "get_time"}, call, False),
             ({"tools": tools, "tool_choice": "get_weather"}, call, True),
             ({"wants_json": True}, '{"a": 1}', True), ({"wants_json": True}, "[1]", False),
             ({}, "[simulated teacher: no scenario reference for this call, so no real answer]", False)]
    for kwargs, text, valid in cases:
        assert output_check(Call(model="m", messages=[], **kwargs))(text).valid is valid, (kwargs, text)


def test_earlier_tool_calls_read_as_the_model_writes_them():
    """The APIs send a call's arguments as a JSON string; the model reads its earlier calls in the one form the
    teacher answers and LoRA targets use (canonical JSON, arguments as values), so a tuned SLM is not shown a second
    form in its context. Arguments that are not JSON stay as they were sent."""
    from slmshift.platform.types import canonical_json
    from slmshift.serve.engines.workload import TOOL_RESULT
    from slmshift.serve.gateway.common import to_messages

    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    msgs = to_messages([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "Oslo, Norway"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'}], tools, None, False)
    assert msgs[2]["content"] == canonical_json({"tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_weather", "arguments": "Oslo, Norway"}]})
    assert TOOL_RESULT.match(msgs[3]["content"]).group(1) == '{"temp": 3}'
    assert '{"tool_calls":[{"name":"<function name>"' in msgs[0]["content"]  # the prompt's example, compact too


def test_a_shed_call_is_a_429_whose_retry_after_is_the_models():
    """The gateway's Retry-After for a call the pipeline gave up on under load is the wait the model's deployment
    states (`retry_after_s`, rounded up to whole seconds), not a number of its own."""
    from slmshift.platform.types import LMResponse, ModelSpec, RouteDecision
    from slmshift.serve.gateway import error_for
    from slmshift.serve.pipeline import CallResult

    err = ("infra: BackPressureError: Request dropped due to backpressure (num_queued_requests=1, "
           "max_queued_requests=1).")
    result = CallResult("", LMResponse(text="", model="m", tier="llm", backend="simulated", error=err),
                        RouteDecision(policy="p", kind="llm", model="m", tier="llm"), False, None, err)
    for wait, header in ((2.5, 3), (4.0, 4), (0.0, 0)):
        spec = ModelSpec(name="m", tier="llm", backend="simulated", retry_after_s=wait)
        e = error_for(result, {"m": spec})
        assert (e.status, e.code, e.retry_after) == (429, "overloaded", header)


def test_ctrl_c_waits_for_running_shadows_so_every_shadowed_call_keeps_its_pair(gateway):
    """The gateway answers before its SLM shadow is done (`detached_shadows`); stopping it (Ctrl-C) waits for the
    shadows still running, so each shadowed call is logged with its shadow, once. Runs last: it stops the gateway."""
    client, port, tmp, proc = gateway

    async def burst() -> None:
        aclient = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                     timeout=120)
        await asyncio.gather(*(aclient.chat.completions.create(
            model="router:paired", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=8,
            extra_headers={"X-Workload-Id": "paired-agent", "X-Session-Id": f"p{i}"}) for i in range(6)))

    asyncio.run(burst())
    proc.send_signal(signal.SIGINT)  # at once: shadows may still be running on the SLM
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    df = read_interactions(str(next((tmp / "runs").iterdir())), include_shadow=True)
    df = df[df.scenario == "paired-agent"]
    calls, shadows = df[~df.shadow.astype(bool)], df[df.shadow.astype(bool)]
    assert len(calls) == 6 and set(calls.tier) == {"llm"}
    assert sorted(shadows.shadow_of) == sorted(calls.id) and set(shadows.tier) == {"slm"}


def test_only_weightless_engines_run_inline_and_bad_names_say_so(tmp_path):
    from slmshift.platform.config import GatewayConfig, load_config
    from slmshift.platform.errors import ConfigError

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(YAML.format(storage=tmp_path, tiny=tmp_path, port=8000).replace("inline: [teacher]",
                                                                                  "inline: [teacher, tiny, nope]"))
    with pytest.raises(ConfigError) as e:
        load_config(cfg, schema=GatewayConfig)
    msg = str(e.value)
    assert "gateway.inline[1]" in msg and "backend 'hf', which loads weights" in msg
    assert "gateway.inline[2]" in msg and "no model is named 'nope'" in msg and "gateway.inline[0]" not in msg
