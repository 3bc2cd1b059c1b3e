"""The workload-file teacher (`backend: workload`): its file's validation (errors naming file, line, field, fix), its
answers over conversations written by the gateway's own message mapping (tool results it reads, arguments filled
from them), and its place in a gateway YAML. No Ray: the engine is called directly, as a Serve replica would."""

import asyncio
import json
import textwrap
from pathlib import Path

import pytest

from slmshift.platform.config import GatewayConfig, load_config
from slmshift.platform.errors import ConfigError, SlmshiftError
from slmshift.platform.types import LMRequest, ModelSpec
from slmshift.platform.workload import read_workload, resolve
from slmshift.serve.engines import get_engine_class
from slmshift.serve.gateway.common import to_messages

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "scenarios/workloads/agent-desk.jsonl"

SESSION = {"workload": "orders", "session": "o-1", "question": "Where is order A1?",
           "steps": [{"tool": "lookup_order", "arguments": {"order_id": "A1"}},
                     {"tool": "track", "arguments": {"tracking": "{results[0].tracking}", "n": "{results[0].n}"}}],
           "answer": "Order A1 is in {results[1].city} (code {results[0]})."}
TOOLS = [{"name": "lookup_order", "parameters": {"type": "object"}}, {"name": "track", "parameters": {"type": "object"}}]


def write(tmp_path: Path, *entries, name="w.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(e if isinstance(e, str) else json.dumps(e) for e in entries) + "\n")
    return p


def engine(path: Path):
    return get_engine_class("workload")(ModelSpec(name="desk", tier="llm", backend="workload", source=str(path)))


def ask(eng, chat: list[dict], workload="orders") -> str:
    req = LMRequest(experiment_id="t", episode_id="s", call_index=0, scenario=workload, role="agent",
                    call_kind="chat", messages=to_messages(chat, TOOLS, None, False))
    (resp,) = asyncio.run(eng.generate([req]))
    return resp.error or resp.text


def test_the_teacher_follows_the_tool_results_it_is_sent(tmp_path):
    eng = engine(write(tmp_path, SESSION))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is order  A1?"}]
    first = json.loads(ask(eng, chat))
    assert first == {"tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "A1"}}]}
    # the chat API's shape of an assistant tool call and its result, as an agent sends them back
    chat += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A1"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"tracking": "TR-77", "n": 3}'}]
    second = json.loads(ask(eng, chat))
    assert second["tool_calls"][0] == {"name": "track", "arguments": {"tracking": "TR-77", "n": 3}}  # 3 stays a number
    chat += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "track", "arguments": '{"tracking": "TR-77", "n": 3}'}}]},
        {"role": "tool", "tool_call_id": "c2", "content": '{"city": "Leipzig"}'}]
    assert ask(eng, chat) == 'Order A1 is in Leipzig (code {"tracking": "TR-77", "n": 3}).'


def test_unknown_questions_and_bad_results_are_errors_not_answers(tmp_path):
    eng = engine(write(tmp_path, SESSION))
    out = ask(eng, [{"role": "user", "content": "What is the weather?"}])
    assert "workload-file teacher 'desk'" in out and "no session" in out and "Fix: add a session" in out
    chat = [{"role": "user", "content": "Where is order A1?"}, call("lookup_order", {"order_id": "A1"}),
            {"role": "tool", "tool_call_id": "c1", "content": "not json"}]
    assert "results[0] is not JSON" in ask(eng, chat)


def call(*calls_and_args) -> dict:
    """An assistant turn in the chat API's shape: call(name, args[, name, args...])."""
    pairs = zip(calls_and_args[::2], calls_and_args[1::2])
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(pairs)]}


def result(text: str) -> dict:
    return {"role": "tool", "tool_call_id": "c", "content": text}


def test_off_the_file_the_teacher_makes_the_right_call_and_never_quotes_a_wrong_ones_result(tmp_path):
    """Another model (the SLM a policy routed a turn to) called a tool wrongly, made an extra call or answered in
    prose: the teacher goes on from the file's own calls, as a hosted model would recover, instead of failing."""
    eng = engine(write(tmp_path, SESSION))
    q = {"role": "user", "content": "Where is order A1?"}
    wrong_id = [q, call("lookup_order", {"order_id": "B9"}), result('{"error": "no such order"}')]
    assert json.loads(ask(eng, wrong_id)) == {"tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "A1"}}]}
    good = wrong_id + [call("lookup_order", {"order_id": "A1"}), result('{"tracking": "TR-77", "n": 3}')]
    assert json.loads(ask(eng, good))["tool_calls"] == [{"name": "track", "arguments": {"tracking": "TR-77", "n": 3}}]
    # a wrong second call, an extra call, and a parallel pair whose first call is unasked and second is the file's
    off = good + [call("track", {"tracking": "TR-77"}), result('{"city": "Nowhere"}'),
                  {"role": "assistant", "content": "Let me think."},
                  call("lookup_order", {"order_id": "A2"}, "track", {"tracking": "TR-77", "n": 3}),
                  result('{"tracking": "TR-00"}'), result('{"city": "Leipzig"}')]
    assert ask(eng, off) == 'Order A1 is in Leipzig (code {"tracking": "TR-77", "n": 3}).'
    # the extra results never shift which result a reference quotes
    assert ask(eng, good + [call("track", {"tracking": "TR-77", "n": 3}), result('{"city": "Leipzig"}'),
                            call("track", {"tracking": "TR-77", "n": 3}), result('{"city": "Kassel"}')]) \
        == 'Order A1 is in Leipzig (code {"tracking": "TR-77", "n": 3}).'


def test_resolve_fills_references_and_keeps_types():
    assert resolve({"a": "{results[0].x.y}", "b": "id {results[1]}!", "c": ["{results[0].x}"]},
                   ['{"x": {"y": 2.5}}', " R-1 "]) == {"a": 2.5, "b": "id R-1!", "c": [{"y": 2.5}]}


@pytest.mark.parametrize("entry,expect", [
    ({**SESSION, "steps": [{"tool": "t", "arguments": {"a": "{results[0]}"}}]},
     "line 1, field (the entry): steps[0].arguments quotes results[0]: the first step has no result to quote"),
    ({**SESSION, "answer": "{results[5]}"}, "line 1, field (the entry): answer quotes results[5] but the session has 2"),
    ({**SESSION, "workload": "has space"}, "line 1, field workload: String should match pattern"),
    ({**SESSION, "steps": [{"tool": "t", "args": {}}]}, "line 1, field steps.0.args: Extra inputs are not permitted"),
    ({k: v for k, v in SESSION.items() if k != "answer"}, "line 1, field answer: Field required"),
])
def test_bad_entries_name_line_field_and_fix(tmp_path, entry, expect):
    with pytest.raises(SlmshiftError) as e:
        read_workload(write(tmp_path, entry))
    assert expect in str(e.value) and str(tmp_path / "w.jsonl") in str(e.value) and "Fix:" in str(e.value)


def test_file_level_problems(tmp_path):
    with pytest.raises(SlmshiftError, match=r"line 2: not JSON .*Fix: one JSON object per line"):
        read_workload(write(tmp_path, SESSION, "{oops"))
    with pytest.raises(SlmshiftError, match=r"line 2, field session: 'o-1' repeats line 1"):
        read_workload(write(tmp_path, SESSION, {**SESSION, "question": "Another?"}))
    with pytest.raises(SlmshiftError, match=r"line 2, field question: the same question as line 1"):
        read_workload(write(tmp_path, SESSION, {**SESSION, "session": "o-2"}))
    with pytest.raises(SlmshiftError, match="not found"):
        read_workload(tmp_path / "missing.jsonl")
    p = tmp_path / "w.yaml"
    p.write_text("workload: x\n")
    with pytest.raises(SlmshiftError, match="must be a YAML list of sessions"):
        read_workload(p)
    p.write_text(textwrap.dedent("""\
        - workload: orders
          session: o-1
          question: Where is order A1?
          answer: It has shipped.
        """))
    assert read_workload(p)[0].steps == []


def test_the_shipped_workload_file():
    sessions = read_workload(SHIPPED)
    by = {}
    for s in sessions:
        by.setdefault(s.workload, []).append(s)
    assert len(by) >= 3 and all(len(v) >= 5 for v in by.values())
    # every session's second call depends on its first call's result
    assert all(s.steps and "{results[0]" in json.dumps(s.steps[-1].arguments) for s in sessions)


def test_a_gateway_yaml_checks_its_workload_teacher(tmp_path):
    def cfg(source: str, tier: str = "llm") -> Path:
        p = tmp_path / "gw.yaml"
        p.write_text(textwrap.dedent(f"""\
            models:
              - {{name: desk, tier: {tier}, backend: workload, source: {source}}}
            router:
              policies: [{{kind: llm, name: agent}}, {{kind: llm, name: tuned}}]
            gateway:
              workloads: {{orders: tuned, travel: missing}}
            """))
        return p

    bad = write(tmp_path, {**SESSION, "answer": ""})
    with pytest.raises(ConfigError) as e:
        load_config(cfg(str(bad)), schema=GatewayConfig)
    msg = str(e.value)
    assert "models[0].source" in msg and "line 1, field answer" in msg
    assert "gateway.workloads.travel (line 6): no router.policies arm is named 'missing'; available: agent, tuned" in msg
    with pytest.raises(ConfigError, match=r"models\[0\].tier \(line 2\): backend 'workload' is a teacher"):
        load_config(cfg(str(SHIPPED), tier="slm"), schema=GatewayConfig)
