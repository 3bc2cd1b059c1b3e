"""Constrained decoding in the hf engine (constraints.py), on a tiny random Llama under both schedulers: outputs hold
their constraint, constrained and free rows share a batch, grammars are cached by content, and greedy constrained
output equals unconstrained output whenever that already satisfies the constraint (a property test).

The property holds for outputs whose tokens are the tokenizer's canonical tokenization of their text: where a grammar
forces bytes (a literal), llguidance allows only their canonical tokens (found here: a random model that spelled
'number' as one token got n-u-m-b-e-r under a literal regex). Trained models emit canonical tokens almost always."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slmshift.platform.types import HFOptions, LMRequest, ModelSpec, OutputConstraint
from slmshift.platform.constraint import PYTHON_BLOCK, tool_call_schema
from slmshift.serve.engines.hf import HFEngine

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "n": {"type": "integer"}},
          "required": ["city", "n"], "additionalProperties": False}
ACTION = r'(click\([0-9]{1,2}\)|press\("(Enter|Tab)"\))'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}}, "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}]


def req(content: str, max_tokens: int = 48, **kw) -> LMRequest:
    return LMRequest(experiment_id="t", episode_id="e", call_index=0, scenario="s", role="r", call_kind="k",
                     messages=[{"role": "user", "content": content}], max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module", params=["continuous", "static"])
def engine(tiny_model_dir, request):
    return HFEngine(ModelSpec(name="tiny", tier="slm", backend="hf", source=tiny_model_dir,
                              hf=HFOptions(scheduler=request.param)))


def run(engine, requests):
    out = asyncio.run(engine.generate(requests))
    assert all(r.error is None for r in out), [r.error for r in out]
    return out


def test_each_kind_of_constraint_holds_beside_free_rows(engine):
    free = [req("hi"), req("What is the weather?")]
    alone = [r.text for r in run(engine, free)]
    mixed = run(engine, [free[0], req("a", json_schema=SCHEMA, expect="json"),
                         req("b", constraint=OutputConstraint(format="action", regex=ACTION)), free[1],
                         req("c", constraint=OutputConstraint(grammar='start: "[" NAME "(x=" /[0-9]+/ ")]"\n'
                                                                      'NAME: "f" | "g"'))])
    assert [mixed[0].text, mixed[3].text] == alone and not mixed[0].constrained  # free rows are untouched
    doc = json.loads(mixed[1].text)
    assert set(doc) == {"city", "n"} and isinstance(doc["n"], int) and len(doc["city"]) <= 6
    assert re.fullmatch(ACTION, mixed[2].text) and re.fullmatch(r"\[[fg]\(x=[0-9]+\)\]", mixed[4].text)
    assert all(r.constrained for r in (mixed[1], mixed[2], mixed[4]))
    if engine.continuous:
        assert engine.stats()["mean_decode_rows"] > 1  # constrained and free rows decoded together


def test_tool_choice_required_named_and_auto(engine):
    required, named, auto = run(engine, [
        req("w", max_tokens=80, constraint=OutputConstraint(tools=TOOLS, tool_choice="required")),
        req("t", max_tokens=80, constraint=OutputConstraint(
            tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})),
        req("w", constraint=OutputConstraint(tools=TOOLS, tool_choice="auto"))])
    calls = json.loads(required.text)["tool_calls"]
    assert calls and {c["name"] for c in calls} <= {"get_weather", "get_time"}
    assert [c["name"] for c in json.loads(named.text)["tool_calls"]] == ["get_time"] * len(
        json.loads(named.text)["tool_calls"])
    # 'auto' leaves the model free to answer or call, and holds a call it starts to the tools' schema
    assert auto.constrained
    if auto.text.startswith("{"):
        assert {c["name"] for c in json.loads(auto.text)["tool_calls"]} <= {"get_weather", "get_time"}
    else:
        assert auto.text[:1] not in "[` \n"


def test_auto_tool_choice_allows_text_or_a_well_formed_call_only(byte_grammars):
    """The shapes SmolLM2 wrote under 'auto' on gateway traffic: the prompt's `{<arguments>}` copied, an argument
    named with a stray escape, spaced JSON. Each is cut where it leaves the schema; text and well-formed calls pass,
    and a call the budget cuts is closed into one that parses."""
    from slmshift.serve.gateway.common import parse_tool_calls

    tok, grammars = byte_grammars
    auto = OutputConstraint(tools=TOOLS, tool_choice="auto")
    one = OutputConstraint(tools=TOOLS, parallel_tool_calls=False)
    assert grammars.check(auto, '{"tool_calls":[{"name":"get_time","arguments":{"zone":"CET"}}]}') is None
    assert grammars.check(auto, "It is sunny in Paris {today}.") is None
    for bad in ('{"tool_calls":[{"name":"get_weather","arguments":{<arguments>}}]}',
                '{"tool_calls":[{"name":"get_weather","arguments":{"city\\":"Paris"}}]}',
                '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}',
                '{"tool_calls":[{"name":"get_date","arguments":{}}]}', ' {"tool_calls":[]}', "```json\n{}\n```"):
        assert grammars.check(auto, bad), bad
    two = '{"tool_calls":[{"name":"get_time","arguments":{"zone":"UTC"}},{"name":"get_time","arguments":{"zone":"CET"}}]}'
    assert grammars.check(auto, two) is None and grammars.check(one, two)
    # a call cut by the budget is closed into one that parses
    row = grammars.matcher(auto)
    out = _as_the_row_emits(row, tok, '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}', 40)
    assert parse_tool_calls(out, TOOLS) is not None, out


def test_unconstrained_request_ignores_its_constraint_and_bad_grammar_fails_only_its_row(engine):
    off, bad, ok = asyncio.run(engine.generate([
        req("hi", json_schema=SCHEMA, constrained=False),
        req("x", constraint=OutputConstraint(grammar="start: (")), req("y", json_schema=SCHEMA)]))
    assert not off.constrained and off.error is None
    assert bad.error and "invalid output constraint" in bad.error and ok.error is None and ok.constrained


def test_grammars_are_compiled_once_per_content(engine):
    before = engine.stats()
    run(engine, [req("a", constraint=OutputConstraint(regex="(yes|no)")) for _ in range(3)])
    after = engine.stats()
    assert after["grammar_compiles"] - before.get("grammar_compiles", 0) <= 1
    assert after["grammar_cache_hits"] - before.get("grammar_cache_hits", 0) >= 2


def test_tool_call_schema_names_an_unknown_tool_clearly():
    with pytest.raises(ValueError, match="not among the declared tools"):
        tool_call_schema(TOOLS, "nope")


# --- property: the mask never changes an output that already satisfies the constraint ------------------------------

def _constraints_satisfied_by(text: str) -> list[OutputConstraint]:
    chars = "".join(sorted(set(text)))
    cls = "[" + "".join("\\" + c if c in "\\]^-[" else c for c in chars) + "]*" if chars else "a*"
    return [OutputConstraint(regex=re.escape(text)), OutputConstraint(regex=cls),
            OutputConstraint(grammar=f"start: /{cls.replace('/', chr(92) + '/')}/ | \"\"")]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(prompt=st.text(alphabet="abcdefghij klmnop?!{}:,0123", min_size=1, max_size=24),
       max_tokens=st.integers(1, 10), which=st.integers(0, 2))
def test_greedy_constrained_equals_unconstrained_when_that_satisfies_the_constraint(engine, prompt, max_tokens,
                                                                                   which):
    free = run(engine, [req(prompt, max_tokens=max_tokens)])[0]
    ids = engine._run_batch([(q, engine._prompt_ids(q)) for q in [req(prompt, max_tokens=max_tokens)]])[0]["token_ids"]
    special = set(engine.tokenizer.all_special_ids)
    assume(not any(t in special for t in ids if t not in engine.eos_ids) and "\ufffd" not in free.text)
    if which == 0:  # a literal forces every byte: llguidance then allows only canonical tokens (see the module doc)
        assume(engine.tokenizer(free.text, add_special_tokens=False)["input_ids"] == [
            t for t in ids if t not in engine.eos_ids])
    c = _constraints_satisfied_by(free.text)[which]
    constrained = run(engine, [req(prompt, max_tokens=max_tokens, constraint=c)])[0]
    assert constrained.constrained
    assert (constrained.text, constrained.tokens_out) == (free.text, free.tokens_out)
    q = req(prompt, max_tokens=max_tokens, constraint=c)
    assert engine._run_batch([(q, engine._prompt_ids(q))], [asyncio.run(engine._matcher(q))])[0]["token_ids"] == ids
    # raw log-probs, the same tokens: equal up to float noise (a rerun's prompt comes from the prefix cache)
    assert constrained.mean_logprob == pytest.approx(free.mean_logprob, abs=1e-4)


# --- the budget: a constrained answer is closed before max_tokens cuts it ------------------------------------------

NOTES = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                          "n": {"type": "integer"}}, "required": ["notes", "n"],
         "additionalProperties": False}


@pytest.mark.parametrize("max_tokens", [20, 28, 40])
def test_a_budget_too_small_for_the_models_answer_still_ends_valid(engine, max_tokens):
    """The tiny random model fills strings until its budget runs out; without the closer every answer is cut open."""
    before = engine.stats().get("grammar_budget_closes", 0)
    out = run(engine, [req(p, max_tokens=max_tokens, json_schema=NOTES) for p in ("a", "bb", "what now?")]
              + [req("x", max_tokens=max_tokens, constraint=OutputConstraint(regex=r"```python\n([^`]|`[^`])*\n```")),
                 req("y", max_tokens=max_tokens, constraint=OutputConstraint(format="code", regex=PYTHON_BLOCK))])
    for r in out[:3]:
        doc = json.loads(r.text)
        assert set(doc) == {"notes", "n"} and doc["notes"] and isinstance(doc["n"], int)
        assert r.tokens_out <= max_tokens
    assert re.fullmatch(r"```python\n([^`]|`[^`])*\n```", out[3].text, re.S)
    # random text is no Python: the python block's closer falls back to the fence (its code: the tests below)
    assert re.fullmatch(PYTHON_BLOCK, out[4].text, re.S) and out[4].tokens_out <= max_tokens
    assert engine.stats()["grammar_budget_closes"] > before


def _references():
    """(constraint, text): the simulated teacher's answers for every scenario's constrained call kinds."""
    from slmshift.scenarios.bfcl import CATEGORIES, intent_reference, load_tasks, reference_call
    from slmshift.scenarios.bfcl.data import task_by_id
    from slmshift.scenarios.bfcl.constraints import call_constraint, intent_constraint
    from slmshift.scenarios.cradle.actions import action_constraint
    from slmshift.scenarios.metagpt import teacher
    from slmshift.scenarios.metagpt.data import load_problems
    from slmshift.scenarios.metagpt.schemas import constraint_for

    out = [(constraint_for(k), ref(p).answer) for p in load_problems(n=2, seed=0)
           for k, ref in {"prd": teacher.prd_ref, "design": teacher.design_ref, "tasks": teacher.tasks_ref,
                          "code": teacher.code_ref}.items()]
    for t in load_tasks(list(CATEGORIES), n=8, seed=0) + [task_by_id("live_simple_28-7-1")]:  # + multi-byte text
        out += [(intent_constraint(t), intent_reference(t)), (call_constraint(t), reference_call(t))]
    out += [(action_constraint([3, 14]), 'type(14, "hello")'),
            (OutputConstraint(tools=TOOLS, tool_choice="required"), '{"tool_calls":[{"name":"get_weather",'
                                                                    '"arguments":{"city":"Paris"}}]}')]
    return [(c, text) for c, text in out if c.enforceable]


def test_every_prefix_of_a_scenario_reference_has_a_completion():
    from slmshift.serve.engines.constraints import Grammars
    from slmshift.serve.tiny import build_tokenizer

    tok = build_tokenizer()  # byte-level: the longest completions
    grammars = Grammars(tok, len(tok), {tok.eos_token_id})
    checked = 0
    for c, text in _references():
        if grammars.check(c, text):
            continue  # a BFCL quirk the grammar cannot hold (tests/scenarios/test_bfcl_constraints.py)
        row = grammars.matcher(c)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for i, token in enumerate(ids):
            path = grammars._closer.path(row.matcher, 96)
            assert path is not None, (c.kind, tok.decode(ids[:i]))
            done = row.matcher.deep_copy()
            assert done.consume_tokens(path) and done.is_accepting(), (c.kind, tok.decode(path))
            assert row.advance(token) is None
            checked += 1
    assert checked > 1000


# --- python blocks: closed with a program that parses, not just a closed fence --------------------------------------

def _as_the_row_emits(row, tok, text: str, budget: int) -> str:
    """What a row emits where its model would write `text` and stop, within `budget` tokens: `pick` then `advance`,
    as the schedulers call them. Once the row departs from `text`, only its forced tokens follow."""
    ids, out = tok(text, add_special_tokens=False)["input_ids"], []
    for model in ids[:budget]:
        token = row.pick(model, budget - len(out) - 1)
        assert row.advance(token) is None
        out.append(token)
        if token != model:
            while row._plan:
                out.append(row.pick(0, budget - len(out) - 1))
                assert row.advance(out[-1]) is None
            break
    return tok.decode(out)


@pytest.fixture(scope="module")
def byte_grammars():
    from slmshift.serve.engines.constraints import Grammars
    from slmshift.serve.tiny import build_tokenizer

    tok = build_tokenizer()  # byte-level: a fence is three tokens, so a block's end is reached a byte at a time
    return tok, Grammars(tok, len(tok), {tok.eos_token_id})


def _code(text: str) -> str:
    assert re.fullmatch(PYTHON_BLOCK, text, re.S), text[-80:]
    return text[len("```python\n"):-len("\n```")]


def test_a_python_block_cut_by_the_budget_ends_with_a_program_that_parses(byte_grammars):
    import ast

    from slmshift.scenarios.metagpt import teacher
    from slmshift.scenarios.metagpt.data import load_problems
    from slmshift.scenarios.metagpt.schemas import constraint_for

    tok, grammars = byte_grammars
    c, cut = constraint_for("code"), 0
    assert c.python_block
    for p in load_problems(n=12, seed=0):
        answer = teacher.code_ref(p).answer
        n = len(tok(answer, add_special_tokens=False)["input_ids"])
        for budget in range(24, n + 8, 37):
            text = _as_the_row_emits(grammars.matcher(c), tok, answer, budget)
            ast.parse(_code(text))  # inside a docstring, mid-expression, before a body: all closed
            cut += budget < n
    assert cut > 100
    # the same rows with a fence-only closer (a regex the engine does not read as python) end unparseable
    fence_only = OutputConstraint(format="code", regex=c.regex.replace("(", "(?:"))  # the same language
    assert not fence_only.python_block
    p = load_problems(n=1, seed=0)[0]
    with pytest.raises(SyntaxError):
        ast.parse(_code(_as_the_row_emits(grammars.matcher(fence_only), tok, teacher.code_ref(p).answer, 60)))


def test_a_block_the_model_ends_unparseable_gets_an_ending_that_parses(byte_grammars):
    import ast

    from slmshift.scenarios.metagpt.schemas import constraint_for

    tok, grammars = byte_grammars
    c = constraint_for("code")
    fixes = grammars.stats()["grammar_code_fixes"]
    for broken in ("def f(x):\n    return [v for", "def f(x):\n    '''doc", "def f(x):\n    return max(x,"):
        text = _as_the_row_emits(grammars.matcher(c), tok, f"```python\n{broken}\n```", 400)
        assert text.startswith(f"```python\n{broken}")
        ast.parse(_code(text))
    assert grammars.stats()["grammar_code_fixes"] > fixes
    fine = "```python\ndef f(x):\n    return '`' + x  # a `tick` here\n```"
    assert _as_the_row_emits(grammars.matcher(c), tok, fine, 400) == fine  # an answer that parses is untouched


def test_a_token_no_program_could_follow_gives_way_to_the_models_next_choice(byte_grammars):
    """No ending mends a syntax error written before the end, so the row refuses the token that makes it."""
    tok, grammars = byte_grammars

    def fed(text):
        row = grammars.matcher(OutputConstraint(format="code", regex=PYTHON_BLOCK))
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            assert row.pick(t, 100, lambda t=t: [t]) == t and row.advance(t) is None
        return row

    paren, square, brace, colon, space = (tok(b, add_special_tokens=False)["input_ids"][0] for b in ")]}: ")
    row = fed("```python\nx = [f(1")
    assert row.pick(paren, 100, lambda: [paren, square]) == paren  # closes f(
    row.advance(paren)
    swaps = grammars.stats()["grammar_code_swaps"]
    assert row.pick(paren, 100, lambda: [paren, brace, square, paren]) == square  # `)` would close `[`
    # HumanEval/47's error: `if … :` inside a conditional expression
    row = fed("```python\ndef median(l):\n    return l[len(l) // 2] if len(l) % 2 == 1")
    assert row.pick(colon, 100, lambda: [colon, space]) == space
    assert grammars.stats()["grammar_code_swaps"] == swaps + 2
    row = fed("```python\ndef f(x):\n    return x if x")
    assert row.pick(space, 100, lambda: [colon, space]) == space  # ` else` may follow: kept


def test_code_no_ending_mends_is_not_searched_every_step(byte_grammars, monkeypatch):
    """A search that finds nothing costs up to ~0.3 s: after one, the row goes PYTHON_RETRY tokens without."""
    from slmshift.serve.engines import constraints

    tok, grammars = byte_grammars
    calls, search = [], constraints.tail
    monkeypatch.setattr(constraints, "tail", lambda code: calls.append(code) or search(code))
    broken = "```python\nx = [a if b : c" + " + c" * 90
    text = _as_the_row_emits(grammars.matcher(OutputConstraint(format="code", regex=PYTHON_BLOCK)), tok, broken, 100)
    assert text.endswith("\n```")  # the fence at least
    window = constraints.RowMatcher.WINDOW
    assert 0 < len(calls) <= 2 * (window // constraints.RowMatcher.PYTHON_RETRY + 2), len(calls)
