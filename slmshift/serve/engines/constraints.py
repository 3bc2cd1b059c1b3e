"""Grammar-constrained decoding for the hf engine, with llguidance (chosen over xgrammar: bench/grammar_libs.py).

An `OutputConstraint` becomes one llguidance grammar (`grammar_of`); `Grammars` compiles it once per content
(a prototype matcher per `OutputConstraint.key()`, least recently used evicted) and hands each row its own copy.
Per step, `mask_rows` sets every token the row's grammar forbids to -inf in a copy of the logits, for the
constrained rows of a batch only; `RowMatcher.advance` feeds the chosen token back. Both schedulers use these, so a
constrained row chooses its tokens exactly as an unconstrained one would among the tokens its grammar allows.

Tool calls are written as the platform's tool-call text, the form the gateway prompts for and parses:
`{"tool_calls":[{"name":"<function>","arguments":{...}}, ...]}`; 'required' allows any declared tool (one or
more calls), a named choice only that tool, and 'auto'/'none' are not enforced (the model may answer in text).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from slmshift.platform.types import OutputConstraint

# Compact JSON (no free whitespace): fewer tokens, and the form scenario references and LoRA targets are written in.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class ConstraintError(ValueError):
    """A constraint llguidance cannot compile; its request fails with this message."""


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool) if tool.get("type", "function") == "function" else tool


def tool_call_schema(tools: list[dict[str, Any]], only: str | None = None, parallel: bool = True) -> dict[str, Any]:
    """JSON schema of the platform's tool-call text for `tools` (only the one named `only`, when given; one call at
    most unless `parallel`)."""
    calls = []
    for fn in map(_function, tools):
        if only is not None and fn.get("name") != only:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        calls.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False})
    if not calls:
        raise ConstraintError(f"tool_choice names {only!r}, which is not among the declared tools")
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    calls_schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        calls_schema["maxItems"] = 1
    return {"type": "object", "properties": {"tool_calls": calls_schema},
            "required": ["tool_calls"], "additionalProperties": False}


def grammar_of(c: OutputConstraint) -> str:
    """The llguidance grammar (its JSON form) for an enforceable constraint."""
    from llguidance import LLMatcher

    if c.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(c.json_schema, overrides=JSON_OPTIONS)
    if c.kind == "regex":
        return LLMatcher.grammar_from_regex(c.regex)
    if c.kind == "grammar":
        return LLMatcher.grammar_from_lark(c.grammar)
    if c.kind == "tools" and c.enforceable:
        return LLMatcher.grammar_from_json_schema(tool_call_schema(c.tools, c.forced_tool,
                                                                    c.parallel_tool_calls is not False), overrides=JSON_OPTIONS)
    raise ConstraintError(f"nothing to enforce in {c.kind or c.format!r}")


class RowMatcher:
    """One row's grammar state."""

    def __init__(self, matcher: Any, eos_ids: frozenset[int]):
        self.matcher, self.eos_ids = matcher, eos_ids

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, bitmask, index)

    def advance(self, token: int) -> str | None:
        """Feed the chosen token; returns an error when the grammar cannot take it (it never should)."""
        if self.matcher.is_stopped():
            return None if token in self.eos_ids else "token after the grammar completed"
        if not self.matcher.consume_token(token):
            return f"grammar rejected token {token}: {self.matcher.get_error().splitlines()[0]}"
        return None


def mask_rows(scores: torch.Tensor, matchers: list[RowMatcher | None]) -> torch.Tensor:
    """`scores` [rows, vocab] with each constrained row's forbidden tokens at -inf (a copy; unconstrained rows are
    left as they are)."""
    idx = [i for i, m in enumerate(matchers) if m is not None]
    if not idx:
        return scores
    vocab = scores.shape[1]
    bitmask = torch.zeros((len(idx), (vocab + 31) // 32), dtype=torch.int32)
    for j, i in enumerate(idx):
        matchers[i].fill(bitmask, j)
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.view(len(idx), -1)[:, :vocab].bool().to(scores.device)
    out = scores.clone()
    rows = torch.tensor(idx, device=scores.device)
    out[rows] = out[rows].masked_fill(~allowed, float("-inf"))
    return out


class Grammars:
    """Compiles constraints for one tokenizer, cached by content. Thread-safe (Serve's loop and the scheduler)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int], max_cached: int = 256):
        self._hf_tok, self.vocab_size, self.eos_ids, self.max_cached = tokenizer, vocab_size, sorted(eos_ids), max_cached
        self._tok: Any = None
        self._protos: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = self.hits = 0
        self.compile_s = self.tokenizer_s = 0.0

    def _tokenizer(self) -> Any:
        if self._tok is None:  # ~0.4-3 s on 2 cores (the whole vocabulary): once per engine, at the first use
            import llguidance.hf

            t0 = time.perf_counter()
            self._tok = llguidance.hf.from_tokenizer(self._hf_tok, n_vocab=self.vocab_size, eos_token=self.eos_ids)
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
            return RowMatcher(proto.deep_copy(), frozenset(self.eos_ids))

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
                "grammar_compile_s": round(self.compile_s, 4), "grammar_tokenizer_s": round(self.tokenizer_s, 3)}
