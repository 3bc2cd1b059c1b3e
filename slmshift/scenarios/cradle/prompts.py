"""Compact prompts for Cradle's four per-turn modules, and the checkers that grade their outputs.

Outputs are short by design (SmolLM2 on 2 cores writes ~15 tokens/s): information gathering names one
element, self-reflection says yes or no, task inference states one subgoal, action planning writes one action.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slmshift.scenarios.cradle.actions import GRAMMAR, ParseError, parse_action

KEY_HINT = "Keys: Enter, Tab, Backspace, Space, arrows; Ctrl+A, Ctrl+C, Ctrl+V to copy and paste."

SYSTEM = "You operate a web page for a user. Elements are listed as [ref] kind \"text\"."


@dataclass(frozen=True)
class Verdict:
    valid: bool
    correct: bool | None
    reason: str = ""


def _msgs(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def info_messages(page: str) -> list[dict[str, str]]:
    return _msgs(f"{page}\n\nWhich element matters for the next step? Reply with its line, e.g. [4] button \"OK\".")


def reflection_messages(page: str, last_action: str, last_page: str) -> list[dict[str, str]]:
    return _msgs(f"Before:\n{last_page}\n\nAction taken: {last_action}\n\nNow:\n{page}\n\n"
                 "Did the action do the right thing for the task? Reply yes or no.")


def inference_messages(page: str, notes: str, done: list[str]) -> list[dict[str, str]]:
    history = ", ".join(done[-4:]) or "none"
    return _msgs(f"{page}\n\n{notes}Actions so far: {history}\n"
                 "What is the current subtask? Reply in one short line naming the element's [ref].")


def action_messages(page: str, notes: str, done: list[str], examples: list[str]) -> list[dict[str, str]]:
    shots = "".join(f"Example of a solved task:\n{e}\n\n" for e in examples)
    history = ", ".join(done[-4:]) or "none"
    return _msgs(f"{shots}{page}\n\n{notes}Actions so far: {history}\n"
                 f"Reply with exactly one action: {GRAMMAR}. {KEY_HINT}")


_REF = re.compile(r"\[\s*(-?\d+)\s*\]")


def check_info(text: str, refs: set[int], target: int | None) -> Verdict:
    named = [int(m) for m in _REF.findall(text)]
    if not named:
        return Verdict(False, None, "names no element: expected a line such as [4] button \"OK\"")
    if named[0] not in refs:
        return Verdict(False, None, f"no element with ref {named[0]} on the page")
    return Verdict(True, None if target is None else named[0] == target)


def check_reflection(text: str, expected: bool | None) -> Verdict:
    word = text.strip().lower().lstrip("\"'*").split()
    if not word or word[0].strip(".,!:") not in ("yes", "no"):
        return Verdict(False, None, "expected yes or no")
    said = word[0].strip(".,!:") == "yes"
    return Verdict(True, None if expected is None else said == expected)


def check_inference(text: str, target_ref: int | None, key: str | None) -> Verdict:
    if not text.strip():
        return Verdict(False, None, "empty subtask")
    if target_ref is not None:
        return Verdict(True, target_ref in [int(m) for m in _REF.findall(text)])
    if key is not None:
        return Verdict(True, key.lower() in text.lower())
    return Verdict(True, None)


def check_action(text: str, refs: set[int], expected: str | None) -> Verdict:
    try:
        action = parse_action(text, refs)
    except ParseError as e:
        return Verdict(False, None, str(e))
    return Verdict(True, None if expected is None else str(action) == expected)
