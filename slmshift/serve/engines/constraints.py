"""Grammar-constrained decoding for the hf engine, with llguidance (chosen over xgrammar: bench/grammar_libs.py).

An `OutputConstraint` becomes one llguidance grammar (`grammar_of`); `Grammars` compiles it once per content
(a prototype matcher per `OutputConstraint.key()`, least recently used evicted) and hands each row its own copy.
Per step, `mask_rows` sets every token the row's grammar forbids to -inf in a copy of the logits, for the
constrained rows of a batch only; `RowMatcher.advance` feeds the chosen token back. Both schedulers use these, so a
constrained row chooses its tokens exactly as an unconstrained one would among the tokens its grammar allows.

A budget cut would leave a constrained answer open (a PRD cut mid-string at its 192 tokens), so each row also keeps
its answer closable: in the last tokens of its budget, `RowMatcher.pick` keeps the model's token only if a
completion still fits after it (`Closer.path`, a short completion searched over closing and single-character
tokens), and otherwise emits that completion. An answer that ends within its budget anyway is untouched.
A ```python block (`OutputConstraint.python_block`) is held to more than its regex (`PythonCloser`): it is closed with
a program that parses (endings from `pytail.tail`), not just a closed fence, also where the model itself ends the
block; and a token after which no program could parse (a syntax error: `)` closing a `[`, `if … :` inside an
expression; `pyprefix.viable`) gives way to the model's next choice. So for a python block, "already satisfies the
constraint" means code that could be the start of a program.

Tool calls are written as the platform's tool-call text (`OutputConstraint.calls_schema`), the form the gateway
prompts for and parses: `{"tool_calls":[{"name":"<function>","arguments":{...}}, ...]}`. 'required' allows any
declared tool (one or more calls), a named choice only that tool. 'auto' leaves the model free to answer or call,
but a call it makes is well-formed (`OPTIONAL_CALLS`): an answer that opens with `{` is a call in that schema, and
text is anything else (it may not open with `{`, `[`, a backtick or a space, the shapes of a botched call, such as
SmolLM2 copying the prompt's `{<arguments>}`). 'none' is not enforced.
"""

from __future__ import annotations

import json
import string
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import torch

from slmshift.platform.types import OutputConstraint
from slmshift.serve.engines.pyprefix import Prefix
from slmshift.serve.engines.pytail import in_code, tail

# Compact JSON (no free whitespace): fewer tokens, and the form scenario references and LoRA targets are written in.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


# Tools under 'auto': a call in the platform's tool-call text, or text that does not open like one. The call's schema
# is embedded as `%json` with the compact separators (`x-guidance`, llguidance's in-schema options).
OPTIONAL_CALLS = "start: calls | TEXT\ncalls: %json {schema}\nTEXT: /[^\\s{{\\[`][\\s\\S]*/\n"


class ConstraintError(ValueError):
    """A constraint llguidance cannot compile; its request fails with this message."""


def grammar_of(c: OutputConstraint) -> str:
    """The llguidance grammar (its JSON form) for a constraint an engine holds (`LMRequest.held`)."""
    from llguidance import LLMatcher

    if c.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(c.json_schema, overrides=JSON_OPTIONS)
    if c.kind == "regex":
        return LLMatcher.grammar_from_regex(c.regex)
    if c.kind == "grammar":
        return LLMatcher.grammar_from_lark(c.grammar)
    if c.kind == "tools" and c.enforceable:
        return LLMatcher.grammar_from_json_schema(c.calls_schema(), overrides=JSON_OPTIONS)
    if c.optional_calls:
        return LLMatcher.grammar_from_lark(OPTIONAL_CALLS.format(schema=json.dumps(c.calls_schema()
                                                                               | {"x-guidance": JSON_OPTIONS})))
    raise ConstraintError(f"nothing to enforce in {c.kind or c.format!r}")


# Tokens a completion tries first (closers, then the smallest values and openers), then every printable character.
_FIRST = ['"]}', '"]', '"}', '"', '}]', ']}', ']', '}', ')]', ')', "'", "```", "\n",
          '""', "''", "[]", "{}", "0", "[", "{", "("]


class Closer:
    """Finds a short completion of a grammar from a matcher's state, for rows about to run out of budget.

    Greedy, over `_FIRST` and then single printable characters:
    - forced tokens (`compute_ff_tokens`: a JSON key) are taken whole;
    - else a `_FIRST` string that completes the grammar;
    - else the first token that leads somewhere new: its lookahead (which alphabet tokens, and how much of each
      multi-token `_FIRST` string, fit next) differs from every state since the last forced run, so free text (a
      string's body) is left rather than extended;
    - a UTF-8 character cut mid-way is finished with any byte the grammar takes; when stuck, pairs of `_FIRST`.
    The result is a valid completion, not always the shortest: tests/serve/test_constraints.py checks it on every
    prefix of scenario references."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.vocab_size = vocab_size
        self.ids: list[int] = []  # single tokens: _FIRST's, then printable characters'
        self.first: list[list[int]] = []  # each _FIRST string's tokens, tried whole
        for text in _FIRST + [c for c in string.printable if c not in "\r\x0b\x0c"]:
            enc = tokenizer(text, add_special_tokens=False)["input_ids"]
            if text in _FIRST and enc not in self.first:
                self.first.append(enc)
            if len(enc) == 1 and enc[0] not in self.ids:
                self.ids.append(enc[0])
        self.probes = [f for f in self.first if len(f) > 1]  # looked ahead as sequences
        self.closes = 0  # rows whose budget forced a completion

    def _lookahead(self, m: Any) -> tuple[int, ...]:
        return tuple(m.validate_tokens([i]) for i in self.ids) + tuple(m.validate_tokens(p) for p in self.probes)

    @staticmethod
    def _after(m: Any, tokens: list[int]) -> Any:
        c = m.deep_copy()
        return c if c.consume_tokens(tokens) else None

    def _completes(self, m: Any, tokens: list[int]) -> Any:
        if m.validate_tokens(tokens) < len(tokens):  # cheap: no copy
            return None
        c = self._after(m, tokens)
        return c if c is not None and c.is_accepting() else None

    def _allowed(self, m: Any) -> list[int]:
        """Every token the grammar allows next, lowest id first (a byte-level vocabulary's single bytes: the rest of
        a UTF-8 character cut mid-way)."""
        return allowed_tokens([m], self.vocab_size)[0].nonzero()[:, 0].tolist()

    def path(self, matcher: Any, limit: int) -> list[int] | None:
        """Tokens that complete the grammar from `matcher`'s state (left unchanged), at most `limit` of them; None
        when none is found."""
        m, path, seen = matcher.deep_copy(), [], set()
        while not m.is_accepting():
            if len(path) > limit:
                return None
            if ff := m.compute_ff_tokens():
                m.consume_tokens(ff)
                path += ff
                seen.clear()
                continue
            here = self._lookahead(m)
            seen.add(here)
            valid = [i for i, ok in zip(self.ids, here) if ok]
            if not valid:  # a UTF-8 character cut mid-way: finish it with any byte the grammar takes
                if not (allowed := self._allowed(m)):
                    return None
                m, path = self._after(m, allowed[:1]), path + allowed[:1]
                continue
            step = next(((c, f) for f in self.first if (c := self._completes(m, f))), None)
            step = step or next(((c, [i]) for i in valid
                                 if self._lookahead(c := self._after(m, [i])) not in seen), None)
            step = step or next(((c, a + b) for a in self.first for b in self.first
                                 if (c := self._completes(m, a + b))), None)
            if step is None:
                return None
            m, path = step[0], path + step[1]
        return path if len(path) <= limit else None


class PythonCloser:
    """Completions of a ```python block (`OutputConstraint.python_block`) whose program parses: the row's text so
    far, a `pytail.tail` ending for the code, then the fence. Falls back (None) where the fence is not open yet, a
    UTF-8 character is cut, or no ending tried makes the code parse (0.04% of the token prefixes of HumanEval's
    solutions)."""

    OPEN = "```python\n"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.fixes = 0  # blocks the model ended with code that did not parse, given an ending that does
        self.swaps = 0  # tokens that no program could follow, replaced by the model's next choice that one can
        self._ticks: frozenset[int] = frozenset()  # tokens holding a backtick

    def _vocab(self) -> None:
        if not self._ticks:
            self._ticks = frozenset(i for t, i in self.tokenizer.get_vocab().items() if "`" in t)

    def code(self, ids: list[int]) -> str | None:
        """The block's code in the row's output `ids`; None before the block opens or mid-character."""
        text = self.tokenizer.decode(ids)
        start = text.find(self.OPEN)
        return None if start < 0 or text.endswith("\ufffd") else text[start + len(self.OPEN):]

    def ends_block(self, matcher: Any, ids: list[int], token: int) -> bool:
        """Does `token` (after the row's output `ids`, `matcher` in its state after them) start the block's closing
        fence: a backtick in code (outside strings and comments: no Python), or one that completes the fence?"""
        self._vocab()
        if token not in self._ticks or (code := self.code(ids)) is None:
            return False
        after = matcher.deep_copy()
        return in_code(code) or (after.consume_token(token) and after.is_accepting())

    def allows(self, prefix: Prefix, ids: list[int], token: int) -> bool:
        """Can the code still become a program that parses after `token` (`Prefix.viable`, the row's own)? No
        ending mends a syntax error before the end (`)` closing a `[`, `if … :` inside an expression). True before
        the block opens, mid-character, and for a backtick (the fence: `ends_block` decides)."""
        self._vocab()
        return token in self._ticks or (code := self.code(ids + [token])) is None or prefix.viable(code)

    def path(self, matcher: Any, ids: list[int], fix_only: bool = False) -> list[int] | None:
        """Tokens that end the block from `matcher`'s state (after the row's output `ids`), its code parsing; with
        `fix_only`, None as well where the code parses as it stands."""
        if (code := self.code(ids)) is None:
            return None
        ending = tail(code)
        if ending is None or (fix_only and not ending):
            return None
        ending += "```" if (code + ending).endswith("\n") else "\n```"
        tokens = self.tokenizer(ending, add_special_tokens=False)["input_ids"]
        done = matcher.deep_copy()
        return tokens if done.consume_tokens(tokens) and done.is_accepting() else None


class RowMatcher:
    """One row's grammar state."""

    # Completions are checked in the budget's last WINDOW tokens, and there only while the remaining budget is within
    # SLACK of the last completion's length: a completion that grows by more than SLACK between checks (several
    # objects opened at once) can still be cut. Checking every step would cost ~0.5 ms per row and step.
    WINDOW = 64
    SLACK = 16
    PYTHON_RETRY = 8  # tokens a python block goes without an ending search after one found nothing

    def __init__(self, matcher: Any, eos_ids: frozenset[int], closer: Closer | None = None,
                 python: PythonCloser | None = None):
        self.matcher, self.eos_ids, self.closer, self.python = matcher, eos_ids, closer, python
        self.ids: list[int] = []  # the row's output so far (read by `python`)
        self._plan: list[int] = []  # the completion being emitted, once the budget forced it
        self._need = self.WINDOW - self.SLACK  # the last completion length found
        self._known: tuple[int, list[int] | None] = (-1, None)  # (len(ids), python ending) found by the last step
        self._python_off = 0  # tokens left without an ending search (PYTHON_RETRY)
        self._prefix = Prefix() if python is not None else None  # the code's syntax so far

    def _emit(self, plan: list[int]) -> int:
        self._plan = plan[1:]
        return plan[0]

    def pick(self, token: int, remaining: int, ranked: Callable[[], list[int]] | None = None) -> int:
        """The token to emit: the model's `token` (which the grammar allows), or, when `remaining` tokens after it
        would no longer fit a completion, the next token of one. In a python block, a `token` after which no program
        parses is replaced by the first of `ranked` (the allowed tokens, the model's preference first) after which
        one can. Call before `advance`."""
        if self._plan:
            return self._plan.pop(0)
        if self.python is not None and ranked is not None and not self.python.allows(self._prefix, self.ids, token):
            swap = next((t for t in ranked() if self.python.allows(self._prefix, self.ids, t)), token)
            self.python.swaps += swap != token
            token = swap
        if self.python is not None and self.python.ends_block(self.matcher, self.ids, token):
            # the model ends the block; with code that does not parse, an ending that does comes first
            fix = self.python.path(self.matcher, self.ids, fix_only=True)
            if fix is not None and len(fix) <= remaining + 1:
                self.python.fixes += 1
                return self._emit(fix)
            return token
        if self.closer is None or remaining > self._need + self.SLACK:
            return token
        if self.python is not None and (chosen := self._python_pick(token, remaining)) is not None:
            return chosen
        probe = self.matcher.deep_copy()
        if probe.consume_token(token):
            after = self.closer.path(probe, remaining)
            if after is not None:
                self._need = len(after)
                return token
        plan = self.closer.path(self.matcher, remaining + 1)
        if not plan:
            return token  # no completion fits: the budget cuts the answer, as without this
        self.closer.closes += 1
        return self._emit(plan)

    def _python_pick(self, token: int, remaining: int) -> int | None:
        """`pick` for a python block: the model's token while a parseable ending still fits after it, else that
        ending; None where neither is found (code broken before its end, or not yet in the block), leaving the fence
        to the grammar's closer."""
        if self._python_off > 0:
            self._python_off -= 1
            return None
        after = self.matcher.deep_copy()
        path = self.python.path(after, self.ids + [token]) if after.consume_token(token) else None
        if path is not None and len(path) <= remaining:
            self._need, self._known = len(path), (len(self.ids) + 1, path)
            return token
        known_at, now = self._known
        if known_at != len(self.ids):  # else the last step's ending is this state's: a search costs up to ~0.3 s
            now = self.python.path(self.matcher, self.ids)
        if now is not None and len(now) <= remaining + 1:
            self.closer.closes += 1
            return self._emit(now)
        if path is None and now is None and self.python.code(self.ids) is not None:
            self._python_off = self.PYTHON_RETRY  # code no ending mends, likely for a while: a search cost ~0.3 s
        return None

    def advance(self, token: int) -> str | None:
        """Feed the chosen token; returns an error when the grammar cannot take it (it never should)."""
        if self.matcher.is_stopped():
            return None if token in self.eos_ids else "token after the grammar completed"
        self.ids.append(token)
        if not self.matcher.consume_token(token):
            return f"grammar rejected token {token}: {self.matcher.get_error().splitlines()[0]}"
        return None


_EXECUTOR: Any = None


def allowed_tokens(matchers: list[Any], vocab: int) -> torch.Tensor:
    """[rows, vocab] bool: the tokens each llguidance matcher allows next, the rows filled in parallel by
    llguidance's thread pool (the cores are otherwise idle between forward passes). Called directly rather than
    through `llguidance.torch`, whose import costs ~1.7 s (it sets up torch.compile) on a replica's first request."""
    global _EXECUTOR
    if _EXECUTOR is None:
        from llguidance import LLExecutor

        _EXECUTOR = LLExecutor(num_threads=max(1, torch.get_num_threads()))
    words = (vocab + 31) // 32
    bitmask = torch.zeros((len(matchers), words), dtype=torch.int32)
    _EXECUTOR.unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(), words * 4,
                                      len(matchers))
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(len(matchers), -1)[:, :vocab].bool()


def mask_rows(scores: torch.Tensor, matchers: list[RowMatcher | None]) -> torch.Tensor:
    """`scores` [rows, vocab] with each constrained row's forbidden tokens at -inf (a copy; unconstrained rows are
    left as they are)."""
    idx = [i for i, m in enumerate(matchers) if m is not None]
    if not idx:
        return scores
    allowed = allowed_tokens([matchers[i].matcher for i in idx], scores.shape[1]).to(scores.device)
    out = scores.clone()
    rows = torch.tensor(idx, device=scores.device)
    out[rows] = out[rows].masked_fill(~allowed, float("-inf"))
    return out


def _ranked(scores: torch.Tensor, k: int = 32) -> list[int]:
    """The row's `k` likeliest tokens among those its grammar allows, likeliest first."""
    top = scores.topk(min(k, scores.shape[0]))
    return [t for t, v in zip(top.indices.tolist(), top.values.tolist()) if v != float("-inf")]


def choose_tokens(scores: torch.Tensor, matchers: list[RowMatcher | None], temperatures: list[float],
                  generators: list[Any], remaining: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token and its log-prob, for both schedulers: argmax, or a draw from the row's own generator,
    among the tokens its grammar allows (`mask_rows`); a constrained row near its budget keeps its answer closable
    (`RowMatcher.pick`, `remaining` tokens after this one). The log-prob is the raw logits' (temperature 1): the
    model's own confidence, comparable across greedy, sampled and constrained calls."""
    allowed = mask_rows(scores, matchers)
    chosen = allowed.argmax(dim=-1)
    for i, gen in enumerate(generators):
        if gen is not None:
            probs = torch.softmax(allowed[i] / temperatures[i], dim=-1)
            chosen[i] = torch.multinomial(probs, 1, generator=gen)[0]
        if matchers[i] is not None:
            chosen[i] = matchers[i].pick(int(chosen[i]), remaining[i], lambda i=i: _ranked(allowed[i]))
    return chosen, torch.log_softmax(scores, dim=-1).gather(1, chosen[:, None])[:, 0]


class Grammars:
    """Compiles constraints for one tokenizer, cached by content. Thread-safe (Serve's loop and the scheduler)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int], max_cached: int = 256):
        self._hf_tok, self.vocab_size, self.eos_ids, self.max_cached = tokenizer, vocab_size, sorted(eos_ids), max_cached
        self._tok: Any = None
        self._closer: Closer | None = None
        self._python = PythonCloser(tokenizer)
        self._protos: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = self.hits = 0
        self.compile_s = self.tokenizer_s = 0.0

    def _tokenizer(self) -> Any:
        if self._tok is None:  # ~0.4-3 s on 2 cores (the whole vocabulary): once per engine, at the first use
            import llguidance.hf

            t0 = time.perf_counter()
            self._tok = llguidance.hf.from_tokenizer(self._hf_tok, n_vocab=self.vocab_size, eos_token=self.eos_ids)
            self._closer = Closer(self._hf_tok, self.vocab_size)
            self.tokenizer_s = time.perf_counter() - t0
        return self._tok

    def matcher(self, c: OutputConstraint) -> RowMatcher:
        """A fresh matcher for one row; raises ConstraintError for a constraint that does not compile."""
        from llguidance import LLMatcher

        key = c.key()
        with self._lock:
            proto = self._protos.get(key)
            if proto is not None:
                self._protos.move_to_end(key)
                self.hits += 1
            else:
                tok = self._tokenizer()  # the one-off vocabulary scan is not a compile: timed apart
                t0 = time.perf_counter()
                try:
                    grammar = grammar_of(c)
                except (ValueError, TypeError) as exc:
                    raise ConstraintError(f"invalid output constraint: {exc}") from None
                proto = LLMatcher(tok, grammar, log_level=0)
                if proto.is_error():
                    raise ConstraintError(f"invalid output constraint ({c.kind}): {proto.get_error()}")
                self.compile_s += time.perf_counter() - t0
                self.compiles += 1
                self._protos[key] = proto
                while len(self._protos) > self.max_cached:
                    self._protos.popitem(last=False)
            return RowMatcher(proto.deep_copy(), frozenset(self.eos_ids), self._closer,
                              self._python if c.python_block else None)

    def check(self, c: OutputConstraint, text: str) -> str | None:
        """Why `text` (tokenized as the tokenizer would) breaks the constraint `c`, or None when it satisfies it: how
        tests assert that scenario references hold their calls' constraints."""
        row = self.matcher(c)
        for i, token in enumerate(self._hf_tok(text, add_special_tokens=False)["input_ids"]):
            if error := row.advance(token):
                return f"{error} at token {i} ({text[:80]!r})"
        return None if row.matcher.is_accepting() else f"incomplete: {text[-80:]!r}"

    def stats(self) -> dict[str, float]:
        return {"grammar_compiles": self.compiles, "grammar_cache_hits": self.hits,
                "grammar_compile_s": round(self.compile_s, 4), "grammar_tokenizer_s": round(self.tokenizer_s, 3),
                "grammar_budget_closes": self._closer.closes if self._closer else 0,
                "grammar_code_fixes": self._python.fixes, "grammar_code_swaps": self._python.swaps}
