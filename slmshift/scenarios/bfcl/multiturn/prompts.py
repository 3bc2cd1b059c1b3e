"""Chat prompts for a multi-turn episode: the Planner's per-turn plan, the Operator's steps, the turn summary.

The Operator's conversation is BFCL's prompting-mode one: BFCL's system prompt with the function docs (its own
``formulate_system_prompt`` via ``system_prompt_pre_processing_chat_model``), the user turns, each model step
as an assistant message and its execution results as one user message in BFCL's format
(``format_execution_results_prompting``), and a held-out function's docs as BFCL's own user message at its turn.
Nothing is ever cut: a prompt too long for a model fails in its engine, never silently loses instructions.
"""

from __future__ import annotations

import copy

from slmshift.scenarios.bfcl.api import bfcl_api
from slmshift.scenarios.bfcl.multiturn.data import MultiTurnTask

__all__ = ["PLANNER_SYSTEM_PROMPT", "PLANNER_EXAMPLE", "SUMMARY_SYSTEM_PROMPT", "turn_messages", "results_message",
           "operator_messages", "planner_messages", "summary_messages", "select_docs", "digest_line"]

PLANNER_SYSTEM_PROMPT = (
    "You are the planning step of a workflow agent (in the style of Open Operator) that operates real "
    "applications through function calls over a conversation with a user. For the user's latest request, decide "
    "which of the listed functions must be called in this turn, in the order they will be used (list each name "
    "once). If none of the functions can do what is asked, or the request lacks a detail a call needs, answer with "
    "an empty list: the agent will then ask the user instead of acting. Use only names from the list, spelled "
    "exactly as given.\n\n"
    'Answer ONLY with JSON of the form {"functions": ["function_name", ...]} and nothing else.'
)
# A worked example (not from BFCL) shows the output format, as the single-turn Planner's does: small models
# copy a shown format far more reliably than a described one.
PLANNER_EXAMPLE = [
    {"role": "user", "content": "Earlier in this conversation:\nuser: Show my calendar for today.\ncall: "
                                "list_events(day='today') -> []\n\nLatest request:\nBook a meeting with Ana at 3pm "
                                "and email her the invite.\n\nAvailable functions:\n- list_events: Events of a day."
                                "\n- create_event: Add an event.\n- send_email: Send an email.\n\nWhich functions "
                                "must be called for the latest request?"},
    {"role": "assistant", "content": '{"functions": ["create_event", "send_email"]}'},
]
SUMMARY_SYSTEM_PROMPT = (
    "You are the reporting step of a workflow agent. The user's request and the function calls the agent made for "
    "it (with their results) follow. In one or two sentences of plain text, tell the user what was done and the "
    "key results, or what is missing to do it. Do not write any function call."
)
_DESCRIPTION_CHARS = 120
_RESULT_CHARS = 400  # the Planner's digest of earlier steps only; the Operator always sees full results


def turn_messages(task: MultiTurnTask, turn: int) -> list[dict]:
    """The user messages that open a turn; at a held-out function's turn, BFCL's own message with its docs."""
    if turn in task.missed_function:
        from bfcl_eval.constants.default_prompts import DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_PROMPTING

        bfcl_api()
        text = DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_PROMPTING.format(functions=task.missed_function[turn])
        return [{"role": "user", "content": text}]
    return copy.deepcopy(task.turns[turn])


def results_message(call_names: list[str], results: list[str]) -> dict:
    """Execution results as BFCL's API prompting handlers feed them back: one user message."""
    from bfcl_eval.model_handler.utils import format_execution_results_prompting

    bfcl_api()
    text = format_execution_results_prompting({}, results, {"model_responses_decoded": call_names})
    return {"role": "user", "content": text}


def select_docs(task: MultiTurnTask, turn: int, selected: list[str] | None) -> list[dict]:
    """The docs offered so far, narrowed to the Planner's choice when every chosen name is known."""
    offered = task.functions_at(turn)
    known = {f["name"] for f in offered}
    if not selected or not all(isinstance(n, str) and n in known for n in selected):
        return offered
    wanted = set(selected)
    return [f for f in offered if f["name"] in wanted]


def operator_messages(task: MultiTurnTask, history: list[dict], docs: list[dict]) -> list[dict]:
    """BFCL's system prompt over ``docs``, then the whole conversation so far (never truncated)."""
    api = bfcl_api()
    messages = copy.deepcopy(history)
    return api.system_prompt_pre_processing(messages, copy.deepcopy(docs), task.id)


def _one_line(text: str, limit: int) -> str:
    line = " ".join((text or "").split())
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0] + f" ...[{len(line) - limit} more characters]"


def planner_messages(task: MultiTurnTask, turn: int, digest: list[str]) -> list[dict]:
    """The Planner's view: the functions offered so far (name and one-line description), what happened in
    earlier turns (``digest``: one line per request, call and result), and the current request."""
    listing = "\n".join(f"- {f['name']}: {_one_line(f.get('description', ''), _DESCRIPTION_CHARS)}"
                        for f in task.functions_at(turn))
    request = "\n".join(m["content"] for m in turn_messages(task, turn) if m.get("role") == "user")
    if turn in task.missed_function:
        request = "(new functions were added; continue with the user's earlier request)"
    earlier = "\n".join(digest) if digest else "(this is the first request)"
    user = (f"Earlier in this conversation:\n{earlier}\n\nLatest request:\n{request}\n\n"
            f"Available functions:\n{listing}\n\nWhich functions must be called for the latest request?")
    return [{"role": "system", "content": PLANNER_SYSTEM_PROMPT}, *PLANNER_EXAMPLE, {"role": "user", "content": user}]


def digest_line(kind: str, text: str) -> str:
    """One line of the Planner's digest (long results are shortened there, and say so)."""
    return f"{kind}: {_one_line(text, _RESULT_CHARS)}"


def summary_messages(request: str, calls: list[str], results: list[str]) -> list[dict]:
    done = "\n".join(f"- {c} -> {_one_line(r, _RESULT_CHARS)}" for c, r in zip(calls, results)) or "(no calls)"
    user = f"Request:\n{request}\n\nCalls made for it:\n{done}\n\nYour answer to the user:"
    return [{"role": "system", "content": SUMMARY_SYSTEM_PROMPT}, {"role": "user", "content": user}]
