"""Is a text the start of some Python program? How the hf engine keeps a ```python block's code from a syntax error
the model would write before its end (`constraints.PythonCloser`), where no ending (`pytail`) can mend it.

Lark's Python 3 grammar, parsed LALR(1): such a parser reports an error at the first token no program could have
there, so a prefix whose complete tokens it takes can still be finished. What the grammar cannot see is settled as
follows:
- the last token may be cut (`i` of `if`, an open string, `!` of `!=`): it only has to start a token the parser
  takes there, read with the `regex` module's partial matching;
- a last line of spaces or of a comment is dropped (a blank or comment line may follow any line);
- the indentation after a final newline is not known yet: the newline must be taken, its indents are not fed;
- a reply holding only a function's body (indented first line) is read inside a `def`.
Where Lark's grammar is still narrower than CPython's (`_OVERRIDES`), a token that could go on is refused, and the
engine takes the model's next choice: 0 of 34,551 random prefixes of the standard library's files that CPython
parses were refused, other than 4 with names in Devanagari or Hebrew. A row's `Prefix` parses only the code after
its last closed newline: ~0.26 ms a check on HumanEval's solutions growing 4 characters at a time (~0.65 ms from
the start).
"""

from __future__ import annotations

import functools
import keyword
import threading
from typing import Any, Iterator

import regex

_LOCK = threading.Lock()


# Where Lark's grammar is narrower than CPython's (found on random prefixes of the standard library's files): a
# trailing comma after keyword-only parameters or `**kwargs`, `*`/`**` arguments in any order, `from ...x import`
# (read as an ellipsis), `if` between a comprehension's `for`s, and a one-line string continued by a backslash.
# Names with combining marks (`देवनागरी`) are still not read: Lark's `regex=True` would, at 2.6x the time a check.
_OVERRIDES = r"""
%override poststarparams: ("," paramvalue)* ["," [kwparams]]
%override starargs: stararg ("," (stararg | argvalue))* ["," [kwargs]]
%override kwargs: "**" test ("," (argvalue | "**" test))* [","]
%override dots: ("." | "...")+
%override comp_for: [ASYNC] "for" exprlist "in" or_test comp_if*
%override STRING: /([ubf]?r?|r[ubf])("(?!"")([^"\\\n]|\\[\s\S])*"|'(?!'')([^'\\\n]|\\[\s\S])*')/i
"""


@functools.cache
def _parser() -> Any:
    import importlib.resources

    from lark import Lark

    grammar = importlib.resources.files("lark").joinpath("grammars/python.lark").read_text() + _OVERRIDES
    # ~1 s once per process. The basic lexer, so that `lex` runs apart from the parser; no postlex (`_indenter` is
    # one per call: Lark's own keeps its state on the parser).
    return Lark(grammar, parser="lalr", lexer="basic", start="file_input", maybe_placeholders=False)


@functools.cache
def _lexer() -> Any:
    """The grammar's lexer, built once (`Lark.lex` builds one, with its scanner, on every call: ~3.5 ms)."""
    return _parser()._build_lexer()


def _lex(text: str) -> Iterator[Any]:
    from lark.lexer import LexerThread

    return LexerThread.from_text(_lexer(), text).lex(None)


def _indenter(paren_level: int, indent_level: list[int]) -> Any:
    """Python's indents and dedents from a given state, without the dedents that close every block at the end of the
    text (the text goes on). `marks` holds the state before each newline token, for `Prefix` to resume there."""
    from lark.indenter import PythonIndenter

    class Indents(PythonIndenter):
        def __init__(self) -> None:
            super().__init__()
            self.marks: dict[int, tuple[int, list[int]]] = {}  # id(newline token) -> (paren level, indent levels)

        def process(self, stream: Iterator[Any]) -> Iterator[Any]:
            self.paren_level, self.indent_level = paren_level, list(indent_level)
            for token in stream:
                if token.type == self.NL_type:
                    self.marks[id(token)] = (self.paren_level, list(self.indent_level))
                    yield from self.handle_NL(token)
                else:
                    yield token
                if token.type in self.OPEN_PAREN_types:
                    self.paren_level += 1
                elif token.type in self.CLOSE_PAREN_types:
                    self.paren_level = max(0, self.paren_level - 1)

    return Indents()


@functools.cache
def _pattern(name: str) -> tuple[str | None, Any]:
    """A terminal's literal text, or its compiled regular expression."""
    from lark.lexer import PatternStr

    p = _parser().get_terminal(name).pattern
    if isinstance(p, PatternStr) and not p.flags:
        return p.value, None
    flags = regex.I if "i" in p.flags else 0
    flags |= regex.S if "s" in p.flags else 0
    return None, regex.compile(p.value if not isinstance(p, PatternStr) else regex.escape(p.value), flags)


def _starts(text: str, name: str) -> bool:
    """Can `text` be the start of the terminal `name`?"""
    literal, pattern = _pattern(name)
    if literal is not None:
        return literal.startswith(text)
    return pattern.fullmatch(text, partial=True) is not None


@functools.cache
def _terminals() -> frozenset[str]:
    return frozenset(t.name for t in _parser().terminals) - {"_INDENT", "_DEDENT"}


def _takes(ip: Any, text: str) -> bool:
    """Can `text` be the start of a token the parser `ip` takes next, or of a skipped one (a `\\` that continues
    the line)? A terminal it has an action for is fed only if `text` can start it (`accepts()` would feed every one:
    ~10x the time)."""
    from lark import Token
    from lark.exceptions import LarkError

    if any(_starts(text, name) for name in _parser().ignore_tokens):
        return True
    for name in ip.choices():
        if name in _terminals() and _starts(text, name):
            try:
                ip.copy(deepcopy_values=False).feed_token(Token(name, text))
                return True
            except LarkError:  # a reduction the lookahead allowed, then no shift
                continue
    return False


def _last_line_blank(code: str) -> str:
    """`code` without a last line of spaces or a comment (outside strings: a `#` in a string's last line is kept)."""
    from slmshift.serve.engines.pytail import in_code

    while True:
        start = code.rfind("\n") + 1
        line = code[start:]
        if not line.strip():
            code = code[:start]
            return code
        hash_at = line.rfind("#")
        if hash_at < 0 or in_code(code):
            return code
        code = code[:start + hash_at]  # a comment (or a `#` in one): what comes before it is what is read


def _feed(ip: Any, token: Any) -> Any | None:
    """The parser after reading `token`, or None where it cannot. A soft keyword the grammar has as its own terminal
    (`_`, `match`, `case`) is read as a name where the keyword cannot stand, as CPython reads it; it is tried on a
    copy first, since a parser that fails may have made reductions on the way (rare tokens: the copy is cheap)."""
    from lark import Token
    from lark.exceptions import LarkError

    soft = token.type != "NAME" and token.isidentifier() and not keyword.iskeyword(token)
    reader = ip.copy(deepcopy_values=False) if soft else ip
    try:
        reader.feed_token(token)
        return reader
    except LarkError:
        if not soft:
            return None
    try:
        ip.feed_token(Token.new_borrow_pos("NAME", str(token), token))
        return ip
    except LarkError:
        return None


class Prefix:
    """One growing text's checks (a row's code, a token at a time): the parser's state before the last newline that
    a later token closed is kept, so a check lexes and parses only the text from there (the line being written),
    not the whole code again. Falls back to the whole text where the code no longer starts with that part."""

    def __init__(self) -> None:
        self._head: str | None = None  # the text before the kept newline
        self._state: tuple[Any, int, list[int]] | None = None  # the parser, paren level and indent levels there

    def viable(self, code: str) -> bool:
        """Could `code` be continued into a program that parses (as a module, or as one function's body)?"""
        first = next((line for line in code.split("\n") if line.strip() and not line.lstrip().startswith("#")), "")
        src = _last_line_blank(("def _():\n" if first[:1] in (" ", "\t") else "") + code)
        with _LOCK:  # Lark's parser objects are shared
            if self._head is not None and src.startswith(self._head):
                ip, paren, levels = self._state
                return self._check(src, len(self._head), ip.copy(deepcopy_values=False), paren, levels)
            return self._check(src, 0, _parser().parse_interactive(""), 0, [0])

    def _check(self, src: str, base: int, ip: Any, paren: int, levels: list[int]) -> bool:
        """`viable` for `src`, whose first `base` characters `ip` (the parser) has read, the indenter at `paren` and
        `levels` there."""
        from lark.exceptions import LarkError, UnexpectedCharacters

        text = src[base:]
        tokens: list[Any] = []
        end = len(text)  # where the lexer found no token (a cut string, `!` of `!=`), else the text's end
        indents = _indenter(paren, levels)
        try:
            for token in indents.process(_lex(text)):
                tokens.append(token)
        except UnexpectedCharacters as e:
            end = e.pos_in_stream
        except LarkError:  # a dedent to no enclosing block's column
            return False
        if end == len(text):
            while tokens and tokens[-1].type in ("_INDENT", "_DEDENT"):
                tokens.pop()  # after a final newline: the next line's indentation is not known yet
        # The tokens that run up to `end` without a gap may be one cut token read as several (`1e-` as `1`, `e`,
        # `-`; `f"…` as `f`, then no token): the text from each of their starts is tried as one token's start.
        run = len(tokens)
        while run > 0 and tokens[run - 1].type not in ("_NEWLINE", "_INDENT", "_DEDENT") and \
                tokens[run - 1].end_pos == (tokens[run].start_pos if run < len(tokens) else end):
            run -= 1
        if run == len(tokens) and end == len(text):
            run = len(tokens) + 1  # ends in a newline or a space: nothing is cut
        last_real = max((i for i, t in enumerate(tokens) if t.type not in ("_INDENT", "_DEDENT")), default=-1)
        keep = None
        states = []  # the parser before each token of the run
        for i, token in enumerate(tokens):
            if i >= run:
                states.append((token.start_pos, ip.copy(deepcopy_values=False)))
            if token.type == "_NEWLINE" and i < last_real and id(token) in indents.marks:
                # a later token closed this newline: the next check may start here
                keep = (src[:base + token.start_pos], ip.copy(deepcopy_values=False), *indents.marks[id(token)])
            ip = _feed(ip, token)
            if ip is None:
                return any(_takes(state, text[at:]) for at, state in reversed(states))
        if keep is not None:
            self._head, self._state = keep[0], keep[1:]
        if end == len(text):
            return True
        states.append((end, ip))
        return any(_takes(state, text[at:]) for at, state in reversed(states))


def viable(code: str) -> bool:
    """Could `code` be continued into a program that parses (as a module, or as one function's body)? One check;
    a growing text is cheaper to check with its own `Prefix`."""
    return Prefix().viable(code)
