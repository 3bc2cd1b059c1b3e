"""Chat prompts for the two BFCL agent steps: pick the functions (intent), then write the calls.

The call step reuses BFCL's own prompting-mode system prompt and function-doc formatting
(via the installed ``bfcl_eval``), so call accuracy stays comparable with the leaderboard's
prompting models. The intent step is our own, Open-Operator-style workflow instruction.
"""

from __future__ import annotations

import copy

from slmshift.scenarios.bfcl.data import BFCLTask
from slmshift.scenarios.bfcl.api import bfcl_api

__all__ = ["INTENT_SYSTEM_PROMPT", "intent_messages", "call_messages"]

INTENT_SYSTEM_PROMPT = (
    "You are the planning step of a workflow agent (in the style of Open Operator). "
    "A user request arrives together with the list of functions the workflow can call. "
    "Decide which of the listed functions are needed to fulfil the request. A request may need "
    "one function, several different functions, or the same function more than once (list each "
    "name once). Use only names from the list, spelled exactly as given.\n\n"
    'Answer ONLY with JSON of the form {"functions":["function_name",...]} and nothing else: '
    "no explanation, no code fences, no function arguments."
)
_DESCRIPTION_CHARS = 160
# One worked example (not from BFCL) states the output format by showing it: measured on 12 BFCL tasks,
# it took SmolLM2-135M from 0/12 to 8/12 valid intent JSON; a large model needs no such help.
INTENT_EXAMPLE = [
    {"role": "user", "content": "Request:\nWhat is the weather in Paris in celsius?\n\nAvailable functions:\n"
                                "- get_weather: Current weather for a city.\n- get_time: Current time in a time zone."
                                "\n\nWhich functions are needed?"},
    {"role": "assistant", "content": '{"functions":["get_weather"]}'},  # compact: the canonical form (canonical_json)
]


def _one_line(description: str) -> str:
    """First line of a description, cut at a word boundary so the list stays compact."""
    line = " ".join((description or "").split())
    if len(line) <= _DESCRIPTION_CHARS:
        return line
    return line[:_DESCRIPTION_CHARS].rsplit(" ", 1)[0] + " ..."


def _request_text(task: BFCLTask) -> str:
    return "\n\n".join(m["content"] for m in task.question if m.get("role") == "user")


def intent_messages(task: BFCLTask) -> list[dict]:
    """System instruction, one worked example, then the request and name/one-line-description pairs."""
    listing = "\n".join(f"- {f['name']}: {_one_line(f.get('description', ''))}" for f in task.functions)
    user = f"Request:\n{_request_text(task)}\n\nAvailable functions:\n{listing}\n\nWhich functions are needed?"
    return [
        {"role": "system", "content": INTENT_SYSTEM_PROMPT},
        *INTENT_EXAMPLE,
        {"role": "user", "content": user},
    ]


def _selected_functions(task: BFCLTask, selected: list[str] | None) -> list[dict]:
    """The chosen subset in the task's own order; all functions unless every name is known."""
    known = {f["name"] for f in task.functions}
    if not selected or not all(isinstance(n, str) and n in known for n in selected):
        return list(task.functions)
    wanted = set(selected)
    return [f for f in task.functions if f["name"] in wanted]


def call_messages(task: BFCLTask, selected: list[str] | None = None) -> list[dict]:
    """BFCL's default prompting system prompt (function docs as BFCL formats them, with its
    Python-syntax hint) followed by the task's user turn(s)."""
    api = bfcl_api()
    functions = api.language_hint(copy.deepcopy(_selected_functions(task, selected)), task.bfcl_category)
    messages = copy.deepcopy(task.question)
    # Same code path as BFCL's OSS prompting handlers: system prompt inserted (or prepended).
    return api.system_prompt_pre_processing(messages, functions, task.id)

