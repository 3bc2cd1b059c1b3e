"""What each structured call must return (pydantic), and the checkers that turn model output into a verdict.

Model output is untrusted: every checker returns a `Check`, never raises.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmshift.platform.constraint import PYTHON_BLOCK, OutputConstraint

__all__ = ["PRD", "Design", "TaskList", "RunSummary", "Check", "parse_json", "check_json", "extract_code",
           "check_tests", "SCHEMAS", "constraint_for"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")  # extra keys a model adds are harmless; missing ones are not


class PRD(_Out):
    """ProductManager's product requirement document."""

    goals: list[str] = Field(min_length=1, description="What the function is for.")
    user_stories: list[str] = Field(min_length=1, description="'As a ..., I want ...' lines.")
    requirements: list[str] = Field(min_length=1, description="Testable behaviours the code must have.")


class Design(_Out):
    """Architect's system design for a one-function program."""

    approach: str = Field(min_length=1, description="The algorithm, in a sentence or two.")
    signature: str = Field(min_length=1, description="The Python signature, e.g. 'def f(x: int) -> int'.")
    edge_cases: list[str] = Field(default_factory=list, description="Inputs that need care.")


class TaskList(_Out):
    """ProjectManager's ordered tasks for the Engineer."""

    tasks: list[str] = Field(min_length=1, description="Ordered implementation steps.")


class RunSummary(_Out):
    """QaEngineer's verdict on a test run, and who acts next."""

    status: Literal["PASS", "FAIL"]
    send_to: Literal["Engineer", "NoOne"]
    reason: str = ""


SCHEMAS: dict[str, type[_Out]] = {"prd": PRD, "design": Design, "tasks": TaskList, "summary": RunSummary}


def constraint_for(kind: str) -> OutputConstraint:
    """A call kind's output constraint: its pydantic schema with no extra keys (the checkers ignore extras, so
    forbidding them only saves tokens), or, for code, debug and tests, one ```python block (the shape the checkers
    read first)."""
    if kind in SCHEMAS:
        return OutputConstraint(format="json", json_schema={**SCHEMAS[kind].model_json_schema(),
                                                            "additionalProperties": False})
    return OutputConstraint(format="code", regex=PYTHON_BLOCK)


@dataclass(frozen=True)
class Check:
    """A call's verdict (the platform's `Verdict` protocol) plus what was parsed out of the output."""

    valid: bool
    correct: bool | None = None
    reason: str = ""
    value: Any = None


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def parse_json(text: str) -> Any:
    """The first JSON object in `text` (bare, or in a ``` fence). Raises ValueError when there is none."""
    candidates = [body for _, body in _FENCE.findall(text)] + [text]
    decoder = json.JSONDecoder()
    for cand in candidates:
        for m in re.finditer(r"\{", cand):
            try:
                obj, _ = decoder.raw_decode(cand[m.start():])
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    raise ValueError("no JSON object found")


def check_json(text: str, model: type[_Out]) -> Check:
    try:
        obj = parse_json(text)
    except ValueError as e:
        return Check(False, False, f"malformed JSON: {e}")
    try:
        value = model.model_validate(obj)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'root'}: {err['msg']}" for err in e.errors()[:3])
        return Check(False, False, f"JSON does not match the {model.__name__} schema: {errs}")
    return Check(True, None, "", value)


def _defines(tree: ast.AST, name: str) -> bool:
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in ast.walk(tree))


def extract_code(text: str, entry_point: str, prompt: str = "") -> Check:
    """The function's code from a model reply: a ```python fence (the one defining `entry_point` first), or
    the bare reply. A reply holding only the body is completed with the problem's `prompt` (signature and
    docstring); a full function is put after the prompt, so its imports and helpers stay. `value` is source that
    defines `entry_point` and parses."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]
    candidates = sorted(blocks, key=lambda b: f"def {entry_point}" not in b) + [text]
    first_error = ""
    for cand in candidates:
        for src in (cand, prompt + cand if prompt else None):
            if not src or not src.strip():
                continue
            try:
                tree = ast.parse(src)
            except (SyntaxError, ValueError) as e:
                first_error = first_error or f"code does not parse: {type(e).__name__}: {e}"
                continue
            if _defines(tree, entry_point):
                if prompt and src is cand:
                    # keep the prompt's imports and helpers (`from typing import List`, ...): models often drop
                    # them when they rewrite the function. The prompt's stub is then redefined by the reply.
                    with_prompt = f"{prompt}\n\n{cand}"
                    try:
                        ast.parse(with_prompt)
                        src = with_prompt
                    except (SyntaxError, ValueError):
                        pass
                return Check(True, None, "", src)
            first_error = first_error or f"code does not define `{entry_point}`"
    return Check(False, False, first_error or "no code in the reply")


def check_tests(text: str, entry_point: str) -> Check:
    """QA's extra tests: Python that parses, holds at least one assert and calls the function."""
    src = next((b for lang, b in _FENCE.findall(text) if lang.lower() in ("", "python", "py")), text)
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError) as e:
        return Check(False, False, f"tests do not parse: {type(e).__name__}: {e}")
    asserts = [n for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    if not asserts:
        return Check(False, False, "no assert statements")
    if not any(isinstance(n, ast.Name) and n.id == entry_point for n in ast.walk(tree)):
        return Check(False, False, f"the tests never call `{entry_point}`")
    return Check(True, None, "", src)
