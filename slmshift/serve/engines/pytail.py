"""The shortest-found text that makes a cut-off Python program parse: how the hf engine closes a ```python block
that the token budget (or the model) would end mid-statement (`constraints.RowMatcher`).

A regular expression or grammar can hold the fence, not Python: a program cut inside a docstring, after an operator
or before a block's body still fails `ast.parse`. `tail(src)` scans where `src` stands (an open string, open
brackets, the current line's indentation) and tries a few endings, cheapest first, keeping the first that parses.
"""

from __future__ import annotations

import ast
import itertools
import re
import warnings

_CLOSE = {"(": ")", "[": "]", "{": "}"}
_TRY = re.compile(r"^([ \t]*)try[ \t]*:", re.M)
_STRING_START = re.compile(r"(?i)(?:rb|br|fr|rf|[rbfu])?('''|\"\"\"|'|\")")

# What may be missing, in the order tried: an operand (after an operator, `=`, `->`, `return`), the rest of a `for`
# or a lambda; a call, a header's colon or a `from`'s import; a block's body.
_OPERANDS = ["", " 0", "0", "= 0", "> 0", " else 0", " x", "x", ": 0", " in x", "n x", " x in x"]
_HEADS = ["", ":", "()", "():", "():\n", " _():", " _", " _:", " import x"]
_KEYWORDS = ("for", "in", "if", "else", "and", "or", "not", "is", "import", "lambda", "return")
_WORD = re.compile(r"(?<![\w.])[A-Za-z_]\w*$")


def _errors(src: str) -> list[SyntaxError] | None:
    """None when `src` parses, as a module or (a reply holding only a function's body) as one function's body; else
    each reading's error."""
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in a model's strings are warnings, not errors
        for candidate in (src, "def _():\n" + src):
            try:
                ast.parse(candidate)
                return None
            except SyntaxError as e:
                errors.append(e)
            except (ValueError, MemoryError, RecursionError):
                errors.append(SyntaxError("unparseable"))
    return errors


def _parses(src: str) -> bool:
    return _errors(src) is None


def _broken_before_its_end(src: str, errors: list[SyntaxError]) -> bool:
    """Does each reading of `src` fail on a line before its last two, and not at an open bracket or string (which an
    ending closes)? Then no ending can mend it. Never true for a prefix of HumanEval's solutions."""
    lines = src.count("\n") + 1
    return all(e.lineno is not None and e.lineno + 1 < lines + shift and
               not any(m in (e.msg or "") for m in ("never closed", "unterminated", "was not closed"))
               for e, shift in zip(errors, (0, 1)))


def _scan(src: str) -> tuple[str | None, list[str], bool]:
    """Where the end of `src` stands: the open string's quote (None outside strings), the open brackets (a closing one
    that matches none is skipped), and whether it is inside a comment. F-strings' nested expressions are read as
    plain string text."""
    quote, stack, i, n = None, [], 0, len(src)
    while i < n:
        ch = src[i]
        if quote is not None:
            if ch == "\\":
                i += 2
                continue
            if src.startswith(quote, i):
                i += len(quote)
                quote = None
                continue
            if ch == "\n" and len(quote) == 1:
                quote = None  # an unterminated one-line string: the parser fails there whatever follows
            i += 1
            continue
        if ch == "#":
            j = src.find("\n", i)
            if j < 0:
                return None, stack, True
            i = j + 1
            continue
        if (m := _STRING_START.match(src, i)) and (m.start(1) == i or not (src[i - 1:i].isalnum() or
                                                                         src[i - 1:i] == "_")):
            quote = m.group(1)
            i = m.end()
            continue
        if ch in _CLOSE:
            stack.append(ch)
        elif ch in ")]}":
            if stack and _CLOSE[stack[-1]] == ch:
                stack.pop()
        i += 1
    return quote, stack, False


def in_code(src: str) -> bool:
    """Does `src` end outside strings and comments (where a backtick is no Python, so it starts the block's fence)?"""
    quote, _, comment = _scan(src)
    return quote is None and not comment


def _indent(src: str) -> str:
    """The indentation of the statement `src` ends in (of its first physical line, for one spread over several)."""
    lines = src.split("\n")
    for line in reversed(lines):
        if line.strip() and not line.rstrip().endswith(("\\", ",", "(", "[", "{")):
            return line[:len(line) - len(line.lstrip())]
    last = lines[-1]
    return last[:len(last) - len(last.lstrip())]


def _search(src: str) -> str | None:
    """The first ending tried that makes `src` parse, or None."""
    quote, stack, comment = _scan(src)
    starts = [""]
    if comment:
        starts = ["\n"]
    elif quote is not None:
        # a string ending in a quote or a backslash would take the closing quote as text: a space first
        starts = [quote, " " + quote]
    closers = "".join(_CLOSE[b] for b in reversed(stack))
    ind = _indent(src)
    bodies = ["", f"\n{ind}    pass", " pass"]
    if not src[src.rfind("\n") + 1:].strip():  # an empty line: a statement there, at its indentation
        bodies.insert(1, "pass")
    finals = ["", " else 0"]  # a conditional expression's `else`, after its brackets
    if tries := _TRY.findall(src):  # a `try:` may still need its handler
        finals.append(f"\n{tries[-1]}except Exception:\n{tries[-1]}    pass")
    for start, operand, head, body, final in itertools.product(starts, _OPERANDS, _HEADS, bodies, finals):
        cand = start + operand + closers + head + body + final
        if _parses(src + cand):
            return cand
    return None


def tail(src: str) -> str | None:
    """A short text `t` such that `src + t` parses (see `_parses`), or None when no ending tried works: "" when
    `src` parses already; the string's closing quote, the brackets' closers, a missing operand, colon or body; a
    keyword cut mid-word (`fo`, `an`, `im`) is finished first where nothing else works."""
    if (errors := _errors(src)) is None:
        return ""
    if _broken_before_its_end(src, errors):  # a search would cost up to ~0.3 s and find nothing
        return None
    if (found := _search(src)) is not None:
        return found
    word = _WORD.search(src)
    for kw in _KEYWORDS if word and in_code(src) else ():
        if kw.startswith(word.group()) and kw != word.group():
            rest = kw[len(word.group()):] + " "
            if (found := _search(src + rest)) is not None:
                return rest + found
    return None
