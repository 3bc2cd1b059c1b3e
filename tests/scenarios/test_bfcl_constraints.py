"""The BFCL calls' output constraints: the simulated teacher's references satisfy them, what they allow BFCL's decoder
parses, and they hold names, declared order and types."""

from __future__ import annotations

import pytest

from slmshift.scenarios.bfcl import CATEGORIES, intent_reference, load_tasks, reference_call
from slmshift.scenarios.bfcl.constraints import call_constraint, call_grammar, intent_constraint
from slmshift.scenarios.bfcl.grader import decode_calls
from slmshift.platform.types import OutputConstraint

AREA = {"name": "geometry.area", "parameters": {"type": "dict", "required": ["base"], "properties": {
    "base": {"type": "integer"}, "height": {"type": "float"}, "unit": {"type": "string", "enum": ["cm", "m"]},
    "tags": {"type": "array", "items": {"type": "string"}}}}}
PING = {"name": "ping", "parameters": {"type": "dict", "properties": {}}}


def _bfcl_quirk(task) -> str | None:
    """BFCL answers that no schema-following call can give: a value outside the parameter's own declared enum, or a
    parameter with no acceptable value listed. The teacher's reference copies them; a constrained model cannot."""
    for call in task.answer:
        for name, params in call.items():
            props = next(f for f in task.functions if f["name"] == name)["parameters"].get("properties", {})
            for p, values in params.items():
                enum = props.get(p, {}).get("enum")
                if not values or enum and not any(v in enum for v in values if v != ""):
                    return f"{name}.{p}: {values!r}"
    return None


def test_teacher_references_satisfy_the_intent_and_call_constraints(breaks_constraint):
    tasks = load_tasks(list(CATEGORIES), n=330, seed=0)
    failures, quirks = [], []
    for t in tasks:
        if why := breaks_constraint(intent_constraint(t), intent_reference(t)):
            failures.append((t.id, "intent", why))
        c = call_constraint(t)
        if c.enforceable and (why := breaks_constraint(c, reference_call(t))):
            (quirks if _bfcl_quirk(t) else failures).append((t.id, "function_call", why))
    assert failures == []
    assert len(quirks) <= 3  # BFCL's own data: see _bfcl_quirk


def test_the_grammar_holds_names_order_types_and_parallel_calls(breaks_constraint):
    c = OutputConstraint(grammar=call_grammar([AREA, PING]))
    ok = ["[geometry.area(base=3)]", "[geometry.area(base=3, height=2.5, unit='m'), ping()]",
          "[geometry.area(base=-1, tags=['a', \"b's\"]), geometry.area(base=2, height=4)]"]
    for text in ok:
        assert breaks_constraint(c, text) is None, text
        assert decode_calls(text)  # BFCL's decoder reads whatever the grammar allows
    bad = ["[geometry.area(height=2.5)]",  # a required parameter missing
           "[geometry.area(height=2.5, base=3)]",  # declared order
           "[geometry.area(base=3.5)]", "[geometry.area(base=3, unit='km')]",  # type, enum
           "[area(base=3)]", "geometry.area(base=3)", "[geometry.area(base=3),ping()]", "[]"]
    for text in bad:
        assert breaks_constraint(c, text) is not None, text


def test_irrelevance_tasks_are_left_free_and_the_operator_sees_its_selection():
    irrelevant = load_tasks(["irrelevance"], n=1, seed=0)[0]
    assert not call_constraint(irrelevant).enforceable
    task = next(t for t in load_tasks(["multiple"], n=20, seed=0) if len(t.functions) > 1)
    chosen = task.functions[0]["name"]
    grammar = call_constraint(task, [chosen]).grammar
    assert f'"{chosen}("' in grammar and not any(f'"{f["name"]}("' in grammar for f in task.functions[1:])


@pytest.mark.parametrize("task_id", ["simple_python_0", "parallel_0"])
def test_intent_constraint_names_only_the_tasks_functions(task_id, breaks_constraint):
    from slmshift.scenarios.bfcl.data import task_by_id

    task = task_by_id(task_id)
    c = intent_constraint(task)
    assert breaks_constraint(c, '{"functions":["not_a_function"]}') is not None
    assert breaks_constraint(c, '{"functions": []}') is not None  # canonical JSON: no whitespace
    assert breaks_constraint(c, '{"functions":[]}') is None


def test_multi_turn_references_satisfy_the_planner_and_step_constraints(breaks_constraint):
    """Every turn of a sample of BFCL multi-turn tasks, walked with the teacher's steps as the executor runs them."""
    from slmshift.scenarios.bfcl.constraints import names_schema, step_constraint
    from slmshift.scenarios.bfcl.multiturn import MT_CATEGORIES, load_multi_turn_tasks
    from slmshift.scenarios.bfcl.multiturn.executor import parse_step
    from slmshift.scenarios.bfcl.multiturn.teacher import intent_reference, step_reference

    failures = []
    for t in load_multi_turn_tasks(list(MT_CATEGORIES), n=24, seed=0):
        for turn in range(len(t.turns)):
            offered = t.functions_at(turn)
            intent = OutputConstraint(format="json", json_schema=names_schema([f["name"] for f in offered]))
            if why := breaks_constraint(intent, intent_reference(t, turn)):
                failures.append((t.id, turn, "intent", why))
            executed = []
            for _ in range(20):
                ref = step_reference(t, turn, executed)
                if why := breaks_constraint(step_constraint(offered), ref):
                    failures.append((t.id, turn, "step", why))
                step = parse_step(ref)
                if not step.has_calls:
                    break
                executed += [c.render() for c in step.calls]
    assert failures == []
