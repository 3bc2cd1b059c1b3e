"""`pytail.tail`: the ending that makes a cut-off Python program parse, on the shapes SmolLM2-135M's HumanEval code
was cut in (budget runs out inside a docstring, after an operator, mid-comprehension, before a colon or a body) and on
every prefix of HumanEval's canonical solutions."""

from __future__ import annotations

import ast

import pytest

from slmshift.serve.engines.pytail import in_code, tail


def parses(src: str) -> bool:
    for cand in (src, "def _():\n" + src):
        try:
            ast.parse(cand)
            return True
        except SyntaxError:
            pass
    return False


CUT = [
    'def count_up_to(n):\n    """Return primes below n.\n    count_up_to(5) -> [2,3] count_up_to(',  # docstring
    "def f(arr):\n    return arr[0] * arr[1] *",  # a dangling operator
    "def f(n):\n    return [n * n for n in",  # a comprehension cut at `in`
    "def f(name):\n    if name.startswith('1') and name.endswith",  # a header without its colon
    "def f(s):\n    return s\ndef encode_cyclic",  # a def cut after its name
    "def f(x):\n    try:\n        y = int(x)\n        if y <",  # inside try, which needs a handler
    "def f(x):\n    s = 'a\\\\",  # a string ending in a backslash
    "def f(x):\n    if x:  # positive",  # a comment, then a body
    "    total = 0\n    for v in values:\n        total +=",  # a reply holding only the body
    "def f(x):\n    '''doc\n    \"",  # a docstring ending in a lone quote
]


@pytest.mark.parametrize("src", CUT)
def test_tail_makes_the_cut_program_parse(src):
    assert not parses(src)
    ending = tail(src)
    assert ending is not None and parses(src + ending), ending
    assert "`" not in ending  # it stays inside the code block


def test_a_program_that_parses_needs_no_ending():
    assert tail("def f(x):\n    return x\n") == ""


def test_a_program_broken_before_its_end_has_no_ending():
    assert tail("def f(x) return x\n    y = 1\n") is None


def test_every_prefix_of_humaneval_solutions():
    from slmshift.scenarios.metagpt.data import load_problems

    found = total = 0
    for p in load_problems(n=40, seed=0):
        for i in range(0, len(p.canonical_code), 3):
            prefix = p.canonical_code[:i]
            ending = tail(prefix)
            total += 1
            if ending is not None:
                assert parses(prefix + ending), (p.id, prefix[-60:], ending)
                found += 1
    # the rest: a conditional expression inside brackets (`[(g[1:]) if len(g) ==`); the engine keeps the model's
    # tokens there, or closes a token earlier
    assert found / total > 0.998, found / total


def test_in_code_tells_code_from_strings_and_comments():
    assert in_code("x = 1\n")
    assert not in_code('x = """a\n')
    assert not in_code("x = 1  # note")
    assert in_code("x = f'{a}' + r'\\'' + 'b'\n")

