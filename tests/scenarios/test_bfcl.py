"""BFCL scenario: task loading, reference/distractor answers, grading and prompts (fast, no Ray)."""

from __future__ import annotations

import asyncio
import collections
import json

import pytest

from slmshift.scenarios.bfcl.prompts import INTENT_EXAMPLE

from slmshift.scenarios.bfcl import (
    CATEGORIES,
    INTENT_SCHEMA,
    BFCLTask,
    Grade,
    call_messages,
    decode_calls,
    distractor_calls,
    expected_function_names,
    grade_calls,
    grade_intent,
    intent_distractors,
    intent_messages,
    intent_reference,
    intent_schema,
    load_tasks,
    reference_call,
)
from slmshift.scenarios.bfcl.api import bfcl_api
from slmshift.scenarios.bfcl.data import task_by_id

ALL = list(CATEGORIES)


@pytest.fixture(scope="module")
def all_tasks() -> list[BFCLTask]:
    return load_tasks(ALL)


def _task(task_id: str) -> BFCLTask:
    task = task_by_id(task_id)
    assert task is not None, task_id
    return task


def _user_text(t: BFCLTask) -> str:
    return next(m["content"] for m in t.question if m["role"] == "user")


# ---------------------------------------------------------------- loading


def test_load_tasks_is_deterministic_and_seeded() -> None:
    a = [t.id for t in load_tasks(ALL, n=40, seed=7)]
    assert a == [t.id for t in load_tasks(ALL, n=40, seed=7)]
    assert a != [t.id for t in load_tasks(ALL, n=40, seed=8)]
    assert len(set(a)) == 40


def test_load_tasks_spreads_evenly_and_prefixes_are_stable(all_tasks: list[BFCLTask]) -> None:
    for n in (11, 22, 37):
        counts = collections.Counter(t.category for t in load_tasks(ALL, n=n))
        assert set(counts) == set(ALL) and max(counts.values()) - min(counts.values()) <= 1
    assert [t.id for t in load_tasks(ALL, n=123, seed=3)] == [t.id for t in load_tasks(ALL, seed=3)][:123]
    assert load_tasks(ALL, n=0) == []
    assert len(load_tasks(["parallel"], n=10_000)) == len(load_tasks(["parallel"]))


def test_load_tasks_all_and_task_shape(all_tasks: list[BFCLTask]) -> None:
    counts = collections.Counter(t.category for t in all_tasks)
    assert counts == {"simple": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200, "live_simple": 258,
                      "live_multiple": 1053, "live_parallel": 16, "live_parallel_multiple": 24, "irrelevance": 240,
                      "live_irrelevance": 884, "live_relevance": 16}
    assert len({t.id for t in all_tasks}) == len(all_tasks)
    for t in all_tasks:
        assert t.id.startswith(CATEGORIES[t.category] + "_") and t.bfcl_category == CATEGORIES[t.category]
        assert t.question and any(m["role"] == "user" and m["content"] for m in t.question)
        assert {m["role"] for m in t.question} <= {"system", "user", "assistant"}
        assert t.functions or t.checker == "irrelevance"  # a few live_irrelevance requests offer no function
        assert bool(t.answer) == (t.checker == "ast"), t.id  # (ir)relevance tasks ship no possible answer
    assert collections.Counter(t.checker for t in all_tasks) == {"ast": 2351, "irrelevance": 1124, "relevance": 16}


def test_load_tasks_unknown_category() -> None:
    with pytest.raises(ValueError) as err:
        load_tasks(["simple", "multi_turn_base"])
    for name in ALL:
        assert name in str(err.value)
    assert "operator_multiturn" in str(err.value)
    with pytest.raises(ValueError, match="simple"):
        load_tasks([])


def test_task_by_id() -> None:
    assert task_by_id("live_multiple_0-0-0").category == "live_multiple"
    assert task_by_id("irrelevance_3").checker == "irrelevance"
    for unknown in ("nope", "multi_turn_base_0", "", None):
        assert task_by_id(unknown) is None  # type: ignore[arg-type]


def test_expected_function_names() -> None:
    task = _task("parallel_multiple_0")
    assert expected_function_names(task) == ["math_toolkit.sum_of_multiples", "math_toolkit.product_of_primes"]
    parallel = load_tasks(["parallel"], n=1)[0]
    assert len(expected_function_names(parallel)) == 1 < len(parallel.answer)


# ---------------------------------------------------------------- reference and distractor answers


# BFCL data errors: the shipped possible answer itself fails BFCL's checker (an empty list of acceptable values
# for a required parameter, or a parameter the function doc does not have), so no answer can pass them.
UNPASSABLE = {"live_simple_106-63-0", "live_simple_112-68-0", "live_multiple_862-181-3", "live_multiple_964-207-0"}


@pytest.mark.parametrize("category", ALL)
def test_reference_call_is_correct_for_every_task(category: str) -> None:
    failures = [
        (t.id, reference_call(t), g.reason)
        for t in load_tasks([category])
        if not (g := grade_calls(t, reference_call(t))).correct and t.id not in UNPASSABLE
    ]
    assert not failures, failures[:5]
    for task_id in UNPASSABLE:
        t = task_by_id(task_id)
        assert t.checker == "ast" and t.answer and not grade_calls(t, reference_call(t)).correct


def test_reference_call_format() -> None:
    task = _task("simple_python_0")
    assert reference_call(task) == "[calculate_triangle_area(base=10, height=5)]"


def test_distractors_are_wrong_for_every_task(all_tasks: list[BFCLTask]) -> None:
    skipped = []
    for t in all_tasks:
        ds = distractor_calls(t)
        if not ds:
            skipped.append(t.id)
            continue
        assert 1 <= len(ds) <= 3 and len(set(ds)) == len(ds)
        for d in ds:
            g = grade_calls(t, d)
            assert (g.valid or t.checker == "relevance") and not g.correct and g.reason, (t.id, d, g)
    print(f"distractors: {len(skipped)} of {len(all_tasks)} tasks skipped: {skipped[:10]}")
    assert len(skipped) <= len(all_tasks) // 100
    some = all_tasks[:20]
    assert [distractor_calls(t, seed=1) for t in some] == [distractor_calls(t, seed=1) for t in some]


# ---------------------------------------------------------------- grade_calls


def test_grade_calls_right_answer_variants() -> None:
    task = _task("simple_python_0")
    for text in (
        "[calculate_triangle_area(base=10, height=5, unit='units')]",
        "calculate_triangle_area(base=10, height=5)",
        "  ```python\n[calculate_triangle_area(height=5, base=10)]\n```  ",
        "Sure, here is the call: [calculate_triangle_area(base=10, height=5)]",
        "[calculate_triangle_area(base=5*2, height=5)]",
        "[calculate_triangle_area(base=10, height=5)]\n```",
    ):
        assert grade_calls(task, text) == Grade(True, True, ""), text


def test_grade_calls_wrong_value_and_wrong_function() -> None:
    task = _task("simple_python_0")
    g = grade_calls(task, "[calculate_triangle_area(base=11, height=5)]")
    assert g.valid and not g.correct and "base" in g.reason
    g = grade_calls(task, "[calculate_triangle_area(base=10)]")
    assert g.valid and not g.correct and "height" in g.reason
    multiple = _task("multiple_0")
    g = grade_calls(multiple, "[math.triangle_area_heron(side1=5, side2=4, side3=3)]")
    assert g.valid and not g.correct and "triangle_properties.get" in g.reason
    assert grade_calls(multiple, "[triangle_properties.get(side1=5, side2=4, side3=3)]").correct


def test_grade_calls_parallel_is_order_free() -> None:
    task = _task("parallel_multiple_0")
    calls = decode_calls(reference_call(task))
    swapped = "[" + ", ".join(
        f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
        for call in reversed(calls) for name, args in call.items()
    ) + "]"
    assert grade_calls(task, swapped).correct


@pytest.mark.parametrize(
    "text",
    ["hello", "[", "[]", "", "   ", "import os; os.system('x')", "[1, 2]", "[f(x=1", "I cannot help with that.",
     "[f(" * 300, "x" * 50_000, None],
)
def test_grade_calls_garbage_is_invalid_not_raising(text: str) -> None:
    g = grade_calls(_task("simple_python_0"), text)  # type: ignore[arg-type]
    assert not g.valid and not g.correct and g.reason
    if isinstance(text, str) and text.strip():
        with pytest.raises(ValueError):
            decode_calls(text)


def test_grader_never_evaluates_model_output(tmp_path) -> None:
    target = tmp_path / "pwned"
    task = _task("simple_python_0")
    for payload in (
        f"[calculate_triangle_area(base=open({str(target)!r}, 'w').write('x') + 1, height=5)]",
        f"[calculate_triangle_area(base=(lambda: open({str(target)!r}, 'w'))(), height=5)]",
        "[calculate_triangle_area(base=9**9**9**9, height=5)]",
    ):
        g = grade_calls(task, payload)
        assert not g.valid and not g.correct
    assert not target.exists()


def test_grading_everything_is_fast(all_tasks: list[BFCLTask]) -> None:
    import time

    start = time.perf_counter()
    for t in all_tasks:
        grade_calls(t, reference_call(t))
        grade_intent(t, intent_reference(t))
    assert time.perf_counter() - start < 10.0  # ~3.5k tasks


# ---------------------------------------------------------------- intent


def test_grade_intent_right_wrong_malformed() -> None:
    task = _task("parallel_multiple_0")
    a, b = expected_function_names(task)
    assert grade_intent(task, intent_reference(task)).correct
    assert grade_intent(task, json.dumps({"functions": [b, a, b]})).correct
    assert grade_intent(task, f'```json\n{{"functions": ["{a}", "{b}"]}}\n```').correct
    wrong = grade_intent(task, json.dumps({"functions": [a]}))
    assert wrong.valid and not wrong.correct and b in wrong.reason
    # a needed function missing is fatal; an unneeded one added is not (the Operator can still make the call)
    assert not grade_intent(task, json.dumps({"functions": []})).correct
    task = _task("multiple_0")
    (need,) = expected_function_names(task)
    other = next(f["name"] for f in task.functions if f["name"] != need)
    assert grade_intent(task, json.dumps({"functions": [other, need]})).correct
    assert not grade_intent(task, json.dumps({"functions": [other]})).correct
    for bad in ("", "hello", "{", '["x"]', '{"functions": "x"}', '{"functions": [1]}', '{"fns": []}',
                json.dumps({"functions": [a, "not_a_function"]}), None):
        g = grade_intent(task, bad)  # type: ignore[arg-type]
        assert not g.valid and not g.correct and g.reason, bad


def test_intent_reference_and_distractors_for_every_task(all_tasks: list[BFCLTask]) -> None:
    for t in all_tasks:
        assert grade_intent(t, intent_reference(t)) == Grade(True, True, "")
        ds = intent_distractors(t)
        assert 1 <= len(ds) <= 3 or not t.functions and len(set(ds)) == len(ds)
        for d in ds:
            g = grade_intent(t, d)
            assert g.valid and not g.correct, (t.id, d)


def test_irrelevance_intent_is_right_only_when_empty(all_tasks: list[BFCLTask]) -> None:
    task = next(t for t in all_tasks if t.checker == "irrelevance")
    assert grade_intent(task, json.dumps({"functions": []})).correct
    wrong = grade_intent(task, json.dumps({"functions": [task.functions[0]["name"]]}))
    assert wrong.valid and not wrong.correct and "none is needed" in wrong.reason


def test_intent_schema() -> None:
    task = _task("multiple_0")
    assert INTENT_SCHEMA["required"] == ["functions"]
    names = intent_schema(task)["properties"]["functions"]["items"]["enum"]
    assert names == [f["name"] for f in task.functions]


# ---------------------------------------------------------------- prompts


def test_intent_messages(all_tasks: list[BFCLTask]) -> None:
    for t in all_tasks:
        msgs = intent_messages(t)
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
        assert '{"functions"' in msgs[0]["content"] and "ONLY" in msgs[0]["content"]
        assert msgs[1:3] == INTENT_EXAMPLE  # the worked example, then the real request
        for f in t.functions:
            assert f"- {f['name']}: " in msgs[-1]["content"]
        assert _user_text(t) in msgs[-1]["content"]


def test_call_messages_use_bfcl_system_prompt() -> None:
    task = _task("multiple_0")
    msgs = call_messages(task, None)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1] == task.question[0]
    api = bfcl_api()
    hinted = api.language_hint(json.loads(json.dumps(task.functions)), task.bfcl_category)
    assert msgs[0]["content"] == api.formulate_system_prompt(api.DEFAULT_SYSTEM_PROMPT_FORMAT, hinted)
    assert "Note that the provided function is in Python 3 syntax." in msgs[0]["content"]
    assert "Python 3 syntax" not in json.dumps(task.functions)  # task data not mutated


def test_call_messages_selection_and_fallback() -> None:
    task = _task("multiple_0")
    names = [f["name"] for f in task.functions]
    wanted = expected_function_names(task)
    restricted = call_messages(task, wanted)[0]["content"]
    assert all((n in restricted) == (n in wanted) for n in names)
    for fallback in (None, [], ["no_such_function"], wanted + ["no_such_function"]):
        content = call_messages(task, fallback)[0]["content"]
        assert all(f'"name": "{n}"' in content for n in names), fallback


def test_prompts_never_leak_the_reference_answer(all_tasks: list[BFCLTask]) -> None:
    in_question = []
    for t in all_tasks:
        ref = reference_call(t)
        if ref[1:-1] in _user_text(t):  # not distinctive: the request spells out the call
            in_question.append(t.id)
            continue
        text = "\n".join(m["content"] for m in intent_messages(t) + call_messages(t, None))
        assert ref not in text and ref[1:-1] not in text, t.id
        assert intent_reference(t) not in text, t.id
    assert len(in_question) <= 5, in_question


# ---------------------------------------------------------------- package layout


def test_bfcl_package_import_graph_has_no_cycle() -> None:
    """Each bfcl module imports only modules above it (api -> data -> grader -> teacher -> prompts ...)."""
    import ast
    import graphlib
    from pathlib import Path

    import slmshift.scenarios.bfcl as pkg

    root = Path(pkg.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slmshift.scenarios.bfcl."):
                deps.add(node.module.removeprefix("slmshift.scenarios.bfcl."))
        graph[name] = deps - {"__init__"}
    graph.pop("__init__", None)
    assert "teacher" in graph and "data" in graph
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert not graph["data"] & {"grader", "teacher"}


# ---------------------------------------------------------------- the live and (ir)relevance categories


@pytest.mark.parametrize("task_id", ["live_simple_0-0-0", "live_multiple_0-0-0", "live_parallel_0-0-0",
                                     "live_parallel_multiple_0-0-0", "irrelevance_0", "live_irrelevance_0-0-0",
                                     "live_relevance_0-0-0"])
def test_new_categories_teacher_passes_and_wrong_answers_fail(task_id: str) -> None:
    t = _task(task_id)
    assert grade_calls(t, reference_call(t)) == Grade(True, True, "")
    assert grade_intent(t, intent_reference(t)) == Grade(True, True, "")
    wrong = distractor_calls(t)
    assert wrong and not any(grade_calls(t, d).correct for d in wrong)
    assert not any(grade_intent(t, d).correct for d in intent_distractors(t))


def test_irrelevance_is_graded_as_bfcl_does() -> None:
    t = _task("irrelevance_0")
    fn = t.functions[0]["name"]
    assert t.checker == "irrelevance" and not t.answer
    for no_call in ("I cannot help with that.", "", "[]", "None", "```python\n[" + fn + "(a=1)]\n```"):
        assert grade_calls(t, no_call).correct, no_call  # BFCL's decoder reads no call here (fences included)
    for call in (f"[{fn}(a=1)]", f"{fn}(a=1)", f"[{fn}()]", "[anything(x='y')]"):
        g = grade_calls(t, call)
        assert g.valid and not g.correct and "decoder_success" in g.reason, call
    assert grade_intent(t, '{"functions": []}').correct
    assert not grade_intent(t, json.dumps({"functions": [fn]})).correct


def test_relevance_needs_a_call() -> None:
    t = _task("live_relevance_2-2-0")
    assert t.checker == "relevance" and not t.answer
    assert grade_calls(t, "[search_web(query='x')]").correct
    assert grade_calls(t, "[some_other_function(q=1)]").correct  # BFCL only asks for a call, any call
    for no_call in ("I would search the web.", "[]", ""):
        g = grade_calls(t, no_call)
        assert not g.valid and not g.correct and "decoder_failed" in g.reason
    assert not grade_intent(t, '{"functions": []}').correct
    assert grade_intent(t, '{"functions": ["search_web"]}').correct


def test_relevance_categories_never_evaluate_model_output(tmp_path) -> None:
    target = tmp_path / "pwned"
    hostile = f"[f(x=(lambda: open({str(target)!r}, 'w'))())]"
    for task_id in ("irrelevance_0", "live_relevance_2-2-0"):
        assert not grade_calls(_task(task_id), hostile).correct  # refused: fails both kinds
    assert not target.exists()


# ---------------------------------------------------------------- operator episodes (scripted team)


def ScriptedSession(script: dict[str, str] | None = None):
    """A real episode session over the real call pipeline whose model answers each call kind from `script`, else
    with the call's hidden reference (the simulated teacher at accuracy 1)."""
    from slmshift.agents.client import local_session
    from slmshift.platform.types import ModelSpec
    from slmshift.serve.engines.scripted import ScriptedEngine

    engine = ScriptedEngine(ModelSpec(name="scripted", tier="llm", backend="simulated"),
                            {k: [v] for k, v in (script or {}).items()})
    session = local_session(engine, scenario="operator")
    session.kinds = lambda: [r.call_kind for r in engine.requests]
    return session


def _operator(categories: list[str]):
    import slmshift.scenarios  # noqa: F401  (registers "operator")
    from slmshift.platform.config import ScenarioSpec
    from slmshift.platform.scenario import scenario_class

    return scenario_class("operator")(ScenarioSpec(kind="operator", episodes=2, options={"categories": categories}), 0)


@pytest.mark.parametrize("task_id", ["irrelevance_0", "live_relevance_0-0-0", "live_parallel_multiple_0-0-0"])
def test_operator_episode_with_the_teacher(task_id: str) -> None:
    sc = _operator(["live_simple"])
    session = ScriptedSession()
    out = asyncio.run(sc.run_episode(_task(task_id), session))
    assert out.success, out
    kinds = session.kinds()
    # on an irrelevance task the Planner picks nothing, so the Operator is never asked
    assert kinds == (["intent"] if task_id.startswith("irrelevance") else ["intent", "function_call"])


def test_operator_episode_wrong_planner_or_operator_fails() -> None:
    sc = _operator(["irrelevance"])
    t = _task("irrelevance_0")
    fn = t.functions[0]["name"]
    out = asyncio.run(sc.run_episode(t, ScriptedSession({"intent": json.dumps({"functions": [fn]}),
                                                         "function_call": f"[{fn}(a=1)]"})))
    assert not out.success and "decoder_success" in out.detail
    rel = _task("live_relevance_0-0-0")
    out = asyncio.run(sc.run_episode(rel, ScriptedSession({"intent": '{"functions": []}'})))
    assert not out.success and out.detail == "planner chose no function"


def test_operator_grade_call_offline_for_new_categories() -> None:
    sc = _operator(["simple"])  # grading does not depend on the run's own categories
    t = _task("live_multiple_0-0-0")
    assert sc.grade_call(t.id, "function_call", reference_call(t)).correct
    assert sc.grade_call(t.id, "function_call", reference_call(t), context={"ignored": 1}).correct
    assert not sc.grade_call(t.id, "function_call", distractor_calls(t)[0]).correct
    assert sc.grade_call("irrelevance_0", "intent", '{"functions": []}').correct
    assert sc.grade_call("irrelevance_0", "function_call", "no call needed").correct
    assert sc.grade_call("no_such_task", "function_call", "x") is None
    assert sc.grade_call(t.id, "summary", "x") is None


def test_operator_options_reject_unknown_categories_listing_the_real_set() -> None:
    from slmshift.scenarios.operator import OperatorOptions

    with pytest.raises(ValueError) as err:
        OperatorOptions(categories=["live_simple", "multi_turn_base", "nope"])
    msg = str(err.value)
    assert "multi_turn_base" in msg and "nope" in msg and "operator_multiturn" in msg
    assert all(c in msg for c in ALL)
