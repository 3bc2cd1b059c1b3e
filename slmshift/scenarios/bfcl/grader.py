"""Grade model outputs with BFCL's own decoder and AST checker, in-process (``bfcl_eval`` comes in
through the shim in ``api``). Model output is untrusted: BFCL's decoder ``eval``s ``BinOp``/``Lambda`` nodes, so every
output is ast-checked first and only literal arithmetic is let through.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from slmshift.scenarios.bfcl.api import bfcl_api
from slmshift.scenarios.bfcl.data import BFCLTask, expected_function_names, function_names

__all__ = ["Grade", "decode_calls", "call_presence", "grade_calls", "grade_intent", "intent_verdict", "INTENT_SCHEMA", "intent_schema",
           "parse_intent"]

INTENT_SCHEMA: dict = {
    "type": "object",
    "properties": {"functions": {"type": "array", "items": {"type": "string"}}},
    "required": ["functions"],
    "additionalProperties": False,
}
_MAX_CHARS = 20_000
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|$)", re.S)


@dataclass(frozen=True)
class Grade:
    """Outcome of grading one model output."""

    valid: bool  # the output parsed in the expected format
    correct: bool  # it is right per the benchmark's checker
    reason: str  # short human-readable reason ("" when correct)


def _strip_fences(text: str) -> str:
    match = _FENCE.search(text)
    inner = match.group(1).strip() if match else ""
    return inner or text.replace("```", "").strip()


_SAFE_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod)


def _is_number(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _is_number(node.operand)
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _is_literal_arith(node: ast.AST) -> bool:
    """True for arithmetic over numeric literals that is cheap to evaluate."""
    if not isinstance(node, ast.BinOp):
        return _is_number(node)
    if isinstance(node.op, ast.Pow):  # bounded, so '9**9**9' cannot hang the grader
        exp = node.right
        return (_is_number(node.left) and not isinstance(node.left, ast.BinOp)
                and isinstance(exp, ast.Constant) and type(exp.value) in (int, float) and abs(exp.value) <= 64)
    return isinstance(node.op, _SAFE_BINOPS) and _is_literal_arith(node.left) and _is_literal_arith(node.right)


def _assert_safe(candidate: str) -> None:
    """Reject anything BFCL's decoder would ``eval`` beyond plain literal arithmetic."""
    src = candidate.strip("`\n ")  # mirror default_decode_ast_prompting + ast_parse
    src = ("" if src.startswith("[") else "[") + src + ("" if src.endswith("]") else "]")
    tree = ast.parse(src.strip().strip("'"), mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Lambda) or (isinstance(node, ast.BinOp) and not _is_literal_arith(node)):
            raise ValueError("expression not allowed in arguments")


def _candidates(text: str) -> list[str]:
    """The text as BFCL would see it, then the text from each '[' (prose before it
    dropped), each also with anything after the last ']' dropped."""
    body = _strip_fences(text)
    out = [body]
    starts = [i for i, ch in enumerate(body) if ch == "["][:5]
    for i in starts:
        tail = body[i:]
        out += [tail, tail[: tail.rfind("]") + 1]]
    return list(dict.fromkeys(c for c in out if c))


def decode_calls(text: str) -> list[dict]:
    """Decode python-syntax calls with BFCL's ``default_decode_ast_prompting``.

    Raises ValueError (short reason) when nothing decodes to a non-empty call list."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty output")
    if len(text) > _MAX_CHARS:
        raise ValueError(f"output longer than {_MAX_CHARS} characters")
    api = bfcl_api()
    first_error = ""
    for candidate in _candidates(text):
        try:
            _assert_safe(candidate)
            calls = api.decode(candidate, api.ReturnFormat.PYTHON, False)
        except Exception as exc:  # SyntaxError, ValueError, RecursionError, ...
            # BFCL asserts that list elements are calls; an AssertionError has no message.
            err = "not a list of function calls" if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
            first_error = first_error or err[:160]
            continue
        if not api.is_call_format(calls):
            first_error = first_error or "not a list of function calls"
        elif not calls:
            first_error = first_error or "no function calls"
        else:
            return calls
    raise ValueError(f"unparsable function calls ({first_error or 'no function calls'})")


def grade_calls(task: BFCLTask, text: str) -> Grade:
    """Grade an Operator answer with the check BFCL applies to the task's category; never raises."""
    if task.checker == "irrelevance":
        found, why = call_presence(text)
        return (Grade(valid=True, correct=True, reason="") if found == "none"
                else Grade(valid=True, correct=False, reason=f"irrelevance_error:decoder_success: {why}"))
    if task.checker == "relevance":
        found, why = call_presence(text)
        return (Grade(valid=True, correct=True, reason="") if found == "call"
                else Grade(valid=False, correct=False, reason=f"relevance_error:decoder_failed: {why}"))
    return _grade_ast(task, text)


def _grade_ast(task: BFCLTask, text: str) -> Grade:
    """Decode then run BFCL's ast_checker for the task's category."""
    try:
        calls = decode_calls(text)
    except ValueError as exc:
        return Grade(valid=False, correct=False, reason=str(exc))
    api = bfcl_api()
    try:
        result = api.ast_checker(
            task.functions, calls, task.answer, api.Language.PYTHON, task.bfcl_category, api.model_name
        )
    except Exception as exc:  # odd values can trip the checker; that is a wrong answer
        return Grade(valid=True, correct=False, reason=f"checker error: {type(exc).__name__}: {str(exc)[:120]}")
    if result.get("valid"):
        return Grade(valid=True, correct=True, reason="")
    errors = result.get("error") or [""]
    first = errors[0] if isinstance(errors, list) else errors
    return Grade(valid=True, correct=False, reason=f"{result.get('error_type', 'wrong')}: {str(first)[:200]}")


def _call_shaped(src: str) -> bool:
    """BFCL's view of a (wrapped) output: a list whose elements are all calls."""
    try:
        body = ast.parse(src.strip().strip("'"), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return isinstance(body, ast.List) and bool(body.elts) and all(isinstance(e, ast.Call) for e in body.elts)


def call_presence(text: str) -> tuple[str, str]:
    """Does the output hold a function call, as BFCL's relevance runner decides it (its own ``decode_ast`` on
    the raw text, then ``is_empty_output``)? Returns ("call" | "none" | "refused", why). No leniency for
    fences or prose here: in the (ir)relevance categories BFCL counts only what its decoder accepts. Output
    BFCL would decode by ``eval``-ing an expression is never decoded: it is "refused", which fails both an
    irrelevance task (it is call-shaped) and a relevance task (it is no acceptable call)."""
    if not isinstance(text, str) or not text.strip():
        return "none", "empty output"
    if len(text) > _MAX_CHARS:
        return "none", f"output longer than {_MAX_CHARS} characters"
    src = text.strip("`\n ")  # default_decode_ast_prompting's own wrapping
    src = ("" if src.startswith("[") else "[") + src + ("" if src.endswith("]") else "]")
    try:
        _assert_safe(text)
    except ValueError as exc:
        if _call_shaped(src):
            return "refused", f"call with a refused expression ({exc})"
        return "none", "no function call"
    except (SyntaxError, RecursionError, MemoryError):
        return "none", "no function call (does not parse)"
    api = bfcl_api()
    try:
        decoded = api.decode(text, api.ReturnFormat.PYTHON, False)
    except Exception as exc:  # BFCL: a failed decode means no call
        return "none", f"no function call ({type(exc).__name__})"
    if api.is_empty_output(decoded):
        return "none", "no function call (empty)"
    return "call", f"decoded call(s) to {[n for c in decoded for n in c][:3]}"


# ---------------------------------------------------------------- intent (function selection)


def intent_schema(task: BFCLTask) -> dict:
    """INTENT_SCHEMA with names restricted to the task's functions (for guided decoding)."""
    items = {"type": "string", "enum": function_names(task)}
    return {**INTENT_SCHEMA, "properties": {"functions": {"type": "array", "items": items}}}


def parse_intent(text: str) -> list[str]:
    body = _strip_fences(text) if isinstance(text, str) else ""
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object")
    try:
        obj = json.loads(body[start : end + 1])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit, nesting
        raise ValueError(f"invalid JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("functions"), list):
        raise ValueError('expected {"functions": [...]}')
    if not all(isinstance(n, str) for n in obj["functions"]):
        raise ValueError("function names must be strings")
    return obj["functions"]


def intent_verdict(names: list[str], expected: list[str]) -> Grade:
    """A valid selection is correct when it cannot by itself fail the episode: it covers every needed function (the
    Operator sees only the picked ones, so a missing one is fatal) and picks nothing when nothing is needed. An extra
    function is not wrong: the Operator can still make the right call, so counting it wrong would break the episode
    replay's rule that a wrong graded call fails the episode (docs/routing.md)."""
    need = set(expected)
    missing = sorted(need - set(names))
    if need and not missing or not need and not names:
        return Grade(valid=True, correct=True, reason="")
    return Grade(valid=True, correct=False,
                 reason=f"missing {missing}" if missing else f"picked {sorted(set(names))[:5]} where none is needed")


def grade_intent(task: BFCLTask, text: str) -> Grade:
    """Valid: parses to {"functions": [names]} with only known names (extra keys are ignored); correct: see
    `intent_verdict` (a relevance task needs any one function). Never raises."""
    try:
        names = parse_intent(text)
    except ValueError as exc:
        return Grade(valid=False, correct=False, reason=str(exc))
    unknown = sorted(set(names) - set(function_names(task)))
    if unknown:
        return Grade(valid=False, correct=False, reason=f"unknown functions: {unknown[:5]}")
    if task.checker == "relevance":
        return Grade(True, True, "") if names else Grade(True, False, "no function chosen for a relevant request")
    return intent_verdict(names, expected_function_names(task))
