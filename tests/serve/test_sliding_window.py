"""Gemma-3 mixes sliding-window and global attention layers: the continuous scheduler must give each kind its own
mask and keep every token's K/V, so that its greedy output equals transformers' own `model.generate`.

A tiny random Gemma3 (window 16 tokens, layers alternating sliding/global) stands in for Gemma-3-270M (window 512):
prompts of 20 to 600 tokens and 40 generated tokens cross the window in the prefill and again while decoding. One
slow test runs the real packaged Gemma-3-270M on a prompt over its 512-token window.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from slmshift.platform.artifacts import PLAIN_GENERATION_PROMPT, chat_prompt
from slmshift.platform.types import Batching, HFOptions, LMRequest, ModelSpec
from slmshift.serve.engines.hf import HFEngine
from slmshift.serve.tiny import build_tiny_gemma3

WINDOW = 16
WORDS = "the weather in paris is sunny today and the flight to rome leaves at noon from gate four".split()


def text_of(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i * 7) % len(WORDS)] for i in range(n_words))


def req(content: str, max_tokens: int) -> LMRequest:
    return LMRequest(experiment_id="t", episode_id="e", call_index=0, scenario="s", role="r", call_kind="k",
                     messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": content}],
                     max_tokens=max_tokens)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "model", sliding_window=WINDOW)


def reference(engine: HFEngine, q: LMRequest) -> tuple[str, float]:
    """transformers' own greedy decoding of one prompt, alone (no padding), with Gemma3's hybrid cache and masks:
    (text, mean log-prob of the chosen tokens). The log-prob catches a wrong window that greedy argmax, dominated
    by the global layers on a long prompt, can hide."""
    ids = torch.tensor([engine._prompt_ids(q)])
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=q.max_tokens, min_new_tokens=q.max_tokens, top_k=None, top_p=None,
                                    output_logits=True, return_dict_in_generate=True)
    toks = out.sequences[0, ids.shape[1]:]
    logprobs = torch.stack([torch.log_softmax(lg[0].float(), -1)[t] for lg, t in zip(out.logits, toks)])
    return engine.tokenizer.decode(toks.tolist(), skip_special_tokens=True), float(logprobs.mean())


def same(r, ref: tuple[str, float]) -> bool:
    return r.text == ref[0] and abs(r.mean_logprob - ref[1]) < 1e-4


def test_tiny_gemma3_is_a_base_model_prompted_in_the_plain_format(gemma_dir):
    engine = HFEngine(ModelSpec(name="g", tier="slm", backend="hf", source=str(gemma_dir)))
    assert not engine.tokenizer.chat_template
    assert engine.model.config.sliding_window == WINDOW
    assert set(engine.model.config.layer_types) == {"sliding_attention", "full_attention"}
    prompt = chat_prompt(engine.tokenizer, req("hi", 4).messages)
    assert prompt.startswith(engine.tokenizer.bos_token + "system:\n") and prompt.endswith(PLAIN_GENERATION_PROMPT)


def test_continuous_greedy_output_equals_generate_across_the_sliding_window(gemma_dir):
    """Rows of different lengths share decode steps (each row's window starts at its own column); a 600-token
    prompt is prefilled in chunks of 64 that each cross the window; 40 tokens are generated past it."""
    engine = HFEngine(ModelSpec(name="g", tier="slm", backend="hf", source=str(gemma_dir),
                                batching=Batching(max_batch_size=8),
                                hf=HFOptions(dtype="float32", prefill_chunk_tokens=64, prefix_cache_mb=0)))
    engine.eos_ids = {-1}  # never stop early: every row decodes all of its 40 tokens
    batch = [req(text_of(n, n), 40) for n in (1, 10, 60, 200)]
    lengths = [len(engine._prompt_ids(q)) for q in batch]
    assert WINDOW < min(lengths) and max(lengths) > 512
    got = asyncio.run(engine.generate(batch))
    for q, r, n in zip(batch, got, lengths):
        assert r.error is None and r.tokens_in == n and r.tokens_out == 40
        assert same(r, reference(engine, q)), f"prompt of {n} tokens"
    assert engine.stats()["mean_decode_rows"] > 1  # rows really shared decode steps


def test_prefix_cache_reuse_keeps_the_window(gemma_dir):
    """A prompt that resumes from the prefix cache's stored K/V (every layer's, not only the window's) decodes as
    if prefilled from scratch."""
    engine = HFEngine(ModelSpec(name="g", tier="slm", backend="hf", source=str(gemma_dir),
                                hf=HFOptions(dtype="float32", prefill_chunk_tokens=32)))
    engine.eos_ids = {-1}
    shared = text_of(120)
    first, second = req(shared + " first", 24), req(shared + " second question", 24)
    asyncio.run(engine.generate([first]))
    r = asyncio.run(engine.generate([second]))[0]
    assert engine.stats()["prefix_tokens_hit"] > 4 * WINDOW
    assert same(r, reference(engine, second))


@pytest.mark.slow
def test_packaged_gemma3_continuous_equals_generate_over_its_512_token_window():
    """The real Gemma-3-270M (packaged:gemma3-270m; its first use converts it, ~80 s on two busy cores)."""
    t0 = time.perf_counter()
    engine = HFEngine(ModelSpec(name="gemma3", tier="slm", backend="hf", source="packaged:gemma3-270m",
                                resources={"num_cpus": 2}, hf=HFOptions(prefix_cache_mb=0)))
    assert engine.model.config.sliding_window == 512 and not engine.tokenizer.chat_template
    assert 260e6 < engine.num_parameters() < 275e6
    engine.eos_ids = {-1}
    q = req("Summarise this log in one line:\n" + "\n".join(f"{i}: {text_of(12, i)}" for i in range(40)), 8)
    n = len(engine._prompt_ids(q))
    assert n > 600, n
    r = asyncio.run(engine.generate([q]))[0]
    want = reference(engine, q)
    print(f"\ngemma3-270m: {n}-token prompt -> {r.text!r} ({time.perf_counter() - t0:.1f}s incl. load)")
    assert r.error is None and same(r, want)
