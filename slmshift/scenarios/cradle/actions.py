"""The action grammar models write, parsed strictly with `ast` (literal-only call nodes; never evaluated).

    click(ref)              click the element with that ref
    type(ref, "text")       replace the content of a field (or pick a list entry) by typing text
    press("Enter")          press one key: Enter, Tab, Backspace, Space, ArrowUp/Down/Left/Right, ...,
                            or a clipboard chord: Ctrl+A (select all), Ctrl+C, Ctrl+X, Ctrl+V

One call per action. Prose around the call (``Action: click(4)``, code fences) is tolerated; anything else is a
`ParseError` whose message says what is wrong, and the scenario records it as an invalid call.

`action_constraint(refs)` is the same grammar as an output constraint, in its canonical form (`str(Action)`: one
call, the page's refs only, text as a JSON string of at most 64 characters, a known key), which engines enforce.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from slmshift.platform.types import OutputConstraint

TEXT_MAX_LEN = 64  # miniwob's TYPING_MAX_LENGTH
# Key names the grammar accepts -> miniwob's PRESS_KEY names (a subset of its DEFAULT_ALLOWED_KEYS).
KEYS = {k: f"<{k}>" for k in ("Enter", "Tab", "Backspace", "Delete", "Space", "PageUp", "PageDown",
                              "ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight")}
KEYS |= {f"Ctrl+{c.upper()}": f"C-{c}" for c in "acxv"}  # miniwob's chords: select all, copy, cut, paste
_CHORD = re.compile(r"(?i)(?:ctrl|control|c)\s*[+-]\s*([acxv])")
_ARITY = {"click": (("ref", int),), "type": (("ref", int), ("text", str)), "press": (("key", str),)}
# A verb inside another expression (a string, an attribute, an argument) is not an action: exec('click(4)').
_START = re.compile(r"(?<![\w.'\"(\[,=])(click|type|press)\s*\(")
GRAMMAR = 'click(ref) | type(ref, "text") | press("Enter")'


_JSON_CHAR = r'([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'


def action_constraint(refs: Iterable[int]) -> OutputConstraint:
    """The action grammar as a regex over the page's `refs`: what `str(Action)` writes and `parse_action` accepts."""
    keys = "|".join(re.escape(k) for k in KEYS)
    alts = [rf'press\("({keys})"\)']
    ref = "|".join(str(r) for r in sorted(set(refs)))
    if ref:
        alts = [rf"click\(({ref})\)", rf'type\(({ref}), "{_JSON_CHAR}{{0,{TEXT_MAX_LEN}}}"\)', *alts]
    return OutputConstraint(format="action", regex="|".join(alts))


class ParseError(ValueError):
    """An action that does not follow the grammar, or names something not on the page."""


@dataclass(frozen=True)
class Action:
    kind: str  # click | type | press
    args: tuple

    def __str__(self) -> str:
        # json.dumps writes a double-quoted string that is also a valid Python literal
        args = (json.dumps(a, ensure_ascii=False) if isinstance(a, str) else str(a) for a in self.args)
        return f"{self.kind}({', '.join(args)})"

    @property
    def ref(self) -> int | None:
        return self.args[0] if self.kind in ("click", "type") else None

    def env_args(self) -> tuple[str, tuple]:
        """(kind, args) as `MiniWoBBrowser.step` takes them."""
        if self.kind == "press":
            return "press", (KEYS[self.args[0]],)
        return self.kind, self.args


def _candidates(text: str) -> list[str]:
    """Substrings that start at a grammar verb and end at a closing parenthesis, shortest first."""
    out = []
    for m in _START.finditer(text):
        for end in (i for i, ch in enumerate(text) if ch == ")" and i > m.start()):
            out.append(text[m.start():end + 1])
    return out


def _literal(node: ast.expr, name: str, want: type) -> object:
    if not isinstance(node, ast.Constant) or isinstance(node.value, bool):
        raise ParseError(f"argument {name!r} must be a literal {want.__name__}, not an expression")
    value = node.value
    if want is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if want is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # click("4") is a common slip; the ref is still unambiguous
    if not isinstance(value, want):
        raise ParseError(f"argument {name!r} must be {want.__name__}, got {type(value).__name__}")
    return value


def _from_call(node: ast.AST) -> Action:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ParseError(f"not an action call; use {GRAMMAR}")
    kind = node.func.id
    if kind not in _ARITY:
        raise ParseError(f"unknown action {kind!r}; use {GRAMMAR}")
    params = _ARITY[kind]
    given = list(node.args)
    if any(isinstance(a, ast.Starred) for a in given):
        raise ParseError("starred arguments are not allowed")
    by_name = {}
    for kw in node.keywords:
        if kw.arg is None or kw.arg not in dict(params):
            raise ParseError(f"{kind}() has no argument {kw.arg!r}")
        by_name[kw.arg] = kw.value
    if len(given) + len(by_name) != len(params):
        raise ParseError(f"{kind}() takes {len(params)} argument{'s' * (len(params) > 1)}: "
                         f"{kind}({', '.join(p for p, _ in params)})")
    values = []
    for i, (pname, ptype) in enumerate(params):
        arg = given[i] if i < len(given) else by_name.get(pname)
        if arg is None:
            raise ParseError(f"{kind}() is missing argument {pname!r}")
        values.append(_literal(arg, pname, ptype))
    if kind == "press":
        key = str(values[0]).strip("<>")
        key = {"Return": "Enter", "Esc": "Escape", " ": "Space"}.get(key, key)
        chord = _CHORD.fullmatch(key)
        if chord:
            key = f"Ctrl+{chord.group(1).upper()}"
        if key not in KEYS:
            raise ParseError(f"press() key {values[0]!r} is not allowed; keys: {', '.join(KEYS)}")
        values[0] = key
    if kind == "type" and len(values[1]) > TEXT_MAX_LEN:
        raise ParseError(f"type() text is {len(values[1])} characters; at most {TEXT_MAX_LEN}")
    return Action(kind, tuple(values))


def parse_action(text: str, refs: set[int] | None = None) -> Action:
    """The first well-formed action call in `text`.

    Args:
        text: model output (untrusted).
        refs: refs of clickable elements on the current page; a ref outside it is rejected.

    Raises:
        ParseError: no action call, a malformed one, or an unknown ref.
    """
    if not isinstance(text, str) or not text.strip():
        raise ParseError(f"empty output; expected one action: {GRAMMAR}")
    first_error: ParseError | None = None
    for cand in _candidates(text[:2000]):
        try:
            tree = ast.parse(cand, mode="eval")
        except (SyntaxError, ValueError):
            continue  # try a longer candidate: the call may contain ')' inside a string
        try:
            action = _from_call(tree.body)
        except ParseError as e:
            first_error = first_error or e
            break  # a well-formed call with bad arguments: report it rather than look further
        if refs is not None and action.ref is not None and action.ref not in refs:
            raise ParseError(f"no element with ref {action.ref} on the page")
        return action
    if first_error:
        raise first_error
    raise ParseError(f"no action found; expected one of {GRAMMAR}")
