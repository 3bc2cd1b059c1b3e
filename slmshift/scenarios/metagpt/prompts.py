"""Role prompts, after MetaGPT's role profiles and action templates, cut down to one-function programs."""

from __future__ import annotations

from slmshift.platform.types import canonical_json
from slmshift.scenarios.metagpt.data import Problem

_SYSTEM = {
    "ProductManager": "You are Alice, a Product Manager. You turn a requirement into a concise PRD.",
    "Architect": "You are Bob, an Architect. You design a simple, correct implementation for a PRD.",
    "ProjectManager": "You are Eve, a Project Manager. You break a design into ordered implementation tasks.",
    "Engineer": "You are Alex, an Engineer. You write correct, efficient, self-contained Python.",
    "QaEngineer": "You are Edward, a QA Engineer. You write tests and judge test results.",
}

_JSON_FORMAT = {
    "prd": {"goals": ["..."], "user_stories": ["As a user, I want ..."], "requirements": ["..."]},
    "design": {"approach": "...", "signature": "def name(arg: type) -> type", "edge_cases": ["..."]},
    "tasks": {"tasks": ["..."]},
    "summary": {"status": "PASS or FAIL", "send_to": "Engineer or NoOne", "reason": "..."},
}


def _msgs(role: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": _SYSTEM[role]}, {"role": "user", "content": user}]


def _json_tail(kind: str) -> str:
    return f"\nReply with only a JSON object of this form:\n{canonical_json(_JSON_FORMAT[kind])}"


def prd_messages(p: Problem) -> list[dict[str, str]]:
    return _msgs("ProductManager", f"## Requirement\nImplement this Python function:\n```python\n{p.prompt}```"
                 + _json_tail("prd"))


def design_messages(p: Problem, prd: str) -> list[dict[str, str]]:
    return _msgs("Architect", f"## Requirement\n```python\n{p.prompt}```\n## PRD\n{prd}" + _json_tail("design"))


def tasks_messages(p: Problem, design: str) -> list[dict[str, str]]:
    return _msgs("ProjectManager", f"## Function\n`{p.entry_point}`\n## Design\n{design}" + _json_tail("tasks"))


def code_messages(p: Problem, design: str, tasks: str) -> list[dict[str, str]]:
    return _msgs("Engineer", f"## Function to write\n```python\n{p.prompt}```\n## Design\n{design}\n## Tasks\n{tasks}"
                 f"\nWrite the complete function `{p.entry_point}` (with any imports and helpers it needs) in one "
                 "```python block. No tests, no explanation.")


def debug_messages(p: Problem, code: str, report: str) -> list[dict[str, str]]:
    return _msgs("Engineer", f"## Function to write\n```python\n{p.prompt}```\n## Your code\n```python\n{code}\n```"
                 f"\n## Test report\n{report}\nFix the code. Reply with the complete corrected function "
                 f"`{p.entry_point}` in one ```python block.")


def tests_messages(p: Problem, code: str) -> list[dict[str, str]]:
    return _msgs("QaEngineer", f"## Function under test\n```python\n{code}\n```\n## Its specification\n```python\n"
                 f"{p.prompt}```\nWrite extra unit tests as plain `assert {p.entry_point}(...) == ...` lines in one "
                 "```python block, taken from the specification. No imports, no functions.")


def summary_messages(p: Problem, tool_output: str) -> list[dict[str, str]]:
    return _msgs("QaEngineer", f"## Test run of `{p.entry_point}`\n{tool_output}\nIf every test passed, status is "
                 "PASS and send_to is NoOne; otherwise status is FAIL and send_to is Engineer, with the cause in "
                 "reason." + _json_tail("summary"))


def retry_message(error: str, kind: str) -> dict[str, str]:
    what = "a JSON object of the form asked for" if kind in _JSON_FORMAT else "one ```python block"
    return {"role": "user", "content": f"Your reply was rejected ({error}). Reply again with only {what}."}
