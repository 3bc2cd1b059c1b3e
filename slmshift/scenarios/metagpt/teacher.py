"""Hidden references for the simulated teacher, per call kind: a correct output built from the problem (and,
for the run summary, from the real test run), plus plausible wrong ones. Only a `simulated` engine reads them;
they never enter a prompt."""

from __future__ import annotations

import ast
import doctest
import re

from slmshift.platform.types import Hidden, canonical_json
from slmshift.scenarios.metagpt.data import Problem

__all__ = ["prd_ref", "design_ref", "tasks_ref", "code_ref", "tests_ref", "summary_ref", "mutants", "docstring"]


def _fn(p: Problem) -> ast.FunctionDef | None:
    try:
        tree = ast.parse(p.prompt)
    except SyntaxError:
        return None
    return next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == p.entry_point), None)


def docstring(p: Problem) -> str:
    fn = _fn(p)
    return (ast.get_docstring(fn) or "") if fn else ""


def _sentences(p: Problem) -> list[str]:
    text = docstring(p).split(">>>")[0]
    text = re.split(r"\n\s*(?:For example|Example|Examples)\b", text)[0]
    parts = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in parts if len(s) > 3][:4] or [f"Implement {p.entry_point} as documented."]


def signature(p: Problem) -> str:
    fn = _fn(p)
    if fn is None:
        return f"def {p.entry_point}(...)"
    stub = ast.FunctionDef(name=fn.name, args=fn.args, body=[ast.Pass()], decorator_list=[], returns=fn.returns)
    return ast.unparse(ast.fix_missing_locations(stub)).split("\n")[0].rstrip(":")


def _examples(p: Problem) -> list[tuple[str, str]]:
    """(call, expected) pairs from the docstring: doctest `>>>` examples, else `f(x) == y` / `f(x) ➞ y` lines."""
    doc = docstring(p)
    try:
        pairs = [(ex.source.strip(), ex.want.strip()) for ex in doctest.DocTestParser().get_examples(doc)]
    except ValueError:
        pairs = []
    if not pairs:
        pat = re.compile(rf"({re.escape(p.entry_point)}\(.*\))\s*(?:==|➞|=>|->|should return|returns?)\s*(.+?)\s*$")
        pairs = [m.groups() for m in map(pat.search, doc.splitlines()) if m]
    out = []
    for src, want in pairs:
        want = want.rstrip(".,;")
        try:
            ast.parse(f"assert {src} == {want}")
        except SyntaxError:
            continue
        if want and p.entry_point in src:
            out.append((src, want))
    return out


def _broken(text: str) -> str:
    return text[: max(1, len(text) // 2)]  # cut mid-way: malformed JSON / code


def prd_ref(p: Problem) -> Hidden:
    s = _sentences(p)
    ok = {"goals": [f"Provide `{p.entry_point}`: {s[0]}"],
          "user_stories": [f"As a developer, I want to call {p.entry_point} so that: {s[0]}"], "requirements": s}
    answer = canonical_json(ok)
    return Hidden(answer=answer, distractors=[_broken(answer), canonical_json({"goals": ok["goals"]})])


def design_ref(p: Problem) -> Hidden:
    s = _sentences(p)
    ok = {"approach": " ".join(s[:2]), "signature": signature(p),
          "edge_cases": [f"{src} -> {want}" for src, want in _examples(p)[:3]] or ["empty input"]}
    wrong = dict(ok, signature=signature(p).replace(p.entry_point, p.entry_point + "_impl", 1))
    answer = canonical_json(ok)
    return Hidden(answer=answer, distractors=[_broken(answer), canonical_json(wrong)])


def tasks_ref(p: Problem) -> Hidden:
    ok = {"tasks": [f"Write {signature(p)} in one module", "Implement: " + _sentences(p)[0],
                    "Handle the edge cases from the design", "Check the docstring examples"]}
    answer = canonical_json(ok)
    return Hidden(answer=answer, distractors=[_broken(answer), canonical_json({"tasks": []})])


class _Mutate(ast.NodeTransformer):
    """Flips the `nth` mutable spot (comparison, arithmetic, integer constant, boolean op) in the body."""

    def __init__(self, nth: int):
        self.nth, self.seen, self.done = nth, 0, False

    def _hit(self) -> bool:
        self.seen += 1
        if self.seen - 1 == self.nth and not self.done:
            self.done = True
            return True
        return False

    _CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
    _BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mod, ast.Mod: ast.FloorDiv}

    def visit_Compare(self, node):
        self.generic_visit(node)
        if type(node.ops[0]) in self._CMP and self._hit():
            node.ops[0] = self._CMP[type(node.ops[0])]()
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if type(node.op) in self._BIN and self._hit():
            node.op = self._BIN[type(node.op)]()
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        if self._hit():
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return node

    def visit_Constant(self, node):
        if isinstance(node.value, int) and not isinstance(node.value, bool) and self._hit():
            return ast.copy_location(ast.Constant(node.value + 1), node)
        return node


def mutants(p: Problem, k: int = 2) -> list[str]:
    """Up to `k` programs, each the canonical solution with one plausible slip (an off-by-one, a flipped
    comparison or operator). Most fail HumanEval's tests; the teacher's wrong answers come from these."""
    try:
        tree = ast.parse(p.canonical_code)
    except SyntaxError:
        return []
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == p.entry_point), None)
    if fn is None:
        return []
    out: list[str] = []
    for nth in range(12):
        t = ast.parse(p.canonical_code)
        target = next(n for n in t.body if isinstance(n, ast.FunctionDef) and n.name == p.entry_point)
        m = _Mutate(nth)
        for stmt in target.body:
            m.visit(stmt)
        if not m.done:
            break
        src = ast.unparse(t)
        if src not in out:
            out.append(src)
        if len(out) >= k:
            break
    return out


def _fence(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def code_ref(p: Problem) -> Hidden:
    """The canonical solution as a full function; wrong: mutants, and a reply cut off mid-function."""
    return Hidden(answer=_fence(p.canonical_code),
                  distractors=[_fence(m) for m in mutants(p)] + [_fence(_broken(p.canonical_code))])


def tests_ref(p: Problem) -> Hidden:
    ex = _examples(p)
    lines = [f"assert {src} == {want}" for src, want in ex[:5]] or [f"assert callable({p.entry_point})"]
    wrong = [f"assert {src} != {want}" for src, want in ex[:2]] or [f"assert not callable({p.entry_point})"]
    return Hidden(answer=_fence("\n".join(lines)),
                  distractors=[_fence("\n".join(wrong)), "I would test the edge cases."])


def summary_ref(passed: bool, reason: str) -> Hidden:
    ok = {"status": "PASS", "send_to": "NoOne", "reason": "all tests passed"} if passed else \
        {"status": "FAIL", "send_to": "Engineer", "reason": reason[:200]}
    flipped = {"status": "FAIL", "send_to": "Engineer", "reason": "the tests look wrong"} if passed else \
        {"status": "PASS", "send_to": "NoOne", "reason": "looks fine"}
    answer = canonical_json(ok)
    return Hidden(answer=answer, distractors=[canonical_json(flipped), _broken(answer)])
