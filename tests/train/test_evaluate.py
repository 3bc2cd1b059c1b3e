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


def test_parts_on_one_model_go_to_a_continuous_engine_in_one_pass_each_row_with_its_adapter():
    """`evaluate_parts` (S4's clusters, S5's new adapters and the ones in force): a continuous-batching engine has
    every part's calls in flight at once, each with its part's adapter, and each part gets back its own verdicts;
    an engine without continuous batching takes the parts one after another."""
    from slmshift.train.evaluate import evaluate_parts

    class Engine(ScriptedEngine):
        continuous = True

        def __init__(self, spec, **kw):
            super().__init__(spec, **kw)
            self.in_flight = self.most = 0

        async def generate(self, requests):
            self.in_flight += len(requests)
            self.most = max(self.most, self.in_flight)
            await asyncio.sleep(0.01)
            self.in_flight -= len(requests)
            return await super().generate(requests)

    grader = ScenarioGrader({"op": _scenario("operator")})
    spec = ModelSpec(name="scripted", tier="slm", backend="simulated")
    a, b = _rows(call_kind=["intent"] * 3), _rows(call_kind=["intent"] * 2).assign(record_id=["b0", "b1"])
    engine = Engine(spec, answer=lambda r: f"answer of {r.adapter}")
    out = evaluate_parts([("a", a, "alpha"), ("b", b, None), ("none", a.iloc[:0], "gamma")], spec, grader,
                         engine=engine)
    assert engine.most == 5  # every call of every part at once
    assert [r.adapter for r in engine.requests] == ["alpha"] * 3 + [None] * 2
    assert [v["output"] for v in out["a"].verdicts] == ["answer of alpha"] * 3 and out["a"].adapter == "alpha"
    assert [v["record_id"] for v in out["b"].verdicts] == ["b0", "b1"] and out["b"].n == 2
    assert out["none"].n == 0
    static = Engine(spec, answer=lambda r: "x")
    static.continuous = False
    evaluate_parts([("a", a, "alpha"), ("b", b, None)], spec, grader, engine=static, batch_size=16)
    assert static.most == 3  # part by part, as the static scheduler's batches took one adapter each
