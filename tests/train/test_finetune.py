"""S5: LoRA on Ray Train + Ray Data over a synthetic curated.parquet, on the tiny random Llama."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest

from slmshift.platform.errors import SlmshiftError
from slmshift.train.finetune import IGNORE, STATE_FILE, LoopState, LoraOptions, encode_example
from slmshift.train.lora_run import train_adapter

INTENT = '{"functions": ["book_flight"]}'
OTHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def messages(i: int, kind: str) -> str:
    user = f"please book a flight to city {i} tomorrow" if kind == "intent" else f"what is the weather at {i}?"
    return json.dumps([{"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": user}])


def curated_rows() -> pd.DataFrame:
    rows = []
    for i in range(40):
        for cluster, kind, target in ((0, "intent", INTENT), (1, "call", OTHER)):
            rows.append({"record_id": f"{kind}{i}", "episode_id": f"ep{i}", "task_id": f"t{i}", "scenario": "operator",
                         "role": "planner" if kind == "intent" else "executor",
                         "call_kind": "intent" if kind == "intent" else "function_call", "category": "template",
                         "expect": "json", "messages": messages(i, kind), "target": target,
                         "split": "val" if i % 5 == 0 else "train", "cluster": cluster})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def convert_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("convert")
    curated_rows().to_parquet(d / "curated.parquet")
    return d


TRAINED_OPTS = LoraOptions(rank=8, alpha=16, learning_rate=3e-3, steps=30, batch_size=8, report_every=5,
                           checkpoint_every=10, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def trained(ray_cluster, convert_dir, tiny_model_dir):
    seen: list[tuple[int, float]] = []
    result = train_adapter(str(convert_dir / "curated.parquet"), 0, "planner-intent", tiny_model_dir,
                           str(convert_dir), TRAINED_OPTS, on_step=lambda step, loss: seen.append((step, loss)))
    return result, seen


def test_encode_masks_prompt_and_keeps_target(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels = encode_example(tok, messages(3, "intent"), INTENT, max_length=512)
    target = [t for t in labels if t != IGNORE]
    assert tok.decode(target[:-1]) == INTENT and target[-1] == tok.eos_token_id
    assert len(ids) == len(labels) and labels[0] == IGNORE
    short_ids, short_labels = encode_example(tok, messages(3, "intent"), INTENT * 20, max_length=64)
    assert len(short_ids) == 64 and sum(t != IGNORE for t in short_labels) <= 64
    assert short_ids[-(64 - sum(t != IGNORE for t in short_labels)) - 1] != IGNORE  # prompt kept its latest tokens


def test_a_long_prompt_keeps_its_instructions_and_its_end(tiny_model_dir):
    """A call over the budget loses the middle of its context, never its task or its latest turn."""
    from transformers import AutoTokenizer

    from slmshift.platform.artifacts import chat_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = [{"role": "system", "content": "Answer with JSON only."},
            {"role": "user", "content": "Task: book a flight to Oslo."}]
    for turn in range(40):
        chat += [{"role": "assistant", "content": f"step {turn}: looked up fares page {turn}"},
                 {"role": "user", "content": f"tool result {turn}: " + "fare " * 10}]
    chat[-1]["content"] = "tool result: the seat is 14C."
    whole = tok(chat_prompt(tok, chat), add_special_tokens=False)["input_ids"]
    ids, labels = encode_example(tok, chat, INTENT, max_length=160)
    kept = [t for t, lab in zip(ids, labels) if lab == IGNORE]
    prompt = tok.decode(kept)
    assert len(whole) > 300 and len(ids) == 160
    assert "Answer with JSON only." in prompt and "Task: book a flight to Oslo." in prompt
    assert "the seat is 14C." in prompt and kept[-8:] == whole[-8:]  # the generation prompt too
    assert "tool result 20" not in prompt  # the middle went
    # instructions longer than half the budget keep only half: the end still fits
    chat[1]["content"] = "Task: " + "very long instructions " * 200
    ids, labels = encode_example(tok, chat, INTENT, max_length=160)
    assert "the seat is 14C." in tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE])


def test_auto_steps_follow_rows_and_tokens(tiny_model_dir):
    """steps: auto gives a small cluster the floor, a larger one two passes, and a cluster of long calls what the
    token budget buys, but never less than one pass over its rows; a fixed number stays as given."""
    from transformers import AutoTokenizer

    from slmshift.train.finetune import MIN_AUTO_STEPS, plan_steps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    opts = LoraOptions(batch_size=8, epochs=2, token_budget=100_000, max_length=512)
    few = plan_steps(tok, [messages(i, "intent") for i in range(12)], [INTENT] * 12, opts)
    assert few.steps == MIN_AUTO_STEPS
    many = plan_steps(tok, [messages(i, "intent") for i in range(200)], [INTENT] * 200, opts)
    assert many.steps == 50 and "200 rows" in many.why  # 2 x 200 / 8, far under the token budget
    long_chat = json.dumps([{"role": "user", "content": "word " * 600}])
    some_long = plan_steps(tok, [long_chat] * 100, [INTENT] * 100, opts)  # the budget trims the second pass
    assert some_long.steps == 100_000 // (8 * 512) == 24 and 13 < some_long.steps < 25  # rows cut to max_length
    long = plan_steps(tok, [long_chat] * 200, [INTENT] * 200, opts)  # the budget buys under one pass: one pass
    assert long.steps == 25 and "one pass (25)" in long.why
    assert plan_steps(tok, [], [], opts).steps == MIN_AUTO_STEPS
    fixed = plan_steps(tok, [messages(1, "intent")], [INTENT], opts.model_copy(update={"steps": 7}))
    assert (fixed.steps, fixed.why) == (7, "fixed")


def test_every_step_reaches_the_driver_in_order(trained):
    """The worker's own output never reaches a `log_to_driver=False` console, so its steps come back to the caller."""
    result, seen = trained
    assert [step for step, _ in seen] == list(range(1, 31))
    assert all(math.isfinite(loss) and loss > 0 for _, loss in seen)
    assert seen[0][1] == pytest.approx(result.train_loss_first)


def test_lora_lowers_validation_loss(trained, convert_dir):
    trained, _ = trained
    assert trained.n_train == 32 and trained.n_val == 8 and trained.steps == 30
    assert trained.val_loss_adapter < 0.5 * trained.val_loss_base
    assert trained.train_loss_last < trained.train_loss_first
    assert trained.tokens > 0 and trained.tokens_per_s > 0
    # throughput is also counted in what the loss learns from: completion tokens only, not the prompts
    assert 0 < trained.target_tokens < trained.tokens and 0 < trained.target_tokens_per_s < trained.tokens_per_s
    assert 0 <= trained.pad_share < 1
    # where the wall went, so that a slow conversion says which part was slow
    phases = [trained.start_s, trained.setup_s, trained.train_s, trained.val_loss_s]
    assert all(p > 0 for p in phases) and sum(phases) <= trained.wall_s and trained.val_loss_rows == 8
    # how it ran, resolved on the worker: a tiny model's activations always fit
    from slmshift.train.precision import resolved_precision

    assert trained.precision == resolved_precision(TRAINED_OPTS.precision, "cpu")
    assert trained.activation_checkpointing is False
    assert Path(trained.adapter_dir) == convert_dir / "adapters" / "planner-intent"
    ckpts = [c for c in (convert_dir / "checkpoints").glob("planner-intent-*/checkpoint_*") if c.is_dir()]
    assert len(ckpts) == 2 and all((c / "adapter_config.json").is_file() and (c / STATE_FILE).is_file()
                                   for c in ckpts)
    assert not (Path(trained.adapter_dir) / STATE_FILE).exists()  # the adapter dir holds the adapter only


def test_saved_adapter_reloads_and_changes_outputs(trained, tiny_model_dir):
    trained, _ = trained
    import torch
    from peft import PeftModel

    from slmshift.platform.artifacts import chat_prompt
    from slmshift.serve.sources import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer(tiny_model_dir, "float32", "cpu")
    prompt = tok(chat_prompt(tok, json.loads(messages(5, "intent"))), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        before = base.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    tuned = PeftModel.from_pretrained(base, trained.adapter_dir).eval()
    with torch.no_grad():
        after = tuned.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert before.tolist() != after.tolist()
    assert tok.decode(after, skip_special_tokens=True).startswith('{"functions')  # it learned the task's format


def test_a_finished_run_is_resumed_not_redone_and_other_options_start_afresh(trained, ray_cluster, convert_dir,
                                                                            tiny_model_dir):
    """convert run again on the same rows and options (a resumed loop) picks the finished run up from its last
    checkpoint; changed options are another run, and the old run's checkpoints go."""
    first, _ = trained
    again = train_adapter(str(convert_dir / "curated.parquet"), 0, "planner-intent", tiny_model_dir,
                          str(convert_dir), TRAINED_OPTS)
    assert again.resumed_from_step == again.steps == 30 and again.checkpoint_dir.startswith(
        str(Path(first.checkpoint_dir).parent))
    assert again.val_loss_adapter == pytest.approx(first.val_loss_adapter, rel=1e-5)
    other = train_adapter(str(convert_dir / "curated.parquet"), 0, "planner-intent", tiny_model_dir,
                          str(convert_dir), TRAINED_OPTS.model_copy(update={"steps": 2, "val_loss_rows": 3}))
    assert other.resumed_from_step == 0 and other.steps == 2
    assert other.val_loss_rows == 3  # a sample of the held-out rows: the loss is a diagnostic beside S5's grading
    assert [d.name for d in (convert_dir / "checkpoints").glob("planner-intent-*")] == [
        Path(other.checkpoint_dir).parent.name]


def test_empty_cluster_is_a_clear_error(ray_cluster, convert_dir, tiny_model_dir):
    with pytest.raises(SlmshiftError, match="cluster 7 .* no rows with split 'train'"):
        train_adapter(str(convert_dir / "curated.parquet"), 7, "nothing", tiny_model_dir, str(convert_dir),
                      LoraOptions(steps=1))


def test_options_reject_unknown_keys():
    with pytest.raises(ValueError, match="extra"):
        LoraOptions.model_validate({"rank": 4, "lr": 1e-3})


def test_activation_checkpointing_changes_memory_not_the_math(tiny_model_dir):
    """Same seed, same batches: recomputing activations in backward gives the same losses as keeping them."""
    from slmshift.train.finetune import lora_loop, setup_peft

    rows = curated_rows()
    rows = rows[(rows.cluster == 0) & (rows.split == "train")]
    batches = [{"messages": list(rows.messages[i:i + 4]), "target": list(rows.target[i:i + 4])} for i in (0, 4, 8)]
    losses = {}
    for on in (False, True):
        opts = LoraOptions(steps=3, batch_size=4, learning_rate=3e-3, activation_checkpointing=on)
        model, tok, dev = setup_peft(tiny_model_dir, opts, "cpu")
        assert model.base_model.model.is_activation_checkpointing == on
        seen: list[float] = []
        lora_loop(model, tok, iter(batches), opts, dev, lambda step, loss, stats: seen.append(loss))
        losses[on] = seen
    assert losses[True] == pytest.approx(losses[False], rel=1e-5) and losses[True][-1] < losses[True][0]


def test_bfloat16_trains_as_float32_does_and_the_adapter_stays_float32(tiny_model_dir):
    """bf16 autocast (auto's choice on a CPU with AMX or AVX512-BF16) changes the matmuls' precision, not what is
    learned: the same batches give nearly the same losses, and the adapter and its optimiser stay float32."""
    import torch

    from slmshift.train.finetune import lora_loop, setup_peft

    rows = curated_rows()
    rows = rows[(rows.cluster == 0) & (rows.split == "train")]
    batches = [{"messages": list(rows.messages[i:i + 4]), "target": list(rows.target[i:i + 4])} for i in (0, 4, 8, 0)]
    losses = {}
    for precision in ("float32", "bfloat16"):
        opts = LoraOptions(steps=4, batch_size=4, learning_rate=3e-3, dropout=0.0, precision=precision)
        model, tok, dev = setup_peft(tiny_model_dir, opts, "cpu")
        seen: list[float] = []
        lora_loop(model, tok, iter(batches), opts, dev, lambda step, loss, stats: seen.append(loss))
        losses[precision] = seen
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.03)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]


def test_auto_precision_and_checkpointing_follow_the_machine(monkeypatch):
    """auto precision is bf16 only where the CPU does bf16 natively (emulated bf16 is slower than float32); auto
    checkpointing keeps activations only where they fit in half of the available memory."""
    from types import SimpleNamespace

    from slmshift.train import precision

    auto = LoraOptions()
    for flags, want in (({"avx2", "amx_bf16"}, "bfloat16"), ({"avx512f", "avx512_bf16"}, "bfloat16"),
                        ({"avx2", "avx512f"}, "float32"), (set(), "float32")):
        monkeypatch.setattr(precision, "_cpu_flags", lambda flags=flags: frozenset(flags))
        assert precision.resolved_precision("auto", "cpu") == want
    assert precision.resolved_precision("float32", "cpu") == "float32"
    smollm2 = SimpleNamespace(hidden_size=576, num_hidden_layers=30)  # 8 x 512 tokens: ~4.5 GB bf16, ~6.8 GB fp32
    gib = 2 ** 30
    assert precision.keeps_activations(smollm2, auto, "bfloat16", available=10 * gib)
    assert not precision.keeps_activations(smollm2, auto, "bfloat16", available=8 * gib)
    assert not precision.keeps_activations(smollm2, auto, "float32", available=12 * gib)
    assert not precision.keeps_activations(smollm2, LoraOptions(activation_checkpointing=True), "bfloat16", 10 ** 15)
    assert precision.keeps_activations(smollm2, LoraOptions(activation_checkpointing=False), "float32", available=1)
    assert not precision.keeps_activations(SimpleNamespace(), auto, "bfloat16", available=10 ** 15)  # cannot size it


def test_available_memory_heeds_a_containers_cgroup_limit(monkeypatch, tmp_path):
    """psutil sees the host's memory; a container's cgroup limit is what kills a worker, so it bounds the estimate."""
    from slmshift.train import precision

    (tmp_path / "max").write_text(str(6 * 2 ** 30))
    (tmp_path / "current").write_text(str(2 * 2 ** 30))
    (tmp_path / "unlimited").write_text("max")
    monkeypatch.setattr(precision, "CGROUP_MEMORY", ((str(tmp_path / "max"), str(tmp_path / "current")),))
    assert precision.available_memory() <= 4 * 2 ** 30
    monkeypatch.setattr(precision, "CGROUP_MEMORY", ((str(tmp_path / "unlimited"), str(tmp_path / "current")),
                                                     (str(tmp_path / "absent"), str(tmp_path / "absent"))))
    import psutil

    assert precision.available_memory() > 0.5 * psutil.virtual_memory().available


def test_a_resumed_loop_continues_as_if_never_stopped(tiny_model_dir, tmp_path):
    """Stopped after a checkpoint and restored into a fresh model, the loop trains the remaining steps on the same
    batches with the same optimiser moments and schedule: the same losses as one uninterrupted run."""
    from slmshift.train.finetune import lora_loop, setup_peft

    rows = curated_rows()
    rows = rows[(rows.cluster == 0) & (rows.split == "train")]
    batches = [{"messages": list(rows.messages[i:i + 4]), "target": list(rows.target[i:i + 4])} for i in range(0, 24, 4)]
    opts = LoraOptions(steps=6, batch_size=4, learning_rate=3e-3, dropout=0.0, checkpoint_every=3)

    def run(state=None, model=None, stop_after=None):
        model, tok, dev = model or setup_peft(tiny_model_dir, opts, "cpu")
        seen: list[float] = []

        def checkpoint(step, opt, sched):
            if step == stop_after:
                model.save_pretrained(tmp_path)
                LoopState(step=step, losses=list(seen)).save(str(tmp_path), opt, sched)
                raise KeyboardInterrupt  # the worker dies right after its checkpoint

        try:
            lora_loop(model, tok, iter(batches), opts, dev, lambda step, loss, stats: seen.append(loss), state=state,
                      checkpoint=checkpoint)
        except KeyboardInterrupt:
            pass
        return seen

    straight = run()
    head = run(stop_after=3)
    fresh = setup_peft(tiny_model_dir, opts, "cpu")
    state = LoopState.restore(fresh[0], str(tmp_path))
    assert state.step == 3 and state.losses == head
    tail = run(state=state, model=fresh)
    assert head + tail == pytest.approx(straight, rel=1e-5)


def test_length_buckets_cover_every_row_once_with_less_padding(tiny_model_dir):
    from transformers import AutoTokenizer

    from slmshift.train.finetune import bucket_by_length, collate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    opts = LoraOptions(batch_size=4, max_length=512)
    rows = [(json.dumps([{"role": "user", "content": "x " * (5 + (i * 37) % 200)}]), f"answer {i}") for i in range(32)]
    pool = {"messages": [m for m, _ in rows], "target": [t for _, t in rows]}

    def pad_share(batches):
        cells = [collate(tok, b["messages"], b["target"], 512)["attention_mask"] for b in batches]
        return 1 - sum(int(c.sum()) for c in cells) / sum(c.numel() for c in cells)

    bucketed = list(bucket_by_length([pool], tok, opts, seed=1))
    plain = [{k: v[i:i + 4] for k, v in pool.items()} for i in range(0, 32, 4)]
    assert sorted(t for b in bucketed for t in b["target"]) == sorted(pool["target"])  # each row once
    assert all(len(b["target"]) == 4 for b in bucketed)
    assert pad_share(bucketed) < 0.5 * pad_share(plain)
    assert [b["target"] for b in bucket_by_length([pool], tok, opts, seed=1)] == [b["target"] for b in bucketed]
    assert [b["target"] for b in bucket_by_length([pool], tok, opts, seed=2)] != [b["target"] for b in bucketed]


def test_clusters_train_one_after_another_where_one_node_holds_one_run(ray_cluster, convert_dir, tiny_model_dir):
    """On one 2-CPU node a run asks for both CPUs, so a second run could only wait, polling beside the first: it is
    started when the first is done (two runs at once is the multi-node test's case)."""
    from slmshift.train.lora_run import AdapterJob, concurrent_runs, train_adapters

    assert (concurrent_runs(2), concurrent_runs(1), concurrent_runs(1, num_workers=2)) == (1, 2, 1)
    jobs = [AdapterJob(0, "serial-intent", tiny_model_dir), AdapterJob(1, "serial-call", tiny_model_dir)]
    seen: dict[str, list[float]] = {j.label: [] for j in jobs}
    results = dict((job.label, r) for job, r in train_adapters(
        str(convert_dir / "curated.parquet"), jobs, str(convert_dir), LoraOptions(steps=3, batch_size=4),
        cpus_per_worker=2, on_step=lambda label: lambda step, loss: seen[label].append(time.time())))
    assert all(r.steps == 3 for r in results.values()), results
    (a0, a1), (b0, b1) = [(min(t), max(t)) for t in seen.values()]
    assert a1 < b0 or b1 < a0, seen  # never stepping at the same time
