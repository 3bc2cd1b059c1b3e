"""BFCL multi-turn (operator_multiturn): task data, the ast-only executor on BFCL's real backends, BFCL's per-turn
state/response checks, the teacher's ground-truth answers, and whole episodes with a scripted team (no Ray)."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

import slmshift.scenarios  # noqa: F401  (registers "operator_multiturn")
from slmshift.agents.client import Session, local_session
from slmshift.platform.config import ScenarioSpec, load_config
from slmshift.platform.scenario import scenario_class
from slmshift.platform.types import ModelSpec
from slmshift.scenarios.bfcl.api import bfcl_api
from slmshift.scenarios.bfcl.multiturn import (
    MT_CATEGORIES, Backends, EpisodeGrader, grade_step, grade_turn_intent, load_multi_turn_tasks, mt_task_by_id,
    parse_step,
)
from slmshift.scenarios.bfcl.multiturn.grader import ground_truth_calls
from slmshift.scenarios.bfcl.multiturn.prompts import operator_messages, results_message, turn_messages
from slmshift.scenarios.bfcl.multiturn.teacher import (
    CANNOT_DO, TURN_DONE, intent_distractors, intent_reference, step_distractors, step_reference,
)
from slmshift.scenarios.operator_multiturn import OperatorMultiTurnOptions
from slmshift.serve.engines.scripted import ScriptedEngine

ROOT = Path(__file__).resolve().parents[2]
FIXED = ["multi_turn_base_0", "multi_turn_miss_func_0", "multi_turn_miss_param_0", "multi_turn_long_context_0"]


# ---------------------------------------------------------------- a scripted team


def ScriptedSession(answer: Callable[[str, int], str | None] | None = None) -> Session:
    """A real episode session over the real call pipeline (route, check, S1 record) whose model answers with the
    call's hidden reference (the simulated teacher at accuracy 1) unless `answer(call_kind, n-th call of that
    kind)` returns a text. `session.calls` joins what the model was asked with the pipeline's record of it."""
    counts: collections.Counter = collections.Counter()

    def reply(r):
        n = counts[r.call_kind]
        counts[r.call_kind] += 1
        text = answer(r.call_kind, n) if answer else None
        return r.hidden.answer if text is None else text

    engine = ScriptedEngine(ModelSpec(name="scripted", tier="llm", backend="simulated"), answer=reply)
    session = local_session(engine, scenario="operator_multiturn")
    contexts: list[Any] = []
    inner = session.call

    async def call(**kw):  # remember each call's grading context; the call itself is the pipeline's
        contexts.append(kw.get("context"))
        return await inner(**kw)

    session.call = call
    session.calls_seen = lambda: [
        {"role": r.role, "kind": r.call_kind, "text": rec["output"], "valid": rec["valid"], "correct": rec["correct"],
         "reason": rec["error"], "messages": r.messages, "context": ctx, "hidden": r.hidden, "category": r.category}
        for r, rec, ctx in zip(engine.requests, session.pipeline.log.records, contexts)]
    return session


def _scenario(**options):
    spec = ScenarioSpec(kind="operator_multiturn", episodes=4, options=options)
    return scenario_class("operator_multiturn")(spec, 0)


def _run(task_id: str, answer=None, **options):
    session = ScriptedSession(answer)
    out = asyncio.run(_scenario(**options).run_episode(mt_task_by_id(task_id), session))
    return out, SimpleNamespace(calls=session.calls_seen())


# ---------------------------------------------------------------- data


def test_tasks_load_with_held_out_docs() -> None:
    tasks = load_multi_turn_tasks(list(MT_CATEGORIES))
    assert collections.Counter(t.category for t in tasks) == {c: 200 for c in MT_CATEGORIES}
    assert [t.id for t in load_multi_turn_tasks(list(MT_CATEGORIES), n=12, seed=3)] == [
        t.id for t in load_multi_turn_tasks(list(MT_CATEGORIES), seed=3)][:12]
    t = mt_task_by_id("multi_turn_miss_func_0")
    assert list(t.missed_function) == [3] and [f["name"] for f in t.missed_function[3]] == ["sort"]
    assert "sort" not in {f["name"] for f in t.functions_at(2)} and "sort" in {f["name"] for f in t.functions_at(3)}
    assert t.turns[3] == [] and t.ground_truth[2] == []  # sort is asked for before it exists: nothing to call
    hint = "Note that the provided function is in Python 3 syntax."
    assert all(f["description"].endswith(hint) for f in t.functions)
    assert not t.missed_function[3][0]["description"].endswith(hint)  # BFCL hints after holding docs out
    assert mt_task_by_id("multi_turn_long_context_0").long_context and not t.long_context
    with pytest.raises(ValueError, match="multi_turn_base"):
        load_multi_turn_tasks(["live_simple"])
    assert mt_task_by_id("simple_python_0") is None


# ---------------------------------------------------------------- executor


def test_executor_matches_bfcl_on_ground_truth() -> None:
    """Our ast executor and BFCL's own (eval-based, run here only on BFCL's trusted ground-truth strings) leave
    the backends in the same state with the same results."""
    bfcl_api()
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import state_checker
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call

    for task_id in FIXED + ["multi_turn_base_100", "multi_turn_base_150"]:
        t = mt_task_by_id(task_id)
        ours = Backends(t.initial_config, t.involved_classes, t.long_context)
        for turn, gt in enumerate(t.ground_truth):
            mine = [ours.execute(c) for c in ground_truth_calls(t, turn)]
            theirs, instances = execute_multi_turn_func_call(gt, t.initial_config, t.involved_classes,
                                                             "slmshift_parity_test", t.id, long_context=t.long_context)
            assert mine == theirs, (task_id, turn)
            assert state_checker(ours.instances, instances)["valid"], (task_id, turn)


def test_parse_step_shapes() -> None:
    step = parse_step("[cd(folder='document'), mkdir(dir_name='temp')]")
    assert [c.render() for c in step.calls] == ["cd(folder='document')", "mkdir(dir_name='temp')"]
    assert parse_step("```python\n[ls(a=True)]\n```").calls[0].kwargs == {"a": True}
    assert parse_step("cd(folder='x')").has_calls  # BFCL wraps a bare call in [...]
    assert parse_step("[buy(amount=2*50)]").calls[0].kwargs == {"amount": 100}  # literal arithmetic, computed
    for text in ("[]", "", "All done, the file was moved.", "I will call cd(folder='x') next"):
        step = parse_step(text)
        assert not step.has_calls and not step.malformed, text  # a text answer: the turn ends, as in BFCL
    for text in ("[cd(folder='x'", "[1, 2]", "import os", "cd(folder='x'); rm(file_name='y')"):
        step = parse_step(text)
        assert not step.has_calls and step.malformed, text
    assert parse_step("[cd('x')]").calls[0].error  # by position: BFCL's decoder would drop it
    assert not parse_step("sort('a.txt')", allow_positional=True).calls[0].error  # BFCL's ground truth does this


HOSTILE = [
    "[__import__('os').system('touch {m}')]",
    "[cd(folder=__import__('os').system('touch {m}'))]",
    "[cd(folder=open('{m}', 'w').write('x'))]",
    "[cd(folder=().__class__.__bases__[0].__subclasses__())]",
    "[_load_scenario(scenario={{}}), __init__()]",
    "[getattr(cd, '__globals__')]",
    "[eval(source=\"open('{m}', 'w')\"), exec(source='import os')]",
    "[(lambda: open('{m}', 'w'))()]",
    "import os; os.system('touch {m}')",
    "[cd(folder='document'), ls(a=print)]",
    "[mkdir(dir_name='x' * 10**9)]",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_calls_are_refused_without_execution(template: str, tmp_path) -> None:
    marker = tmp_path / "pwned"
    t = mt_task_by_id("multi_turn_base_0")
    backends = Backends(t.initial_config, t.involved_classes)
    before = json.dumps({k: repr(vars(v)) for k, v in backends.instances.items()})
    step = parse_step(template.format(m=marker))
    results = backends.run_step(step)
    assert not marker.exists()
    refused = [c for c in step.calls if c.error or c.name not in backends.methods]
    assert step.malformed or refused
    assert all(r.startswith("Error during execution") for c, r in zip(step.calls, results) if c in refused)
    if all(c in refused for c in step.calls):
        assert json.dumps({k: repr(vars(v)) for k, v in backends.instances.items()}) == before


def test_backend_failures_are_error_results_not_crashes() -> None:
    t = mt_task_by_id("multi_turn_base_0")
    b = Backends(t.initial_config, t.involved_classes)
    step = "[cd(folder=None), cd(folder='document', extra=1), nosuch(a=1), cd(folder='document')]"
    results = b.run_step(parse_step(step))
    assert results[0].startswith("Error during execution: ") and "NoneType" in results[0]  # raised inside the API
    assert "unexpected keyword argument 'extra'" in results[1]  # wrong argument
    assert results[2] == "Error during execution: name 'nosuch' is not defined"  # unknown method
    assert json.loads(results[3]) == {"current_working_directory": "document"}  # later calls still run


# ---------------------------------------------------------------- teacher and per-call labels


@pytest.mark.parametrize("task_id", FIXED)
def test_teacher_steps_pass_bfcl_checks_and_distractors_are_wrong(task_id: str) -> None:
    t = mt_task_by_id(task_id)
    model = Backends(t.initial_config, t.involved_classes, t.long_context)
    grader = EpisodeGrader(t)
    for turn in range(len(t.turns)):
        assert grade_turn_intent(t, turn, intent_reference(t, turn)).correct
        assert not any(grade_turn_intent(t, turn, d).correct for d in intent_distractors(t, turn))
        executed, step_results = [], []
        while True:
            ref = step_reference(t, turn, executed)
            assert grade_step(t, turn, executed, ref).correct
            assert not any(grade_step(t, turn, executed, d).correct for d in step_distractors(t, turn, executed))
            step = parse_step(ref)
            if not step.has_calls:
                assert ref == (TURN_DONE if t.ground_truth[turn] else CANNOT_DO)
                break
            step_results.append(model.run_step(step))
            executed += [c.render() for c in step.calls]
        assert grader.end_turn(turn, model, step_results).valid
    assert grader.failure is None


def test_grade_step_labels() -> None:
    t = mt_task_by_id("multi_turn_base_0")  # turn 0: cd(document), mkdir(temp), mv(final_report.pdf -> temp)
    assert grade_step(t, 0, [], "[cd(folder='document')]").correct  # one needed call at a time is fine
    assert grade_step(t, 0, ["cd(folder='document')"], "[mv(source='final_report.pdf', destination='temp'), "
                                                        "mkdir(dir_name='temp')]").correct  # any order
    g = grade_step(t, 0, [], "[cd(folder='archive')]")
    assert g.valid and not g.correct and "does not need" in g.reason
    g = grade_step(t, 0, ["cd(folder='document')"], TURN_DONE)
    assert g.valid and not g.correct and "2 needed call(s) left" in g.reason
    assert not grade_step(t, 0, [], "[cd(folder=__import__('os'))]").valid
    assert not grade_step(t, 0, [], "[cd(folder='document'").valid
    assert grade_step(t, 2, [], "[sort(file_name='final_report.pdf')]").correct  # ground truth wrote it by position


# ---------------------------------------------------------------- whole episodes


@pytest.mark.parametrize("task_id", FIXED)
def test_episode_with_the_teacher_passes(task_id: str) -> None:
    out, session = _run(task_id)
    t = mt_task_by_id(task_id)
    assert out.success, out.detail
    kinds = collections.Counter(c["kind"] for c in session.calls)
    assert kinds["intent"] == kinds["summary"] == len(t.turns)
    assert out.steps == sum(len(g) for g in t.ground_truth)  # every ground-truth call, nothing else
    assert all(c["valid"] and c["correct"] in (True, None) for c in session.calls)
    for c in session.calls:  # the teacher's reference never reaches a prompt
        if c["kind"] == "function_call" and c["hidden"].answer.startswith("["):
            assert c["hidden"].answer not in json.dumps(c["messages"])


def test_missed_function_docs_arrive_at_their_turn() -> None:
    out, session = _run("multi_turn_miss_func_0", operator_functions="all")
    assert out.success, out.detail
    ops = [c for c in session.calls if c["kind"] == "function_call"]
    first_system = ops[0]["messages"][0]["content"]
    assert '"name": "sort"' not in first_system and '"name": "mv"' in first_system
    held_out = turn_messages(mt_task_by_id("multi_turn_miss_func_0"), 3)[0]["content"]
    assert held_out.endswith("I have updated some more functions you can choose from. What about now?")
    assert "'name': 'sort'" in held_out
    later = next(c for c in ops if c["context"]["turn"] == 3)
    assert later["messages"][0]["content"] == first_system  # BFCL never rewrites the system prompt
    assert {"role": "user", "content": held_out} in later["messages"]
    # the turn that asks for sort before it exists: the Planner picks nothing, no Operator step is made
    assert not [c for c in ops if c["context"]["turn"] == 2 and parse_step(c["text"]).has_calls]


def test_a_wrong_step_fails_the_episode_but_it_runs_on() -> None:
    t = mt_task_by_id("multi_turn_base_0")
    out, session = _run(t.id, lambda kind, n: "[cd(folder='document'), mkdir(dir_name='tmp'), "
                                               "mv(source='final_report.pdf', destination='tmp')]"
                        if (kind, n) == ("function_call", 0) else None)
    assert not out.success and "turn 0: multi_turn:instance_state_mismatch" in out.detail
    assert collections.Counter(c["kind"] for c in session.calls)["intent"] == len(t.turns)  # BFCL runs every turn
    assert session.calls[1]["valid"] and session.calls[1]["correct"] is False
    out, session = _run(t.id, lambda kind, n: "[cd(folder='document')]" if (kind, n) == ("function_call", 0) else None,
                        stop_after_failed_turn=True)
    assert out.success  # one needed call per step is fine: the teacher finishes the rest


def test_malformed_and_hostile_steps_are_recorded_and_the_episode_continues(tmp_path) -> None:
    marker = tmp_path / "pwned"
    t = mt_task_by_id("multi_turn_base_0")
    hostile = f"[cd(folder='document'), __import__('os').system('touch {marker}')]"
    script = {("function_call", 0): hostile, ("function_call", 1): "[mkdir(dir_name='temp'"}
    out, session = _run(t.id, lambda kind, n: script.get((kind, n)))
    assert not marker.exists()
    ops = [c for c in session.calls if c["kind"] == "function_call"]
    assert ops[0]["valid"] is False and "refused" in ops[0]["reason"]
    feedback = ops[1]["messages"][-1]["content"]  # BFCL's format: the results as one user message
    assert feedback.startswith("[{'role': 'tool'") and "Error during execution: only bare function names" in feedback
    assert '"current_working_directory": "document"' in feedback  # the allowed call in the same step ran
    assert ops[1]["valid"] is False and "malformed" in ops[1]["reason"]
    assert ops[2]["context"]["turn"] == 1  # the malformed step ended turn 0, as a failed decode does in BFCL
    summary = next(c for c in session.calls if c["kind"] == "summary")["messages"][-1]["content"]
    assert "- cd(folder='document') -> {" in summary and "system('touch" in summary  # each call with its result
    assert summary.count("Error during execution: only bare function names") == 1
    assert not out.success and "turn 0: multi_turn:instance_state_mismatch" in out.detail
    assert collections.Counter(c["kind"] for c in session.calls)["intent"] == len(t.turns)


def test_a_backend_exception_is_a_failed_step() -> None:
    script = {("function_call", 0): "[cd(folder=None)]"}
    out, session = _run("multi_turn_base_0", lambda kind, n: script.get((kind, n)))
    ops = [c for c in session.calls if c["kind"] == "function_call"]
    assert "Error during execution: 'NoneType' object" in ops[1]["messages"][-1]["content"]
    assert ops[1]["category"] == "debugging"  # the step after a failure is a debugging call
    assert out.success, out.detail  # the teacher recovered in the next step: BFCL only checks the end state


def test_step_limit_force_terminates() -> None:
    out, session = _run("multi_turn_base_0", lambda kind, n: "[pwd()]" if kind == "function_call" else None,
                        max_steps=3)
    assert not out.success and "force_terminated" in out.detail
    kinds = collections.Counter(c["kind"] for c in session.calls)
    assert kinds["function_call"] == 4 and kinds["intent"] == 1  # BFCL: count > limit, then the entry stops


def test_fresh_backends_per_attempt() -> None:
    sc = _scenario()
    t = mt_task_by_id("multi_turn_base_0")
    first = asyncio.run(sc.run_episode(t, ScriptedSession()))
    second = asyncio.run(sc.run_episode(t, ScriptedSession()))  # a re-run must not see the first run's moves
    assert first.success and second.success and first.steps == second.steps


def test_operator_prompt_is_bfcls_and_never_truncated() -> None:
    _, session = _run("multi_turn_long_context_0", operator_functions="all")
    op = [c for c in session.calls if c["kind"] == "function_call"][-1]
    api = bfcl_api()
    t = mt_task_by_id("multi_turn_long_context_0")
    assert op["messages"][0]["content"] == api.formulate_system_prompt(api.DEFAULT_SYSTEM_PROMPT_FORMAT, t.functions)
    results = [c for c in op["messages"] if c["role"] == "user" and c["content"].startswith("[{'role': 'tool'")]
    assert results and max(len(r["content"]) for r in results) > 2000  # long-context results arrive whole
    sel = [c for c in _run("multi_turn_base_0")[1].calls if c["kind"] == "function_call"][0]
    assert len(sel["messages"][0]["content"]) < len(op["messages"][0]["content"]) / 3  # the Planner's choice only


def test_results_message_is_bfcls_format() -> None:
    msg = results_message(["cd(folder='a')"], ['{"x": 1}'])
    assert msg == {"role": "user", "content": repr([{"role": "tool", "name": "cd(folder='a')", "content": '{"x": 1}'}])}
    t = mt_task_by_id("multi_turn_base_0")
    history = turn_messages(t, 0)
    msgs = operator_messages(t, history, t.functions)
    assert [m["role"] for m in msgs] == ["system", "user"] and history == turn_messages(t, 0)  # input not mutated


# ---------------------------------------------------------------- offline grading and options


def test_grade_call_offline() -> None:
    sc = _scenario()
    t = mt_task_by_id("multi_turn_base_0")
    assert sc.grade_call(t.id, "intent", intent_reference(t, 0), context={"turn": 0}).correct
    assert not sc.grade_call(t.id, "intent", '{"functions": []}', context={"turn": 0}).correct
    assert sc.grade_call(t.id, "function_call", step_reference(t, 0, []), context={"turn": 0, "executed": []}).correct
    ctx = {"turn": 0, "executed": ["cd(folder='document')", "mkdir(dir_name='temp')"]}
    mv = "[mv(source='final_report.pdf', destination='temp')]"
    assert sc.grade_call(t.id, "function_call", mv, context=ctx).correct
    assert not sc.grade_call(t.id, "function_call", "[cd(folder='document')]", context=ctx).correct
    assert sc.grade_call(t.id, "summary", "I moved the report.").valid
    assert not sc.grade_call(t.id, "summary", "[cd(folder='x')]").valid
    for bad in (None, {}, {"turn": 99}, {"turn": "0"}, {"turn": 0, "executed": "x"}):
        assert sc.grade_call(t.id, "function_call", "[pwd()]", context=bad) is None
    assert sc.grade_call("nope", "intent", "{}", context={"turn": 0}) is None


def test_intent_grading_matches_what_reaches_the_outcome() -> None:
    t = mt_task_by_id("multi_turn_base_0")
    needed = json.loads(intent_reference(t, 0))["functions"]
    extra = next(f["name"] for f in t.functions_at(0) if f["name"] not in needed)
    superset = json.dumps({"functions": needed + [extra]})
    # 'selected' docs: an added function still leaves the Operator every doc it needs; a dropped one does not
    assert _scenario().grade_call(t.id, "intent", superset, context={"turn": 0}).correct
    assert not _scenario().grade_call(t.id, "intent", json.dumps({"functions": needed[1:]}), context={"turn": 0}).correct
    # 'all' docs: the plan never reaches the outcome, so it is checked for validity only (ungraded, like a summary)
    every = _scenario(operator_functions="all")
    g = every.grade_call(t.id, "intent", '{"functions": []}', context={"turn": 0})
    assert g.valid and g.correct is None
    assert not every.grade_call(t.id, "intent", "not json", context={"turn": 0}).valid


def test_options_and_yaml() -> None:
    with pytest.raises(ValueError) as err:
        OperatorMultiTurnOptions(categories=["multi_turn_base", "live_simple"])
    assert all(c in str(err.value) for c in MT_CATEGORIES) and "live_simple" in str(err.value)
    with pytest.raises(ValueError):
        OperatorMultiTurnOptions(max_steps=21)
    cfg = load_config(ROOT / "scenarios" / "operator-multiturn.yaml")
    spec = next(s for s in cfg.scenarios if s.kind == "operator_multiturn")
    assert set(OperatorMultiTurnOptions.model_validate(spec.options).categories) == set(MT_CATEGORIES)


def test_tasks_match_bfcls_own_loader() -> None:
    """Docs, held-out docs (by turn) and questions as BFCL's `load_dataset_entry` builds them."""
    bfcl_api()
    from bfcl_eval.utils import load_dataset_entry

    for category in ("multi_turn_miss_func",):  # the one with held-out docs (each category takes BFCL ~8 s)
        theirs = {e["id"]: e for e in load_dataset_entry(category)}
        ours = load_multi_turn_tasks([category])
        assert len(ours) == len(theirs) == 200
        for t in ours:
            e = theirs[t.id]
            assert t.functions == e["function"] and t.turns == e["question"], t.id
            assert {str(k): v for k, v in t.missed_function.items()} == e.get("missed_function", {}), t.id


def test_planner_prompt() -> None:
    from slmshift.scenarios.bfcl.multiturn.prompts import PLANNER_EXAMPLE, planner_messages

    t = mt_task_by_id("multi_turn_miss_func_0")
    msgs = planner_messages(t, 3, ["user: Move the report.", "call: cd(folder='document') -> {}"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"] and msgs[1:3] == PLANNER_EXAMPLE
    assert "- sort: " in msgs[-1]["content"] and "cd(folder='document')" in msgs[-1]["content"]
    assert "- sort: " not in planner_messages(t, 2, [])[-1]["content"]  # not offered before its turn
    assert intent_reference(t, 3) not in json.dumps(msgs)


def test_costly_math_is_refused_and_precision_does_not_leak() -> None:
    import decimal

    import mpmath

    t = next(t for t in load_multi_turn_tasks(["multi_turn_base"]) if "MathAPI" in t.involved_classes)
    b = Backends(t.initial_config, t.involved_classes)
    prec, dps = decimal.getcontext().prec, mpmath.mp.dps
    slow = b.run_step(parse_step("[power(base=10**15, exponent=10**15), logarithm(value=2, base=3, precision=10**9)]"))
    assert all("too large to run" in r for r in slow)
    ok = b.run_step(parse_step("[square_root(number=2, precision=50), logarithm(value=8, base=2, precision=40)]"))
    assert "1.414213562373095048801688724209698078569671875376" in ok[0] and "3.0" in ok[1]
    assert (decimal.getcontext().prec, mpmath.mp.dps) == (prec, dps)  # the backend's global settings are undone
