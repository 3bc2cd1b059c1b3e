"""The output constraints of the BFCL calls: the Planner's intent JSON and the Operator's calls, in the syntax BFCL's
decoder parses (`[f(a=1, b='x'), g()]`), with each function's parameters: names, declared order, types, enums.

The grammar (Lark, llguidance's dialect) is also the canonical serialisation the simulated teacher's references use
(`teacher.format_calls`): parameters in the function's declared order, optional ones may be left out, `, ` between
arguments and calls, `=` without spaces, values as Python literals (`repr`). Parallel calls are a list of calls, of
the same or different functions. A multi-turn Operator step (`step_constraint`) may instead be one line of prose,
which ends the turn as in BFCL.
"""

from __future__ import annotations

import json
from typing import Any

from slmshift.platform.types import OutputConstraint
from slmshift.scenarios.bfcl.data import BFCLTask
from slmshift.scenarios.bfcl.grader import intent_schema
from slmshift.scenarios.bfcl.prompts import _selected_functions

__all__ = ["call_grammar", "call_constraint", "intent_constraint", "step_constraint", "names_schema", "CALL_TERMINALS"]

# Python literals as BFCL's decoder reads them. Strings take either quote (repr picks '...' unless the text holds a
# quote); a float may be written as an integer (the checker accepts it).
CALL_TERMINALS = r"""
STR: /'([^'\\\n]|\\.)*'/ | /"([^"\\\n]|\\.)*"/
INT: /-?[0-9]+/
FLOAT: /-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?/
BOOL: "True" | "False"
pyval: STR | FLOAT | BOOL | "None" | "[" (pyval (", " pyval)*)? "]" | "(" (pyval (", " pyval)*)? ")" | pydict
pydict: "{" (STR ": " pyval (", " STR ": " pyval)*)? "}"
"""


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _value(spec: dict[str, Any]) -> str:
    """The grammar expression for one parameter's value."""
    if spec.get("enum"):
        return "(" + " | ".join(_lit(repr(v)) for v in spec["enum"]) + ")"
    kind = spec.get("type")
    if kind == "string":
        return "STR"
    if kind == "integer":
        return "INT"
    if kind in ("float", "number"):
        return "FLOAT"
    if kind == "boolean":
        return "BOOL"
    if kind in ("array", "tuple"):
        item = _value(spec.get("items") or {})
        listed = f'"[" ({item} (", " {item})*)? "]"'
        return f'({listed} | "(" ({item} (", " {item})*)? ")")' if kind == "tuple" else f"({listed})"
    if kind == "dict":
        return "pydict"
    return "pyval"


def _arguments(params: list[tuple[str, str, bool]]) -> str:
    """Keyword arguments in declared order, optional ones omissible: the first one written carries no ', ', so one
    alternative per possible first argument (up to and including the first required one)."""
    if not params:
        return '""'
    alts = []
    for k, (name, value, required) in enumerate(params):
        rest = []
        for other, val, req in params[k + 1 :]:
            part = f'", {other}=" {val}'
            rest.append(part if req else f"({part})?")
        alts.append(" ".join([f'"{name}=" {value}', *rest]))
        if required:
            break
    else:
        alts.append('""')  # every parameter optional: none at all
    return " | ".join(f"({a})" for a in alts)


def call_grammar(functions: list[dict[str, Any]], prose: bool = False) -> str:
    """A Lark grammar for one or more calls of `functions` (BFCL's function docs); with `prose`, or one line of text
    that is no call list (a multi-turn step that ends its turn)."""
    rules = []
    for i, fn in enumerate(functions):
        doc = fn.get("parameters") or {}
        props, required = doc.get("properties") or {}, set(doc.get("required") or [])
        params = [(name, _value(spec), name in required) for name, spec in props.items()]
        rules.append(f'fn{i}: {_lit(fn["name"] + "(")} ({_arguments(params)}) ")"')
    calls = " | ".join(f"fn{i}" for i in range(len(functions)))
    start = ['start: calls | PROSE', r"PROSE: /[A-Za-z][^\n]*/"] if prose else ["start: calls"]
    return "\n".join([*start, 'calls: "[" call (", " call)* "]"', f"call: {calls}", *rules]) + CALL_TERMINALS


def call_constraint(task: BFCLTask, selected: list[str] | None = None) -> OutputConstraint:
    """The Operator's constraint: calls of the functions its prompt shows (the Planner's `selected`, as
    `call_messages` picks them); free text for an irrelevance task, whose right answer is no call."""
    if task.checker == "irrelevance":
        return OutputConstraint(format="code")
    return OutputConstraint(format="code", grammar=call_grammar(_selected_functions(task, selected)))


def step_constraint(docs: list[dict[str, Any]]) -> OutputConstraint:
    """A multi-turn Operator step: calls of the offered `docs`, or a line of prose that ends the turn."""
    return OutputConstraint(format="code", grammar=call_grammar(docs, prose=True))


def names_schema(names: list[str]) -> dict[str, Any]:
    """The intent JSON naming only `names` (a multi-turn Planner's offered functions)."""
    return {"type": "object", "properties": {"functions": {"type": "array", "items": {"type": "string", "enum": names}}},
            "required": ["functions"], "additionalProperties": False}


def intent_constraint(task: BFCLTask) -> OutputConstraint:
    """The Planner's constraint: {"functions": [...]} naming only the task's functions."""
    return OutputConstraint(format="json", json_schema=intent_schema(task))
