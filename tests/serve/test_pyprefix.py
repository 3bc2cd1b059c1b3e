"""`pyprefix.viable`: is a text the start of some Python program? It must hold for every prefix of code that parses
(or the hf engine would push SmolLM2 off valid code), and fail for the syntax errors SmolLM2 wrote before the end of
MetaGPT's code (which no ending mends)."""

from __future__ import annotations

import ast
import pathlib
import random

import pytest

from slmshift.serve.engines.pyprefix import Prefix, viable
from tests.serve.test_pytail import CUT


def test_every_prefix_of_humaneval_solutions_can_go_on():
    from slmshift.scenarios.metagpt.data import load_problems

    for p in load_problems(n=20, seed=1):
        bad = [i for i in range(0, len(p.canonical_code) + 1, 3) if not viable(p.canonical_code[:i])]
        assert not bad, (p.id, p.canonical_code[:bad[0]][-60:])


def test_a_rows_checks_as_its_code_grows_agree_with_one_off_checks():
    """A row's `Prefix` resumes after the last closed newline; the tokens it refuses on the way (a `)` that closes
    nothing, ` :` in an expression) must not change what it says later."""
    from slmshift.scenarios.metagpt.data import load_problems

    for p in load_problems(n=8, seed=2):
        row, code = Prefix(), p.canonical_code
        for i in range(0, len(code) + 1, 2):
            for text in (code[:i] + ")", code[:i] + " :", code[:i]):
                assert row.viable(text) == viable(text), (p.id, text[-60:])


def test_prefixes_of_our_own_files_can_go_on():
    """Code of every shape our package holds (decorators, f-strings, annotations, keyword-only parameters, `**`
    arguments with trailing commas, lambdas, walrus, `match`, relative imports), cut at 15 places per file."""
    root = pathlib.Path(__file__).resolve().parents[2] / "slmshift"
    rng = random.Random(0)
    files = sorted(root.rglob("*.py"))
    for path in rng.sample(files, min(40, len(files))):
        src = path.read_text()
        ast.parse(src)
        for i in sorted(rng.sample(range(len(src) + 1), min(15, len(src) + 1))) + [len(src)]:
            assert viable(src[:i]), (str(path), src[:i][-80:])


@pytest.mark.parametrize("src", CUT + [
    "    x = 1\n    if x:\n        return",  # a reply holding only a function's body
    "def f(x):\n    return x if x el",  # a keyword cut mid-word
    "def f(x):\n    s = f'{x!r}",  # an f-string cut
    "def f(x):\n    return 1e-",  # a number cut at its exponent
    "def f(x):\n    return x !",  # `!` of `!=`
    "def f(x):\n    for _ in range(x):\n        match = x\n        case = 1\n",  # soft keywords as names
    "x = (1 +\n     2)\ny = 3 \\",  # brackets over lines, a backslash
    "def f(x):\n    if x:\n        y = 1\n    \n  # note\n",  # blank and comment lines at any column
])
def test_cut_code_can_go_on(src):
    assert viable(src)


@pytest.mark.parametrize("src", [
    "def f(lst):\n    return sum(x for x in lst if x > 0) for y in lst",  # a second `for` after a call
    "def f(l):\n    return l[len(l) // 2] if len(l) % 2 == 1 if x :",  # `if … :` inside a conditional expression
    "def f(x) return",
    "def f(x):\n    y = [1, 2)",  # `)` closing a `[`
    "x = 1)",
    "def f(x):\n    return x\n  y = 2",  # a dedent to no enclosing block's column
    "def f(x):\n    return x if x\n",  # a line ended before its expression
    "def f(x):\n    x = = 1",
])
def test_a_syntax_error_before_the_end_cannot_go_on(src):
    assert not viable(src)
