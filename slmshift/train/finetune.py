"""S5's LoRA step itself: examples to tensors, the completion-only loss, and the training loop over a peft model.

The loop is plain torch: the prompt is the chat template applied to the call's messages (exactly as the hf engine
builds it), the loss covers only the target tokens plus EOS. `lora_run.py` runs it inside Ray Train workers (one
run per task cluster, resumable); `bench/lora_train.py` runs the same `lora_loop` in one process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from slmshift.platform.errors import SlmshiftError
from slmshift.train.precision import forward_precision, keeps_activations, resolved_precision

IGNORE = -100  # label value torch's cross-entropy skips
BUCKET_POOL = 16  # batches' worth of rows sorted by length together (`bucket_by_length`)
MIN_AUTO_STEPS = 20  # steps: auto never trains fewer (warm-up, then enough updates to move a small cluster)
STATE_FILE = "trainer_state.pt"  # beside the adapter in a checkpoint: optimiser, schedule, step, losses


class LoraOptions(BaseModel):
    """LoRA hyper-parameters (the `lora:` options of `slmshift convert`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=8, ge=1, description="LoRA rank r.")
    alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                      description="Module names that get LoRA (Llama-style names).")
    # 1e-3, not the usual 2e-4: at the few dozen steps a cluster gets on a CPU, 2e-4 left adapters undertrained
    # (BENCHMARKS.md 2026-12-06: held-out gain +0.23 -> +0.88 on a MetaGPT cluster with half the steps; agreement
    # 0.22 -> 0.78 and 0.06 -> 0.72 on gateway traffic)
    learning_rate: float = Field(default=1e-3, gt=0, description="AdamW learning rate (after a short warm-up).")
    steps: PositiveInt | Literal["auto"] = Field(default="auto", description="Optimiser steps (the data is repeated as "
                                         "needed), or auto: chosen per cluster by its rows and tokens (`plan_steps`).")
    epochs: float = Field(default=2.0, gt=0, description="With steps: auto, passes over the cluster's train rows.")
    token_budget: int = Field(default=100_000, ge=1, description="With steps: auto, the most prompt + target tokens "
                              "a run may train on beyond one pass over its rows (a cluster of long calls gets "
                              "fewer passes, never less than one).")
    batch_size: int = Field(default=8, ge=1, description="Examples per step.")
    max_length: int = Field(default=512, ge=16, description="Prompt + target tokens; a longer prompt loses its "
                            "middle, keeping its instructions and its end.")
    seed: int = Field(default=0, description="Seeds LoRA init, dropout and data order.")
    val_loss_rows: int = Field(default=16, ge=0, description="Held-out rows the base and adapter val loss is measured "
                               "on after training (a diagnostic: S5 grades every held-out call); 0 skips it.")
    report_every: int = Field(default=10, ge=1, description="Steps between `ray.train.report` metrics.")
    bucket_by_length: bool = Field(default=True, description="Batch rows of similar length together (within pools "
                                   "of 16 batches) so little compute goes to padding.")
    checkpoint_every: int = Field(default=10, ge=1, description="Steps between checkpoints (and one at the end); a "
                                  "run that dies resumes from the latest one.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(default="auto", description="Compute precision of "
                                      "the forward pass: bfloat16 autocast (the adapter, its gradients and the "
                                      "optimiser stay float32) or float32. auto: bfloat16 where the hardware does bf16 "
                                      "matmuls natively (`precision.native_bf16`), float32 elsewhere (emulated bf16 "
                                      "is slower).")
    activation_checkpointing: bool | Literal["auto"] = Field(default="auto", description="Recompute each layer's "
                                         "activations in the backward pass instead of keeping them: less memory for "
                                         "slower steps, the same math. auto: keep them when they fit in half of "
                                         "the memory available (`precision.keeps_activations`; figures in "
                                         "BENCHMARKS.md).")


def lora_config(options: LoraOptions) -> Any:
    """The one place a `peft.LoraConfig` is built."""
    from peft import LoraConfig

    return LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=list(options.target_modules), bias="none", task_type="CAUSAL_LM")


@dataclass(frozen=True)
class StepPlan:
    steps: int
    why: str


def plan_steps(tokenizer: Any, messages: Iterable[Any], targets: Iterable[str], options: LoraOptions) -> StepPlan:
    """A cluster's optimiser steps: `options.steps` when fixed; for auto, `epochs` passes over the train rows, cut
    to what `token_budget` buys at the rows' mean encoded length but never below one pass, and never under
    MIN_AUTO_STEPS. A fixed 40 steps gave a 12-row cluster 13 passes and a 300-row one half a pass; a fixed budget
    alone left an accumulating flywheel's 246 rows 0.94 of a pass, and its adapter worse than the one in force
    (BENCHMARKS.md 2026-12-06): compute follows what there is to learn, and every row is seen."""
    if options.steps != "auto":
        return StepPlan(int(options.steps), "fixed")
    lengths = []
    for m, t in zip(messages, targets):
        try:
            lengths.append(len(encode_example(tokenizer, m, str(t), options.max_length)[0]))
        except (ValueError, TypeError, KeyError):  # collate skips such a row too
            continue
    if not lengths:
        return StepPlan(MIN_AUTO_STEPS, f"{MIN_AUTO_STEPS} (no usable rows to size by)")
    mean = sum(lengths) / len(lengths)
    one_pass = math.ceil(len(lengths) / options.batch_size)
    by_rows = math.ceil(options.epochs * len(lengths) / options.batch_size)
    by_tokens = int(options.token_budget // (options.batch_size * mean))
    steps = max(MIN_AUTO_STEPS, min(by_rows, max(by_tokens, one_pass)))
    return StepPlan(steps, f"auto: {options.epochs:g} passes over {len(lengths)} rows = {by_rows} steps, "
                           f"token budget {options.token_budget:,} / ({options.batch_size} x {mean:.0f} tokens) = "
                           f"{by_tokens}, at least one pass ({one_pass}) and {MIN_AUTO_STEPS}")


# --- examples -> tensors --------------------------------------------------------------------------


def encode_example(tokenizer: Any, messages: list[dict[str, str]] | str, target: str, max_length: int
                   ) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one call: labels are IGNORE on the prompt, the target's ids plus EOS after it.

    The target keeps at least half the budget; a prompt over the rest loses its middle (`fit_prompt`).
    """
    from slmshift.platform.artifacts import chat_prompt

    if isinstance(messages, str):
        messages = json.loads(messages)
    text = chat_prompt(tokenizer, messages)
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = answer[: max(max_length - len(prompt), max_length // 2)]
    prompt = fit_prompt(tokenizer, messages, text, prompt, max_length - len(answer))
    return prompt + answer, [IGNORE] * len(prompt) + answer


def fit_prompt(tokenizer: Any, messages: list[dict[str, str]], text: str, ids: list[int], budget: int) -> list[int]:
    """`ids` (the tokens of `text`, the rendered chat) cut to `budget` tokens by dropping the middle: the call's
    instructions (its leading system messages and first user message, up to half the budget) and the end of its
    context (the latest turns and the generation prompt) stay. Cutting from the left, as before, dropped the
    instructions of every long call: a multi-turn Operator call lost the task, a MetaGPT engineer call its spec."""
    if len(ids) <= budget:
        return ids
    head_chars = _instructions_end(messages, text)
    head = len(tokenizer(text[:head_chars], add_special_tokens=False)["input_ids"]) if head_chars else 0
    head = min(head, budget // 2)
    return ids[:head] + ids[len(ids) - (budget - head):]


def _instructions_end(messages: list[dict[str, str]], text: str) -> int:
    """Where, in the rendered chat `text`, the content of the first user message ends (0 if it cannot be found).
    Found by the contents themselves, in order, so it holds for any chat template that quotes them verbatim."""
    pos = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, str) or not content:
            continue
        at = text.find(content, pos)
        if at < 0:
            return 0
        pos = at + len(content)
        if m.get("role") not in ("system", "developer"):
            return pos
    return 0


def collate(tokenizer: Any, messages: Iterable[Any], targets: Iterable[str], max_length: int) -> dict[str, Any]:
    """Right-padded batch tensors (training needs no left padding); rows that fail to parse are skipped."""
    import torch

    rows = []
    for m, t in zip(messages, targets):
        try:
            rows.append(encode_example(tokenizer, m, str(t), max_length))
        except (ValueError, TypeError, KeyError):  # a malformed logged prompt: skip the row, never crash
            continue
    if not rows:
        raise SlmshiftError("no usable rows in a training batch: every `messages` value failed to parse as a "
                            "JSON list of chat messages")
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


# --- the loop (shared by Ray Train and the in-process benchmark baseline) ---------------------------


def target_loss(model: Any, batch: dict[str, Any], device: Any) -> tuple[Any, int]:
    """Summed cross-entropy over target tokens and their count (so means can be token-weighted).

    Logits are projected only at positions that predict a target token (`logits_to_keep`): the vocabulary
    head over every prompt position would be most of the memory and a fifth of the compute for SmolLM2.
    """
    import torch

    batch = {k: v.to(device) for k, v in batch.items()}
    targets = batch["labels"][:, 1:]
    keep = torch.nonzero((targets != IGNORE).any(dim=0)).squeeze(1)  # position p predicts token p + 1
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError:  # a model class without logits_to_keep: project every position
        logits = model(**inputs).logits[:, keep]
    labels = targets[:, keep]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def eval_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]], options: LoraOptions, device: Any,
              base: bool = False) -> float | None:
    """Token-weighted mean target loss over `rows` (None for no rows); `base=True` switches the adapter off."""
    import contextlib

    import torch

    if not rows:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    off = model.disable_adapter() if base else contextlib.nullcontext()
    with off, torch.no_grad(), forward_precision(resolved_precision(options.precision, device), device):
        for i in range(0, len(rows), options.batch_size):
            chunk = rows[i: i + options.batch_size]
            batch = collate(tokenizer, [r["messages"] for r in chunk], [r["target"] for r in chunk], options.max_length)
            loss, n = target_loss(model, batch, device)
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / count if count else None


@dataclass
class LoopState:
    """A LoRA run's progress beyond the adapter weights: what a checkpoint needs to resume the run where it
    stopped (the optimiser's moments and the warm-up schedule, not just the weights) and what the run reports."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # non-padding tokens (prompt and target)
    target_tokens: int = 0  # the completion tokens the loss is on: what the run learns from
    positions: int = 0  # padded batch positions: tokens / positions is the share of compute not wasted on padding
    train_s: float = 0.0
    optimizer: dict[str, Any] | None = None  # state_dicts, filled by `lora_loop` at every step
    scheduler: dict[str, Any] | None = None

    def save(self, directory: str, opt: Any, sched: Any) -> None:
        import torch

        torch.save({"step": self.step, "losses": self.losses, "tokens": self.tokens,
                    "target_tokens": self.target_tokens, "positions": self.positions, "train_s": self.train_s,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, Path(directory) / STATE_FILE)

    def stats(self) -> dict[str, float]:
        s = max(self.train_s, 1e-9)
        return {"tokens": self.tokens, "target_tokens": self.target_tokens, "train_s": self.train_s,
                "tokens_per_s": self.tokens / s, "target_tokens_per_s": self.target_tokens / s,
                "pad_share": 1 - self.tokens / max(self.positions, 1)}

    @classmethod
    def restore(cls, model: Any, directory: str) -> LoopState:
        """Load a checkpoint's adapter weights into `model` (a fresh peft model) and return its loop state."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(Path(directory) / "adapter_model.safetensors")))
        path = Path(directory) / STATE_FILE
        return cls(**torch.load(path, weights_only=False)) if path.exists() else cls()


def lora_loop(model: Any, tokenizer: Any, batches: Iterator[dict[str, Any]], options: LoraOptions, device: Any,
              on_step: Callable[[int, float, dict[str, float]], None] | None = None,
              state: LoopState | None = None, checkpoint: Callable[[int, Any, Any], None] | None = None
              ) -> dict[str, float]:
    """Train `model` (a peft model) for `options.steps` steps over `batches` ({"messages", "target"} columns).

    `on_step(step, loss, stats)` runs after every step (reporting); `checkpoint(step, optimizer, scheduler)` after
    every `checkpoint_every`-th and the last. A `state` with `step > 0` resumes: the optimiser and schedule are
    restored and the batches already trained on are skipped, so the run continues as if never stopped. Returns
    loss and throughput.
    """
    import torch

    if options.steps == "auto":
        raise SlmshiftError("lora_loop needs a number of steps: resolve steps: auto with plan_steps first")
    state = state or LoopState()
    precision = resolved_precision(options.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=0.0)
    warmup = max(1, min(10, options.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    if state.step:
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
        for _ in range(state.step):  # the same data order as an uninterrupted run
            next(batches)
        if state.step >= options.steps and checkpoint is not None:  # a finished run, restored: report it again
            checkpoint(state.step, opt, sched)
    model.train()
    for step in range(state.step + 1, options.steps + 1):
        t0 = time.perf_counter()  # the batch fetch counts: streaming data must keep up with the model
        raw = next(batches)
        batch = collate(tokenizer, raw["messages"], raw["target"], options.max_length)
        with forward_precision(precision, device):  # the backward follows the forward's dtypes by itself
            loss_sum, n = target_loss(model, batch, device)
        loss = loss_sum / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        state.step = step
        state.train_s += time.perf_counter() - t0
        state.tokens += int(batch["attention_mask"].sum())
        state.target_tokens += n
        state.positions += batch["attention_mask"].numel()
        state.losses.append(float(loss.detach()))
        if not math.isfinite(state.losses[-1]):
            raise SlmshiftError(f"LoRA training diverged at step {step} (loss {state.losses[-1]}). "
                                "Fix: lower lora.learning_rate.")
        stats = {**state.stats(), "lr": sched.get_last_lr()[0]}
        if on_step is not None:
            on_step(step, state.losses[-1], stats)
        if checkpoint is not None and (step % options.checkpoint_every == 0 or step == options.steps):
            checkpoint(step, opt, sched)
    losses = state.losses
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_loss_first": losses[0], "train_loss_last": sum(tail) / len(tail), **state.stats()}


def repeat_batches(epoch_iter: Callable[[int], Iterable[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """Endless batches: epoch 0, 1, 2, ... of `epoch_iter(epoch)`."""
    epoch = 0
    while True:
        empty = True
        for b in epoch_iter(epoch):
            empty = False
            yield b
        if empty:
            raise SlmshiftError("the training dataset is empty")
        epoch += 1


def bucket_by_length(pools: Iterable[dict[str, Any]], tokenizer: Any, options: LoraOptions, seed: int = 0
                     ) -> Iterator[dict[str, Any]]:
    """Training batches of rows of similar length, so little of a batch is padding: each pool (a larger batch of
    rows, `BUCKET_POOL` batches' worth) is sorted by encoded length, cut into batches of `options.batch_size`, and the
    batches are yielded in a seeded random order (the loss does not see a short-to-long curriculum)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for pool in pools:
        messages, targets = list(pool["messages"]), list(pool["target"])
        lengths = []
        for m, t in zip(messages, targets):
            try:
                lengths.append(len(encode_example(tokenizer, m, str(t), options.max_length)[0]))
            except (ValueError, TypeError, KeyError):  # unparsable: collate skips it; its place does not matter
                lengths.append(0)
        order = np.argsort(lengths, kind="stable")
        chunks = [order[i:i + options.batch_size] for i in range(0, len(order), options.batch_size)]
        for k in rng.permutation(len(chunks)):
            yield {"messages": [messages[i] for i in chunks[k]], "target": [targets[i] for i in chunks[k]]}


def setup_peft(base_source: str, options: LoraOptions, device: str = "auto") -> tuple[Any, Any, Any]:
    """(peft model in train mode, tokenizer, device) on the base SLM."""
    import torch
    from peft import get_peft_model

    from transformers.utils import logging as hf_logging

    from slmshift.serve.sources import load_model_and_tokenizer

    hf_logging.disable_progress_bar()  # a weight-loading bar per worker adds nothing to the training bar
    torch.manual_seed(options.seed)
    model, tokenizer = load_model_and_tokenizer(base_source, "float32", device)
    dev = next(model.parameters()).device
    model.config.use_cache = False  # training reads no cache: building one costs memory and time
    if not keeps_activations(model.config, options, resolved_precision(options.precision, dev)):
        # Kept activations are most of a step's memory (SmolLM2-135M, 8 rows x 768 tokens, float32: 17 GB).
        # Non-reentrant checkpointing needs no grad on the (frozen) inputs and replays dropout's RNG exactly.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(options))
    return model, tokenizer, dev
