"""HFEngine on a tiny random Llama (CPU, no hub, no Ray), plus one slow test on packaged SmolLM2.

The engine fixture runs every behaviour test under both schedulers (continuous, the default, and static);
the continuous scheduler's own properties (short requests overtake long ones, prefix reuse, admission
control) are tested at the end."""

from __future__ import annotations

import asyncio
import math
import string
import time

import pytest

from slmshift.platform.errors import ModelLoadError
from slmshift.platform.types import HFOptions, LMRequest, ModelSpec
from slmshift.serve import sources
from slmshift.serve.engines.hf import HFEngine
from slmshift.serve.engines.scheduler import Row
from slmshift.serve.sources import resolve_source
from slmshift.serve.tiny import build_tiny_llama

PROMPTS = [
    "hi",
    "What is the weather in Paris today? Answer in one short sentence please.",
    "Return a JSON object with keys name and id for user 42, and nothing else at all, thanks.",
    "x = 1",
]


def req(content: str, **kw) -> LMRequest:
    return LMRequest(
        experiment_id="t", episode_id="e", call_index=0, scenario="s", role="r", call_kind="k",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}], **kw,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def make(tiny_dir, scheduler: str = "continuous", **hf) -> HFEngine:
    return HFEngine(ModelSpec(name="tiny", tier="slm", backend="hf", source=str(tiny_dir),
                              hf=HFOptions(dtype="float32", scheduler=scheduler, **hf)))


@pytest.fixture(scope="module", params=["continuous", "static"])
def engine(tiny_dir, request):
    return make(tiny_dir, request.param)


@pytest.fixture(scope="module")
def static(tiny_dir):
    return make(tiny_dir, "static")


def gen(engine, requests):
    return asyncio.run(engine.generate(requests))


def token_ids(engine, requests):
    """Generated ids per request (the public response only carries text)."""
    return [r["token_ids"] for r in engine._run_batch([(q, engine._prompt_ids(q)) for q in requests])]


def test_tiny_tokenizer_round_trips_ascii(engine):
    tok = engine.tokenizer
    text = string.printable + ' {"a": [1, 2.5e-3]} ~`|\\'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template


def test_greedy_is_deterministic(engine):
    a = gen(engine, [req(p, max_tokens=12) for p in PROMPTS])
    b = gen(engine, [req(p, max_tokens=12) for p in PROMPTS])
    assert [r.text for r in a] == [r.text for r in b]
    assert all(r.error is None and r.model == "tiny" and r.tier == "slm" and r.backend == "hf" for r in a)


def test_greedy_alone_equals_batched_with_left_padding(engine):
    batch = [req(p, max_tokens=16) for p in PROMPTS]
    batched = token_ids(engine, batch)
    for q, ids in zip(batch, batched):
        assert token_ids(engine, [q])[0] == ids
    # the public path agrees too
    assert gen(engine, [batch[0]])[0].text == gen(engine, batch)[0].text


def test_sampling_reproducible_per_seed_and_independent_of_batch(engine):
    q = req(PROMPTS[1], max_tokens=16, temperature=1.0, seed=7)
    alone = gen(engine, [q])[0].text
    again = gen(engine, [q])[0].text
    mixed = gen(engine, [req(PROMPTS[0], max_tokens=4), q, req(PROMPTS[2], temperature=0.7, seed=1)])[1].text
    assert alone == again == mixed
    others = {gen(engine, [req(PROMPTS[1], max_tokens=16, temperature=1.0, seed=s)])[0].text for s in range(5)}
    assert len(others) > 1  # different seeds give different draws
    greedy = gen(engine, [req(PROMPTS[1], max_tokens=16)])[0].text
    assert greedy == gen(engine, [req(PROMPTS[1], max_tokens=16, seed=99)])[0].text  # seed ignored at T=0


def test_max_tokens_per_request_in_mixed_batch(engine):
    limits = [1, 3, 8, 20]
    batch = [req(p, max_tokens=m) for p, m in zip(PROMPTS, limits)]
    resps = gen(engine, batch)
    ids = token_ids(engine, batch)
    eos = engine.eos_ids
    for r, m, toks in zip(resps, limits, ids):
        assert r.error is None
        assert r.tokens_out == len(toks) <= m
        assert r.tokens_out == m or toks[-1] in eos  # only EOS stops a row early


def test_token_counts_and_too_long_prompt_fails_clearly(tiny_dir, engine):
    tok = engine.tokenizer
    q = req(PROMPTS[2], max_tokens=5)
    text = tok.apply_chat_template(q.messages, add_generation_prompt=True, tokenize=False)
    expected = len(tok(text, add_special_tokens=False)["input_ids"])
    r = gen(engine, [q, req("hi", max_tokens=2)])[0]
    assert r.tokens_in == expected and 0 < r.tokens_out <= 5

    # never silently left-truncated (that would drop the system prompt): the request fails, naming the fix
    short = make(tiny_dir, engine.spec.hf.scheduler, max_input_tokens=24)
    too_long, fits = gen(short, [q, req("", max_tokens=2)])
    assert too_long.text == "" and too_long.tokens_out == 0
    assert f"prompt is {expected} tokens" in too_long.error and "limit of 24" in too_long.error
    assert "hf.max_input_tokens" in too_long.error and "'tiny'" in too_long.error
    assert fits.error is None and fits.tokens_in <= 24


def test_mean_logprob_and_latency(engine):
    for r in gen(engine, [req(p, max_tokens=6, temperature=t) for p, t in zip(PROMPTS, [0, 0.5, 1.0, 0])]):
        assert r.mean_logprob is not None and math.isfinite(r.mean_logprob) and r.mean_logprob <= 0
        assert r.latency_s > 0


def test_adapter_and_batch_failure_give_error_responses(engine, monkeypatch):
    resps = gen(engine, [req("hi", max_tokens=2), req("hi", adapter="sql-lora")])
    assert resps[0].error is None and resps[0].text
    assert resps[1].text == "" and "adapter" in resps[1].error and "not loaded" in resps[1].error

    def boom(*a, **kw):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(engine.model, "generate", boom)  # static path
    monkeypatch.setattr(engine.model, "forward", boom)  # continuous path
    resps = gen(engine, [req("a"), req("b", temperature=0.5)])
    assert len(resps) == 2
    assert all(r.text == "" and r.error and "out of memory" in r.error and "\n" not in r.error for r in resps)


def test_num_parameters_is_measured(engine):
    assert engine.num_parameters() == sum(p.numel() for p in engine.model.parameters()) > 0


def test_resolve_source_kinds_and_errors(tmp_path, tiny_dir):
    assert resolve_source(str(tiny_dir)).kind == "dir"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == sources.ResolvedSource(
        "hub", "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)) == sources.ResolvedSource("gguf", str(tmp_path), "m.gguf")

    for missing in [str(tmp_path / "nope"), "./models/nope", "~/nope-slmshift", "weights/model.gguf"]:
        with pytest.raises(ModelLoadError) as err:
            resolve_source(missing)
        msg = str(err.value)
        assert missing in msg and "does not exist" in msg
        assert "packaged:smollm2-135m" in msg and "hub id" in msg

    with pytest.raises(ModelLoadError) as err:
        resolve_source("packaged:gpt-9")
    assert "gpt-9" in str(err.value) and "packaged:smollm2-135m" in str(err.value)


def test_load_error_is_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as err:
        sources.load_model_and_tokenizer(str(tmp_path / "empty"), "float32", "cpu")
    assert "empty" in str(err.value) and "\n" not in str(err.value)


def test_pull_packaged_is_idempotent_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMSHIFT_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "_convert_gguf", fake_convert)
    path = sources.pull_packaged("smollm2-135m")
    assert path == tmp_path / "models" / "smollm2-135m" and (path / "config.json").exists()
    assert sources.pull_packaged("smollm2-135m") == path and len(calls) == 1
    assert sources.pull_packaged("smollm2-135m", force=True) == path and len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")) == ["smollm2-135m"]

    def failing(gguf, out):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sources, "_convert_gguf", failing)
    monkeypatch.setenv("SLMSHIFT_CACHE", str(tmp_path / "other"))
    with pytest.raises(RuntimeError):
        sources.pull_packaged("smollm2-135m")
    assert [p.name for p in (tmp_path / "other" / "models").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_packaged_smollm2_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMSHIFT_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    engine = HFEngine(ModelSpec(name="smollm2", tier="slm", backend="hf", source="packaged:smollm2-135m"))
    assert engine.tokenizer.chat_template  # carried over from the GGUF metadata
    assert 130e6 < engine.num_parameters() < 140e6
    r = gen(engine, [req("What is 2+2?", max_tokens=24)])[0]
    print(f"\nsmollm2: {r.text!r} ({r.tokens_out} tokens, {time.perf_counter() - t0:.1f}s incl. conversion)")
    assert r.error is None and r.text.strip() and r.tokens_out > 0


def test_hub_without_network_says_so(monkeypatch):
    import transformers

    def offline(*a, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError) as err:
        sources.load_model_and_tokenizer("someorg/some-model", "float32", "cpu")
    msg = str(err.value)
    assert "someorg/some-model" in msg and "no model hub is reachable" in msg and "packaged:smollm2-135m" in msg


# --- the continuous scheduler -----------------------------------------------------------------------------------

SYSTEM = "You are an operator. Answer with one JSON function call; never explain. " * 3


def sys_req(content: str, **kw) -> LMRequest:
    return LMRequest(experiment_id="t", episode_id="e", call_index=0, scenario="s", role="r", call_kind="k",
                     messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}], **kw)


async def timed(engine, requests, delays=None):
    """Submit each request (after its delay) and note the order in which they finish."""
    order: list[int] = []

    async def one(i, q):
        await asyncio.sleep((delays or [0] * len(requests))[i])
        r = await engine.submit(q)
        order.append(i)
        return r

    out = await asyncio.gather(*(one(i, q) for i, q in enumerate(requests)))
    return out, order


def test_short_request_does_not_wait_for_a_long_one(tiny_dir):
    engine = make(tiny_dir)
    long_q, short_q = req(PROMPTS[1], max_tokens=300), req(PROMPTS[0], max_tokens=3)
    (long_r, short_r), order = asyncio.run(timed(engine, [long_q, short_q], delays=[0, 0.01]))
    assert long_r.error is None and short_r.error is None
    assert long_r.tokens_out > 100  # (no early EOS: a long row really was running)
    assert order == [1, 0] and short_r.latency_s < long_r.latency_s / 3
    # the static engine makes the short one wait for the long one's batch. Serve's @serve.batch hands it both as one
    # generate() call; two separate submits would race for the model lock and test the thread scheduler instead.
    s_long, s_short = asyncio.run(make(tiny_dir, "static").generate([long_q, short_q]))
    assert s_short.tokens_out <= 3 and s_long.tokens_out > 100
    assert s_short.latency_s == pytest.approx(s_long.latency_s, rel=0.01) and s_short.latency_s > 3 * short_r.latency_s


def test_greedy_tokens_and_logprobs_equal_the_static_engine(tiny_dir, static):
    engine = make(tiny_dir, prefill_chunk_tokens=16)  # several prefill chunks per prompt
    batch = [sys_req(p, max_tokens=m) for p, m in zip(PROMPTS * 2, [16, 3, 40, 8, 1, 24, 12, 30])]
    cont, ref = gen(engine, batch), gen(static, batch)
    for c, r in zip(cont, ref):
        assert c.error is None and (c.text, c.tokens_in, c.tokens_out) == (r.text, r.tokens_in, r.tokens_out)
        assert abs(c.mean_logprob - r.mean_logprob) < 1e-4
    assert engine.stats()["prefill_chunks"] > len(batch)


def test_static_kv_cache_gives_the_same_tokens(tiny_dir, static):
    """The GPU path's static KV cache (compiled there; eager on CPU, which is what runs here) changes no output."""
    fixed = make(tiny_dir, "static", static_cache=True)
    assert fixed.static_cache and not static.static_cache  # default off on CPU
    seen, generate = [], fixed.model.generate
    fixed.model.generate = lambda **kw: seen.append(kw["generation_config"].cache_implementation) or generate(**kw)
    batch = [sys_req(p, max_tokens=m) for p, m in zip(PROMPTS * 2, [16, 3, 40, 8, 1, 24, 12, 30])]
    for a, b in zip(gen(fixed, batch), gen(static, batch)):
        assert a.error is None and (a.text, a.tokens_out) == (b.text, b.tokens_out)
        assert abs(a.mean_logprob - b.mean_logprob) < 1e-4
    assert seen and set(seen) == {"static"}


def test_prefix_cache_hits_on_a_repeated_system_prompt(tiny_dir, static):
    engine = make(tiny_dir)
    first = gen(engine, [sys_req(PROMPTS[1], max_tokens=12)])[0]
    s = engine.stats()
    assert s["prefix_lookups"] == 1 and s["prefix_hits"] == 0 and s["prefix_blocks"] > 0
    tok = engine.tokenizer
    system = tok(tok.apply_chat_template([{"role": "system", "content": SYSTEM}], tokenize=False),
                 add_special_tokens=False)["input_ids"]
    later = gen(engine, [sys_req(p, max_tokens=12) for p in PROMPTS])
    s = engine.stats()
    assert s["prefix_hits"] == len(PROMPTS)  # every later prompt reused the system prompt's blocks (16 tokens each)
    assert s["prefix_tokens_hit"] >= len(PROMPTS) * (len(system) // 16 * 16) > 0
    assert 0 < s["prefix_token_hit_rate"] < 1
    # reused KV gives the same tokens as computing the prompt afresh
    assert later[1].text == first.text
    assert [r.text for r in later] == [r.text for r in gen(static, [sys_req(p, max_tokens=12) for p in PROMPTS])]
    off = make(tiny_dir, prefix_cache_mb=0)
    assert [r.text for r in gen(off, [sys_req(p, max_tokens=12) for p in PROMPTS])] == [r.text for r in later]
    assert "prefix_hits" not in off.stats()


def test_sampled_rows_reproduce_whatever_the_batch(tiny_dir, static):
    engine = make(tiny_dir)
    q = req(PROMPTS[2], max_tokens=20, temperature=0.9, seed=11)
    alone = asyncio.run(engine.submit(q)).text
    others = [req(PROMPTS[i % 4], max_tokens=5 + 7 * i, temperature=0.5 * (i % 3), seed=i) for i in range(6)]
    (out, _) = asyncio.run(timed(engine, others[:3] + [q] + others[3:], delays=[0, 0.002, 0.004, 0.003, 0, 0.01, 0]))
    assert out[3].text == alone == gen(static, [q])[0].text  # and the same draw as the static engine
    assert len({asyncio.run(engine.submit(q.model_copy(update={"seed": s}))).text for s in range(4)}) > 1


def test_kv_budget_admits_what_fits_and_refuses_what_never_can(tiny_dir, static):
    engine = make(tiny_dir, kv_cache_mb=1)  # the tiny model's KV is 512 B/token: 2048 tokens
    assert engine._get_scheduler().bytes_per_token == 512
    batch = [req(PROMPTS[i % 4], max_tokens=600) for i in range(6)]  # ~630 tokens each: 3 fit at once
    out = gen(engine, batch)
    assert all(r.error is None for r in out) and engine.stats()["peak_rows"] == 3
    assert [r.text for r in out] == [r.text for r in gen(static, batch)]
    huge = gen(engine, [req("hi", max_tokens=5000)])[0]
    assert huge.text == "" and "hf.kv_cache_mb=1" in huge.error and "max_tokens" in huge.error


def test_a_failing_step_fails_its_rows_and_the_engine_recovers(tiny_dir, monkeypatch):
    engine = make(tiny_dir)
    ok = gen(engine, [req("hi", max_tokens=4)])[0]

    def boom(*a, **kw):
        raise RuntimeError("device lost")

    with monkeypatch.context() as m:
        m.setattr(engine.model, "forward", boom)
        failed = gen(engine, [req("hi", max_tokens=4), req("x = 1", max_tokens=9)])
    assert all("device lost" in r.error for r in failed)
    assert gen(engine, [req("hi", max_tokens=4)])[0].text == ok.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread we kill on purpose
def test_a_dead_step_loop_fails_the_health_check(tiny_dir, monkeypatch):
    """An error outside a model step kills the scheduler thread; the replica's health check then fails, so Serve
    replaces it instead of letting callers wait forever."""
    engine = make(tiny_dir)
    gen(engine, [req("hi", max_tokens=2)])
    engine.check_health()  # running: healthy
    monkeypatch.setattr(engine._scheduler, "_admit", lambda: (_ for _ in ()).throw(RuntimeError("bug")))
    engine._scheduler.submit(Row(ids=[1, 2, 3], max_tokens=2, temperature=0.0, seed=0, adapter=None,
                                 done=lambda _: None))
    engine._scheduler._thread.join(timeout=30)
    with pytest.raises(RuntimeError, match="step loop died"):
        engine.check_health()


def test_a_caller_that_gives_up_frees_its_row(tiny_dir):
    engine = make(tiny_dir)

    async def impatient():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.submit(req(PROMPTS[1], max_tokens=1000)), timeout=0.2)
        await asyncio.sleep(0.3)  # the loop notices at its next iteration
        return engine.stats()["steps"]

    steps = asyncio.run(impatient())
    time.sleep(0.3)
    assert engine.stats()["cancelled"] == 1 and engine.stats()["steps"] == steps  # it stopped decoding
    assert engine._scheduler._decoding == [] and engine._scheduler.pool.rows == 0
    assert gen(engine, [req("hi", max_tokens=3)])[0].error is None


def test_a_caller_that_gives_up_beside_others_leaves_them_their_answers(tiny_dir):
    """The row that gives up holds slot 0 while another decodes: the last row moves into its slot (the KV cache is
    copied in place) and its answer is the one it gives alone."""
    engine = make(tiny_dir)
    alone = gen(engine, [req(PROMPTS[0], max_tokens=400)])[0]

    async def both():
        impatient = asyncio.ensure_future(asyncio.wait_for(engine.submit(req(PROMPTS[1], max_tokens=1000)),
                                                           timeout=0.2))
        await asyncio.sleep(0.05)  # the impatient row is admitted first (slot 0)
        patient = asyncio.ensure_future(engine.submit(req(PROMPTS[0], max_tokens=400)))
        with pytest.raises(asyncio.TimeoutError):
            await impatient
        return await asyncio.wait_for(patient, timeout=60)  # a dead step loop would never answer it

    res = asyncio.run(both())
    assert engine.stats()["cancelled"] == 1 and engine._scheduler._thread.is_alive()
    assert res.error is None and res.text == alone.text and res.tokens_out == 400
