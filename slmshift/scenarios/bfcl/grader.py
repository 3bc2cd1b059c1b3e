"""Grade model outputs with BFCL's own decoder and AST checker, in-process.

``bfcl_eval`` is installed without its dependencies, so it is imported behind a small shim:
its model registry (``constants.model_config``) imports every vendor SDK, and its Java/JS
parsers need tree-sitter; neither is used for Python-syntax grading, so both are stubbed.
Model output is untrusted: BFCL's decoder ``eval``s ``BinOp``/``Lambda`` nodes, so every
output is ast-checked first and only literal arithmetic is let through.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import random
import re
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Any

from slmshift.scenarios.bfcl.data import BFCLTask, expected_function_names

__all__ = ["Grade", "decode_calls", "grade_calls", "grade_intent", "intent_reference",
           "intent_distractors", "INTENT_SCHEMA", "intent_schema"]

INTENT_SCHEMA: dict = {
    "type": "object",
    "properties": {"functions": {"type": "array", "items": {"type": "string"}}},
    "required": ["functions"],
    "additionalProperties": False,
}
_MODEL_NAME = "slmshift"  # only used by BFCL to look up underscore_to_dot (False for prompting)
_MAX_CHARS = 20_000
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|$)", re.S)


@dataclass(frozen=True)
class Grade:
    """Outcome of grading one model output."""

    valid: bool  # the output parsed in the expected format
    correct: bool  # it is right per the benchmark's checker
    reason: str  # short human-readable reason ("" when correct)


class _AnyModelConfig(dict):
    """Stub MODEL_CONFIG_MAPPING: every model is a prompting model keeping dotted names."""

    def __missing__(self, key: str) -> Any:
        return types.SimpleNamespace(underscore_to_dot=False, is_fc_model=False)


@functools.lru_cache(maxsize=None)
def bfcl_api() -> types.SimpleNamespace:
    """Import the pieces of bfcl_eval we use, without vendor SDKs or tree-sitter."""
    # bfcl_eval creates result/score/lock folders under this root at import time (default:
    # site-packages); one fixed scratch folder, so Ray workers don't each leave a new one.
    os.environ.setdefault("BFCL_PROJECT_ROOT", os.path.join(tempfile.gettempdir(), "slmshift_bfcl_root"))
    if "bfcl_eval.constants.model_config" not in sys.modules:
        stub = types.ModuleType("bfcl_eval.constants.model_config")
        stub.MODEL_CONFIG_MAPPING = _AnyModelConfig()
        sys.modules[stub.__name__] = stub
    if importlib.util.find_spec("tree_sitter") is None:
        for mod, fn in (("java_parser", "parse_java_function_call"), ("js_parser", "parse_javascript_function_call")):
            name = f"bfcl_eval.model_handler.parser.{mod}"
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                setattr(sys.modules[name], fn, _unsupported)
    from bfcl_eval.constants.default_prompts import DEFAULT_SYSTEM_PROMPT_FORMAT
    from bfcl_eval.constants.enums import Language, ReturnFormat
    from bfcl_eval.eval_checker.ast_eval import ast_checker as checker_mod
    from bfcl_eval.model_handler import utils as handler_utils
    from bfcl_eval import utils as bfcl_utils

    mapping, model_name = checker_mod.MODEL_CONFIG_MAPPING, _MODEL_NAME
    if not isinstance(mapping, _AnyModelConfig):  # the real registry was imported elsewhere
        keep_dots = (k for k, c in mapping.items() if "_" not in k and not getattr(c, "underscore_to_dot", 1))
        model_name = next(keep_dots, _MODEL_NAME)
    return types.SimpleNamespace(
        ast_checker=checker_mod.ast_checker,
        decode=handler_utils.default_decode_ast_prompting,
        system_prompt_pre_processing=handler_utils.system_prompt_pre_processing_chat_model,
        formulate_system_prompt=handler_utils.formulate_system_prompt,
        language_hint=bfcl_utils._func_doc_language_specific_pre_processing,
        is_call_format=bfcl_utils.is_function_calling_format_output,
        DEFAULT_SYSTEM_PROMPT_FORMAT=DEFAULT_SYSTEM_PROMPT_FORMAT,
        Language=Language,
        ReturnFormat=ReturnFormat,
        model_name=model_name,
    )


def _unsupported(*_: Any, **__: Any) -> Any:
    raise NotImplementedError("Java/JavaScript decoding needs tree-sitter")


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
    """Decode then run BFCL's ast_checker for the task's category; never raises."""
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


# ---------------------------------------------------------------- intent (function selection)


def _function_names(task: BFCLTask) -> list[str]:
    return [f["name"] for f in task.functions]


def intent_schema(task: BFCLTask) -> dict:
    """INTENT_SCHEMA with names restricted to the task's functions (for guided decoding)."""
    items = {"type": "string", "enum": _function_names(task)}
    return {**INTENT_SCHEMA, "properties": {"functions": {"type": "array", "items": items}}}


def _parse_intent(text: str) -> list[str]:
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


def grade_intent(task: BFCLTask, text: str) -> Grade:
    """Valid: parses to {"functions": [names]} with only known names (extra keys are ignored);
    correct: the set of names equals the ground truth's. Never raises."""
    try:
        names = _parse_intent(text)
    except ValueError as exc:
        return Grade(valid=False, correct=False, reason=str(exc))
    unknown = sorted(set(names) - set(_function_names(task)))
    if unknown:
        return Grade(valid=False, correct=False, reason=f"unknown functions: {unknown[:5]}")
    expected = set(expected_function_names(task))
    if set(names) == expected:
        return Grade(valid=True, correct=True, reason="")
    missing, extra = sorted(expected - set(names)), sorted(set(names) - expected)
    return Grade(valid=True, correct=False, reason=f"missing {missing}, extra {extra}")


def intent_reference(task: BFCLTask) -> str:
    """The correct intent JSON."""
    return json.dumps({"functions": expected_function_names(task)})


def intent_distractors(task: BFCLTask, seed: int = 0) -> list[str]:
    """Wrong selections of valid shape: one needed function dropped, an unneeded one added or
    swapped in, or nothing selected."""
    rng = random.Random(f"slmshift-bfcl-intent:{seed}:{task.id}")
    expected = expected_function_names(task)
    others = [n for n in _function_names(task) if n not in expected]
    out: list[list[str]] = []
    if len(expected) > 1:
        drop = rng.randrange(len(expected))
        out.append(expected[:drop] + expected[drop + 1 :])
    if others:
        extra = rng.choice(others)
        out.append(expected + [extra])
        i = rng.randrange(len(expected))
        out.append(expected[:i] + [extra] + expected[i + 1 :])
    rng.shuffle(out)
    out.append([])  # "nothing to call" is always wrong here, so keep it as the last resort
    return [json.dumps({"functions": names}) for names in out][:3]
