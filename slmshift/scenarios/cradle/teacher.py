"""A DOM solver for the declared MiniWoB++ tasks: from the page it derives the next right action.

It gives every Cradle call its hidden reference (what a correct model would say), so a `simulated` teacher
can play whole episodes offline. Each solver reads the current observation (and the actions already taken,
for state the DOM does not expose, such as a <select>'s choice) and returns the next step; it never sees the
task's answer key, only what is on the page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from slmshift.scenarios.cradle.actions import Action


@dataclass(frozen=True)
class Plan:
    action: Action
    subtask: str  # Cradle's task inference: the current subgoal, in words, naming the element's ref


class Unsolvable(RuntimeError):
    """The page does not hold what the solver needs (a changed task, or an unexpected page state)."""


def _field(obs: dict, key: str) -> str:
    for k, v in obs["fields"]:
        if k == key:
            return v
    raise Unsolvable(f"no field {key!r} in {obs['fields']}")


def _els(obs: dict, tag: str | None = None, **match: Any) -> list[dict]:
    out = []
    for el in obs["elements"]:
        if el["ref"] <= 0 or (tag and el["tag"] != tag):
            continue
        if all((v(el[k]) if callable(v) else el[k] == v) for k, v in match.items()):
            out.append(el)
    return out


def _one(obs: dict, tag: str | None = None, **match: Any) -> dict:
    found = _els(obs, tag, **match)
    if not found:
        raise Unsolvable(f"no {tag or 'element'} matching {match}")
    return found[0]


def _label_text(obs: dict, el: dict) -> str:
    """Text of the label an input sits in (its sibling text pieces)."""
    siblings = [e for e in obs["elements"] if e["parent"] == el["parent"] and e["tag"] == "t"]
    return " ".join(e["text"] for e in siblings).strip()


def _submit(obs: dict, text: str = "Submit") -> Plan:
    btn = _one(obs, "button", text=lambda t: t.strip().lower() == text.lower())
    return Plan(Action("click", (btn["ref"],)), f'press the "{btn["text"]}" button [{btn["ref"]}]')


def _click(el: dict, why: str) -> Plan:
    return Plan(Action("click", (el["ref"],)), f"{why} [{el['ref']}]")


def _fill(el: dict, text: str, what: str) -> Plan:
    return Plan(Action("type", (el["ref"], text)), f'type "{text}" into the {what} [{el["ref"]}]')


def click_button(obs: dict, done: list[Action]) -> Plan:
    target = _field(obs, "target")
    return _click(_one(obs, "button", text=target), f'click the "{target}" button')


def click_link(obs: dict, done: list[Action]) -> Plan:
    target = _field(obs, "target")
    return _click(_one(obs, "span", text=target, classes=lambda c: "alink" in c), f'click the link "{target}"')


def _toggle(obs: dict, tag: str, targets: set[str]) -> Plan:
    for el in _els(obs, tag):
        want = _label_text(obs, el) in targets
        if bool(el["value"]) != want:
            verb = "check" if want else "uncheck"
            return _click(el, f'{verb} "{_label_text(obs, el)}"')
    return _submit(obs)


def click_checkboxes(obs: dict, done: list[Action]) -> Plan:
    targets = {v for k, v in obs["fields"] if k.startswith("target")}
    return _toggle(obs, "input_checkbox", targets)


def click_option(obs: dict, done: list[Action]) -> Plan:
    return _toggle(obs, "input_radio", {_field(obs, "target")})


def click_tab(obs: dict, done: list[Action]) -> Plan:
    n = _field(obs, "target")
    return _click(_one(obs, "a", text=f"Tab #{n}"), f"open Tab #{n}")


def _fill_then_submit(obs: dict, wanted: list[tuple[dict, str, str]], button: str = "Submit") -> Plan:
    for el, text, what in wanted:
        if str(el["value"] or "") != text:
            return _fill(el, text, what)
    return _submit(obs, button)


def enter_text(obs: dict, done: list[Action]) -> Plan:
    return _fill_then_submit(obs, [(_one(obs, "input_text"), _field(obs, "target"), "text field")])


def enter_password(obs: dict, done: list[Action]) -> Plan:
    pw = _field(obs, "target")
    return _fill_then_submit(obs, [(el, pw, "password field") for el in _els(obs, "input_password")])


def focus_text(obs: dict, done: list[Action]) -> Plan:
    return _click(_one(obs, "input_text"), "focus the textbox")


def login_user(obs: dict, done: list[Action]) -> Plan:
    return _fill_then_submit(obs, [(_one(obs, "input_text", id="username"), _field(obs, "username"), "username field"),
                                   (_one(obs, "input_password", id="password"), _field(obs, "password"),
                                    "password field")], button="Login")


def choose_list(obs: dict, done: list[Action]) -> Plan:
    # a <select>'s choice is not in miniwob's DOM info: the solver remembers whether it typed the entry
    sel, target = _one(obs, "select"), _field(obs, "target")
    if Action("type", (sel["ref"], target)) not in done:
        return Plan(Action("type", (sel["ref"], target)), f'pick "{target}" in the list [{sel["ref"]}]')
    return _submit(obs)


def click_dialog(obs: dict, done: list[Action]) -> Plan:
    return _click(_one(obs, "button", classes=lambda c: "titlebar-close" in c), 'close the dialog with its "x"')


def click_collapsible(obs: dict, done: list[Action]) -> Plan:
    header = _one(obs, "h3")
    if "collapsed" in header["classes"]:
        return _click(header, f'expand "{header["text"]}"')
    return _submit(obs)


def use_spinner(obs: dict, done: list[Action]) -> Plan:
    # the page blocks typed input; the spinner steps by one per arrow key while it has focus
    spinner, target = _one(obs, "input_text", id="spinner"), int(_field(obs, "target"))
    try:
        value = int(str(spinner["value"]).strip() or 0)
    except ValueError:
        value = target + 1  # junk in the box: step towards the target from above
    if value == target:
        return _submit(obs)
    if not spinner["focused"]:
        return _click(spinner, "focus the spinner")
    key = "ArrowUp" if value < target else "ArrowDown"
    return Plan(Action("press", (key,)), f"press {key} to move the spinner [{spinner['ref']}] from {value} to {target}")


_MATH = re.compile(r"^\s*(-?\d+)\s*([+\-x])\s*(-?\d+)\s*=?\s*$")


def simple_arithmetic(obs: dict, done: list[Action]) -> Plan:
    problem = _one(obs, "div", id="math-problem")["text"]
    m = _MATH.match(problem)
    if not m:
        raise Unsolvable(f"cannot read the math problem {problem!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    answer = str({"+": a + b, "-": a - b, "x": a * b}[op])
    return _fill_then_submit(obs, [(_one(obs, "input_text", id="math-answer"), answer, "answer box")])


def click_button_sequence(obs: dict, done: list[Action]) -> Plan:
    one, two = _one(obs, "button", text="ONE"), _one(obs, "button", text="TWO")
    if Action("click", (one["ref"],)) not in done:
        return _click(one, "click button ONE")
    return _click(two, "click button TWO")


def click_test(obs: dict, done: list[Action]) -> Plan:
    return _click(_one(obs, "button", id="subbtn"), "click the button")


def click_test_2(obs: dict, done: list[Action]) -> Plan:
    target = _field(obs, "target")
    return _click(_one(obs, "button", text=target), f'click the "{target}" button')


SOLVERS: dict[str, Callable[[dict, list[Action]], Plan]] = {
    "click-test": click_test,
    "click-test-2": click_test_2,
    "click-button": click_button,
    "click-link": click_link,
    "click-checkboxes": click_checkboxes,
    "click-option": click_option,
    "click-tab": click_tab,
    "enter-text": enter_text,
    "enter-password": enter_password,
    "focus-text": focus_text,
    "login-user": login_user,
    "choose-list": choose_list,
    "click-dialog": click_dialog,
    "click-collapsible": click_collapsible,
    "use-spinner": use_spinner,
    "simple-arithmetic": simple_arithmetic,
    "click-button-sequence": click_button_sequence,
}
TASKS = tuple(SOLVERS)


def solve(task: str, obs: dict, done: list[Action]) -> Plan:
    """The next right step on `task` given the page and the actions taken so far this episode."""
    if task not in SOLVERS:
        raise Unsolvable(f"no DOM solver for task {task!r}; solvable: {', '.join(TASKS)}")
    return SOLVERS[task](obs, done)


def distractor_actions(obs: dict, plan: Plan, n: int = 3) -> list[Action]:
    """Plausible wrong next actions: the same verb on other elements of the page."""
    others = [el["ref"] for el in obs["elements"] if el["ref"] > 0 and el["ref"] != plan.action.ref
              and (el["leaf"] or el["tag"] in ("button", "a", "select"))]
    out = []
    for ref in others[-n:]:
        if plan.action.kind == "type":
            out.append(Action("type", (ref, plan.action.args[1])))
        else:
            out.append(Action("click", (ref,)))
    return out or [Action("press", ("Tab",))]
