"""Execute model-made calls against one episode's BFCL backend objects, without ``eval``.

BFCL's own executor (``execute_multi_turn_func_call``) rewrites each call string into ``instance.method(...)``
and ``eval``s it, so any expression a model writes would run. Here a step is parsed with ``ast``; a call runs
only when its name is a public method of one of the episode's backend objects and every argument is a literal
(constants, lists, tuples, dicts, sets, signed numbers, bounded literal arithmetic). Anything else (dotted or
dunder names, nested calls, names, attribute access, imports) is refused without execution and reported to the
model as BFCL reports a failing call: ``"Error during execution: ..."``.
"""

from __future__ import annotations

import ast
import copy
import decimal
import importlib
import inspect
import json
import operator
import re
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParsedCall", "ParsedStep", "parse_step", "Backends", "render_result"]

_MAX_CHARS = 20_000
_MAX_INT = 10**15  # a literal beyond this is refused: backend math on it could run for minutes
_FENCE = re.compile(r"^```[\w+-]*[ \t]*\n?(.*?)\n?```$", re.S)
# BFCL refuses these names before its eval (multi_turn_utils.execute_multi_turn_func_call); same message here.
_BFCL_BLOCKED = {"kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run"}
_CODE_START = re.compile(r"^\s*(\[|[A-Za-z_][\w.]*\s*\(|(import|from|def|class|lambda)\b)")
# Arguments whose size sets a backend method's run time (MathAPI's bigint power, mpmath/decimal precision): a
# model could otherwise stall the process for hours. BFCL's ground truth stays far below these.
_COSTLY = {("power", "exponent"): 1_000, ("power", "base"): 10**6, ("logarithm", "precision"): 1_000,
           ("square_root", "precision"): 1_000}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


@dataclass(frozen=True)
class ParsedCall:
    """One call of a step: either runnable (``error`` empty) or refused with the reason."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the call as written (ast.unparse), for logs and feedback
    error: str = ""  # why it is refused; it is then never executed

    def render(self) -> str:
        """The call in BFCL's python syntax, keyword arguments in a stable order."""
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


@dataclass(frozen=True)
class ParsedStep:
    """A model step: the calls it makes, or none (its text then answers the turn, as in BFCL)."""

    calls: tuple[ParsedCall, ...]
    malformed: str = ""  # set when the text looks like code but is no list of calls (it also ends the turn)

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)


def _strip(text: str) -> str:
    body = text.strip()
    m = _FENCE.match(body)
    return (m.group(1) if m else body).strip("`\n ")


def _literal(node: ast.AST) -> Any:
    """A literal value, or ValueError. Literal arithmetic on numbers (BFCL's decoder evaluates it) is computed
    here node by node; nothing else is evaluated."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        left, right = _literal(node.left), _literal(node.right)
        if not all(type(v) in (int, float) for v in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        return _bounded(_ARITH[type(node.op)](left, right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exp = _literal(node.left), _literal(node.right)
        if not (type(base) in (int, float) and type(exp) in (int, float) and abs(exp) <= 64 and abs(base) <= 10**6):
            raise ValueError("power too large")
        return _bounded(base**exp)
    value = ast.literal_eval(node)  # raises ValueError for calls, names, attributes, ...
    return _bounded(value)


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_INT:
        raise ValueError(f"integer literal beyond {_MAX_INT}")
    if isinstance(value, (list, tuple, set)):
        for v in value:
            _bounded(v)
    if isinstance(value, dict):
        for v in value.values():
            _bounded(v)
    return value


def _parse_call(node: ast.Call, allow_positional: bool) -> ParsedCall:
    source = ast.unparse(node)[:300]
    if not isinstance(node.func, ast.Name):
        return ParsedCall(name=source.split("(")[0][:80], source=source,
                          error="only bare function names can be called (no attribute access)")
    name = node.func.id
    if name.startswith("_"):
        return ParsedCall(name=name, source=source, error=f"{name} is not an available function")
    if node.args and not allow_positional:
        # BFCL's prompting decoder keeps keyword arguments only, so a positional one never reaches the backend
        return ParsedCall(name=name, source=source, error="pass every argument by name (param=value)")
    try:
        args = tuple(_literal(a) for a in node.args)
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise ValueError("**kwargs")
            kwargs[kw.arg] = _literal(kw.value)
    except (ValueError, TypeError, SyntaxError, ZeroDivisionError, OverflowError, MemoryError, RecursionError) as exc:
        return ParsedCall(name=name, source=source, error=f"only literal argument values are allowed ({exc})"[:200])
    return ParsedCall(name=name, args=args, kwargs=kwargs, source=source)


def parse_step(text: str, *, allow_positional: bool = False) -> ParsedStep:
    """Read a model step as BFCL's ``default_decode_execute_prompting`` does (strip backticks, wrap in ``[...]``,
    a list of calls), also unwrapping one Markdown code fence. Output that is no list of calls has no calls:
    BFCL then ends the turn. ``allow_positional`` is for BFCL's own ground-truth strings only."""
    if not isinstance(text, str) or not text.strip():
        return ParsedStep(())
    if len(text) > _MAX_CHARS:
        return ParsedStep((), malformed=f"output longer than {_MAX_CHARS} characters")
    src = _strip(text)
    wrapped = ("" if src.startswith("[") else "[") + src + ("" if src.endswith("]") else "]")
    try:
        body = ast.parse(wrapped.strip().strip("'"), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        looks_like_code = bool(_CODE_START.match(src))
        why = f"not a list of function calls ({type(exc).__name__})"
        return ParsedStep((), malformed=why if looks_like_code else "")
    elts = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    if not elts:
        return ParsedStep(())  # "[]": BFCL's empty response, the turn is done
    if not all(isinstance(e, ast.Call) for e in elts):
        return ParsedStep((), malformed="not a list of function calls" if _CODE_START.match(src) else "")
    return ParsedStep(tuple(_parse_call(e, allow_positional) for e in elts))


def render_result(result: Any) -> str:
    """A call's result as BFCL feeds it back (``execute_multi_turn_func_call``): str as is, dict as JSON."""
    if type(result) is str:
        return result
    if type(result) is dict:
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            return str(result)
    return str(result)


class Backends:
    """Fresh instances of a task's ``involved_classes``, loaded from its initial config as BFCL loads them."""

    def __init__(self, initial_config: dict, involved_classes: list[str], long_context: bool = False):
        from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING, STATELESS_CLASSES

        self.instances: dict[str, Any] = {}
        self.methods: dict[str, Any] = {}
        for class_name in involved_classes:
            cls = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)
            instance = cls()
            if class_name not in STATELESS_CLASSES:
                instance._load_scenario(copy.deepcopy(initial_config.get(class_name, {})), long_context=long_context)
            self.instances[class_name] = instance
            for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not name.startswith("_"):
                    self.methods[name] = method  # a later class wins a shared name, as in BFCL's mapping

    def execute(self, call: ParsedCall) -> str:
        """Run one call; never raises. A refused, unknown, badly-argued or failing call is an error result."""
        if call.error:
            return f"Error during execution: {call.error}"
        if call.name in _BFCL_BLOCKED:
            return f"Error during execution: Function call {call.name} is not allowed."
        method = self.methods.get(call.name)
        if method is None:
            return f"Error during execution: name '{call.name}' is not defined"
        for (name, param), limit in _COSTLY.items():
            value = call.kwargs.get(param)
            if name == call.name and isinstance(value, (int, float)) and abs(value) > limit:
                return f"Error during execution: {param}={value!r} is too large to run (limit {limit})"
        mp = sys.modules.get("mpmath")
        dps = mp.mp.dps if mp is not None else None
        try:
            with decimal.localcontext():  # MathAPI sets the thread's decimal precision: keep it to this call
                return render_result(method(*call.args, **call.kwargs))
        except Exception as exc:  # wrong argument names/types or a backend bug: a failed call, not a crash
            return f"Error during execution: {exc}"
        finally:
            mp = sys.modules.get("mpmath")
            if mp is not None:  # and mpmath's process-wide precision
                mp.mp.dps = dps if dps is not None else 15

    def run_step(self, step: ParsedStep) -> list[str]:
        """Each call of a step in order (a failing call does not stop the next, as in BFCL)."""
        return [self.execute(c) for c in step.calls]
