"""Held-out generation (`train/evaluate.py`): each call is generated with the budget it was served with, and every
verdict carries its task id (promotion resamples tasks)."""

from __future__ import annotations

import asyncio
import json

import pandas as pd
import pytest

import slmshift.scenarios  # noqa: F401  fills the scenario registry
from slmshift.agents.client import local_session
from slmshift.platform.config import ScenarioSpec
from slmshift.platform.scenario import scenario_class
from slmshift.platform.types import ModelSpec
from slmshift.serve.engines.scripted import ScriptedEngine
from slmshift.train.evaluate import DEFAULT_MAX_TOKENS, ScenarioGrader, evaluate, served_max_tokens


def _scenario(kind: str, **options):
    return scenario_class(kind)(ScenarioSpec(kind=kind, episodes=2, options=options), 0)


def _engine() -> ScriptedEngine:
    return ScriptedEngine(ModelSpec(name="scripted", tier="slm", backend="simulated"), answer=lambda r: "ok")


def _rows(**cols) -> pd.DataFrame:
    n = len(cols["call_kind"])
    base = {"record_id": [f"r{i}" for i in range(n)], "episode_id": [f"e{i}" for i in range(n)],
            "task_id": [f"t{i}" for i in range(n)], "scenario": "op", "role": "r", "category": "template",
            "expect": "text", "messages": [json.dumps([{"role": "user", "content": f"q{i}"}]) for i in range(n)],
            "target": ["x" * 400] * n}
    return pd.DataFrame({**base, **cols})


def test_held_out_calls_are_generated_with_the_served_budget_not_the_reference_length():
    """Budgets: the logged max_tokens where the log has it, else the scenario's option for the call kind, else the
    default; a short or a long reference answer changes nothing (it is unknown when serving)."""
    grader = ScenarioGrader({"op": _scenario("operator", intent_max_tokens=40, call_max_tokens=100)})
    rows = _rows(call_kind=["intent", "function_call", "function_call", "intent"],
                 scenario=["op", "op", "op", "elsewhere"], target=["a", "b" * 900, "c", "d"],
                 max_tokens=pd.array([None, None, 7, None], dtype="Int64"))
    engine = _engine()
    spec = engine.spec
    ev = evaluate(rows, spec, None, grader, engine=engine, batch_size=3)
    assert [r.max_tokens for r in engine.requests] == [40, 100, 7, DEFAULT_MAX_TOKENS]
    # the same calls with no logged column, short targets: the scenario's budgets still
    engine = _engine()
    evaluate(rows.drop(columns="max_tokens").assign(target="y"), spec, None, grader, engine=engine)
    assert [r.max_tokens for r in engine.requests] == [40, 100, 100, DEFAULT_MAX_TOKENS]
    # an explicit cap lowers them, never raises them
    engine = _engine()
    evaluate(rows, spec, None, grader, engine=engine, max_new_tokens=50)
    assert [r.max_tokens for r in engine.requests] == [40, 50, 7, 50]
    assert [v["task_id"] for v in ev.verdicts] == ["t0", "t1", "t2", "t3"]


@pytest.mark.parametrize("kind,options,task", [
    ("operator", {"intent_max_tokens": 33, "call_max_tokens": 77}, "simple_python_0"),
    ("operator_multiturn", {"intent_max_tokens": 31, "call_max_tokens": 99, "summary_max_tokens": 55},
     "multi_turn_base_0"),
])
def test_a_scenarios_token_budget_is_what_its_episodes_request(kind, options, task):
    """token_budget is read from the same options run_episode serves with: every request of a real episode (over
    the real call pipeline, the model answering with each call's reference) asks for its kind's budget."""
    from slmshift.scenarios.bfcl.data import task_by_id
    from slmshift.scenarios.bfcl.multiturn.data import mt_task_by_id

    sc = _scenario(kind, **options)
    engine = ScriptedEngine(ModelSpec(name="scripted", tier="llm", backend="simulated"))
    t = task_by_id(task) if kind == "operator" else mt_task_by_id(task)
    asyncio.run(sc.run_episode(t, local_session(engine, scenario=kind)))
    kinds = {r.call_kind for r in engine.requests}
    assert len(kinds) >= 2, kinds
    assert all(r.max_tokens == sc.token_budget(r.call_kind) for r in engine.requests)
    assert set(options.values()) >= {sc.token_budget(k) for k in kinds}


def test_every_scenario_declares_its_call_kinds_budgets():
    from slmshift.scenarios.metagpt import DEFAULT_MAX_TOKENS as METAGPT

    mg = _scenario("metagpt", max_tokens={"code": 500})
    assert mg.token_budget("code") == 500 and mg.token_budget("prd") == METAGPT["prd"]
    cr = _scenario("cradle", reflection_max_tokens=6)
    assert cr.token_budget("self_reflection") == 6 and cr.token_budget("action_planning") == 24
    assert _scenario("operator").token_budget("no_such_kind") is None
    rows = _rows(call_kind=["code", "unknown"], scenario=["mg", "mg"])
    assert served_max_tokens(rows, {"mg": mg}) == [500, DEFAULT_MAX_TOKENS]
