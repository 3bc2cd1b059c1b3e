"""S5: fine-tune one task cluster's SLM with LoRA on Ray Train, streaming the curated log through Ray Data.

`train_adapter` reads `curated.parquet` with Ray Data, keeps the cluster's train (and val) rows, materialises
them (a lazy dataset would be re-read and re-filtered every epoch) and runs `lora_loop` inside a Ray Train
`TorchTrainer` worker. The loop is a plain torch loop over a peft model: the prompt is the chat template applied
to the call's messages (exactly as the hf engine builds it), the loss covers only the target tokens plus EOS.
Metrics go out through `ray.train.report`; checkpoints land in `<out_dir>/checkpoints/<label>/` and the final
adapter in `<out_dir>/adapters/<label>/`. `bench/lora_train.py` runs the same `lora_loop` in one process.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.errors import SlmshiftError

IGNORE = -100  # label value torch's cross-entropy skips


class LoraOptions(BaseModel):
    """LoRA hyper-parameters (the `lora:` options of `slmshift convert`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=8, ge=1, description="LoRA rank r.")
    alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                      description="Module names that get LoRA (Llama-style names).")
    learning_rate: float = Field(default=2e-4, gt=0, description="AdamW learning rate (after a short warm-up).")
    steps: int = Field(default=100, ge=1, description="Optimiser steps; the data is repeated as needed.")
    batch_size: int = Field(default=8, ge=1, description="Examples per step.")
    max_length: int = Field(default=512, ge=16, description="Prompt + target tokens; prompts are left-truncated.")
    seed: int = Field(default=0, description="Seeds LoRA init, dropout and data order.")
    report_every: int = Field(default=10, ge=1, description="Steps between `ray.train.report` metrics.")
    checkpoint_every: int = Field(default=50, ge=1, description="Steps between checkpoints (and one at the end).")
    activation_checkpointing: bool = Field(default=True, description="Recompute each layer's activations in the "
                                         "backward pass instead of keeping them: far less memory for some more "
                                         "compute (figures in BENCHMARKS.md).")


class TrainResult(BaseModel):
    label: str
    cluster: int
    adapter_dir: str
    checkpoint_dir: str
    steps: int
    n_train: int
    n_val: int
    train_loss_first: float
    train_loss_last: float = Field(description="Mean loss over the last tenth of the steps.")
    val_loss_base: float | None
    val_loss_adapter: float | None
    tokens: int = Field(description="Non-padding tokens the training steps processed.")
    tokens_per_s: float = Field(description="Training-loop throughput (model loading excluded).")
    wall_s: float = Field(description="Whole call: Ray Data read, Ray Train start-up, training, evaluation, save.")


def lora_config(options: LoraOptions) -> Any:
    """The one place a `peft.LoraConfig` is built."""
    from peft import LoraConfig

    return LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=list(options.target_modules), bias="none", task_type="CAUSAL_LM")


# --- examples -> tensors --------------------------------------------------------------------------


def encode_example(tokenizer: Any, messages: list[dict[str, str]] | str, target: str, max_length: int
                   ) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one call: labels are IGNORE on the prompt, the target's ids plus EOS after it.

    The target keeps at least half the budget; the prompt is left-truncated as the engine does at serving time.
    """
    from slmshift.platform.artifacts import chat_prompt

    if isinstance(messages, str):
        messages = json.loads(messages)
    prompt = tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer = answer[: max(max_length - len(prompt), max_length // 2)]
    prompt = prompt[len(prompt) - (max_length - len(answer)):] if len(prompt) + len(answer) > max_length else prompt
    return prompt + answer, [IGNORE] * len(prompt) + answer


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
    with off, torch.no_grad():
        for i in range(0, len(rows), options.batch_size):
            chunk = rows[i: i + options.batch_size]
            batch = collate(tokenizer, [r["messages"] for r in chunk], [r["target"] for r in chunk], options.max_length)
            loss, n = target_loss(model, batch, device)
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / count if count else None


def lora_loop(model: Any, tokenizer: Any, batches: Iterator[dict[str, Any]], options: LoraOptions, device: Any,
              on_step: Callable[[int, float, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train `model` (a peft model) for `options.steps` steps over `batches` ({"messages", "target"} columns).

    `on_step(step, loss, stats)` runs after every step (reporting, checkpointing). Returns loss and throughput.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=0.0)
    warmup = max(1, min(10, options.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses: list[float] = []
    tokens, train_s = 0, 0.0
    for step in range(1, options.steps + 1):
        t0 = time.perf_counter()  # the batch fetch counts: streaming data must keep up with the model
        raw = next(batches)
        batch = collate(tokenizer, raw["messages"], raw["target"], options.max_length)
        loss_sum, n = target_loss(model, batch, device)
        loss = loss_sum / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum())
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise SlmshiftError(f"LoRA training diverged at step {step} (loss {losses[-1]}). "
                                "Fix: lower lora.learning_rate.")
        stats = {"tokens": tokens, "train_s": train_s, "tokens_per_s": tokens / max(train_s, 1e-9),
                 "lr": sched.get_last_lr()[0]}
        if on_step is not None:
            on_step(step, losses[-1], stats)
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_loss_first": losses[0], "train_loss_last": sum(tail) / len(tail), "tokens": tokens,
            "train_s": train_s, "tokens_per_s": tokens / max(train_s, 1e-9)}


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


def setup_peft(base_source: str, options: LoraOptions, device: str = "auto") -> tuple[Any, Any, Any]:
    """(peft model in train mode, tokenizer, device) on the base SLM."""
    import torch
    from peft import get_peft_model

    from transformers.utils import logging as hf_logging

    from slmshift.serve.sources import load_model_and_tokenizer

    hf_logging.disable_progress_bar()  # a weight-loading bar per worker adds nothing to the training bar
    torch.manual_seed(options.seed)
    model, tokenizer = load_model_and_tokenizer(base_source, "float32", device)
    if options.activation_checkpointing:
        # Kept activations are most of the memory: SmolLM2-135M at 8 rows x 768 tokens held ~16 GB without this.
        # Non-reentrant checkpointing needs no grad on the (frozen) inputs and replays dropout's RNG exactly.
        model.config.use_cache = False
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(options))
    return model, tokenizer, next(model.parameters()).device


# --- Ray Train --------------------------------------------------------------------------------------


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker."""
    import ray.train
    import torch

    options = LoraOptions.model_validate(config["options"])
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if config["use_gpu"] else "cpu"
    model, tokenizer, dev = setup_peft(config["base_source"], options, device)
    trained = model
    if world > 1:
        import ray.train.torch

        trained = ray.train.torch.prepare_model(model, move_to_device=False)
    val_rows = [r for r in ray.train.get_dataset_shard("val").iter_rows()] if config["n_val"] else []
    shard = ray.train.get_dataset_shard("train")
    batches = repeat_batches(lambda epoch: shard.iter_batches(
        batch_size=options.batch_size, batch_format="numpy", local_shuffle_buffer_size=max(options.batch_size, 64),
        local_shuffle_seed=options.seed + epoch))
    steps_out = config.get("steps_out") if rank == 0 else None
    losses: list[float] = []

    def on_step(step: int, loss: float, stats: dict[str, float]) -> None:
        losses.append(loss)
        if steps_out is not None:
            try:
                steps_out.put_nowait((step, loss))
            except Exception:  # progress is a courtesy: a lost update must never stop training
                pass
        last = step == options.steps
        if step % options.report_every and step % options.checkpoint_every and not last:
            return
        metrics = {"step": step, "loss": loss, **stats}
        if last:
            metrics.update(eval_metrics())
        if step % options.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    model.save_pretrained(tmp)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)

    def eval_metrics() -> dict[str, float | None]:
        tail = losses[-max(1, len(losses) // 10):]  # as lora_loop's own summary
        return {"val_loss_base": eval_loss(model, tokenizer, val_rows, options, dev, base=True),
                "val_loss_adapter": eval_loss(model, tokenizer, val_rows, options, dev),
                "train_loss_first": losses[0], "train_loss_last": sum(tail) / len(tail)}

    lora_loop(trained, tokenizer, batches, options, dev, on_step)


def _read_split(curated_path: str, cluster: int, split: str) -> Any:
    import ray.data

    columns = ["messages", "target", "cluster", "split"]
    ds = ray.data.read_parquet(curated_path, columns=columns)
    return ds.filter(expr=f"cluster == {int(cluster)} and split == '{split}'").select_columns(["messages", "target"])


def train_adapter(curated_path: str, cluster: int, label: str, base_source: str, out_dir: str,
                  options: LoraOptions, *, num_workers: int = 1, cpus_per_worker: int | None = None,
                  use_gpu: bool | None = None, on_step: Callable[[int, float], None] | None = None
                  ) -> TrainResult:
    """Train one cluster's LoRA adapter with Ray Train (Ray must be initialised by the caller).

    Args:
        curated_path: S2's `curated.parquet` (columns messages, target, split, cluster; see the conversion layout).
        cluster: S3 cluster id whose `split == "train"` rows are trained on (and `"val"` rows evaluated).
        label: the cluster's slug; names the adapter and checkpoint dirs.
        base_source: the base SLM, as a `ModelSpec.source` (`packaged:smollm2-135m`, a local dir, ...).
        out_dir: the convert dir; writes `checkpoints/<label>/` and `adapters/<label>/` under it.
        options: LoRA hyper-parameters.
        num_workers: Ray Train workers (data-parallel through DDP when > 1).
        cpus_per_worker: CPUs each worker reserves (and torch threads it runs); default: the cluster's free CPUs
            split between the workers (on a 2-core machine one worker with 1 CPU runs several times slower).
        use_gpu: one GPU per worker; default: when the cluster has GPUs.
        on_step: called on this (the driver's) process with (step, training loss) after each step. The worker's
            own output does not reach a console started with `log_to_driver=False` (the loop's, convert's), so a
            bar in the worker would never be seen: the steps come back through a Ray queue instead.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        raise SlmshiftError("train_adapter needs Ray: call ray.init() (or slmshift.platform.cluster.start_ray) first")
    if not Path(curated_path).exists():
        raise SlmshiftError(f"{curated_path}: curated data not found. Fix: run S2 (`slmshift convert`) first.")
    t_start = time.perf_counter()
    # The split coordinator would draw a Ray Data bar per epoch; the caller's step progress says more.
    data_ctx = ray.data.DataContext.get_current()
    bars, data_ctx.enable_progress_bars = data_ctx.enable_progress_bars, False
    try:
        return _fit(curated_path, cluster, label, base_source, out_dir, options, num_workers, cpus_per_worker,
                    use_gpu, on_step, t_start)
    finally:
        data_ctx.enable_progress_bars = bars


def _free_cpus(settle_s: float = 10.0) -> float:
    """Ray's free CPUs, waiting up to `settle_s` for them to reach the cluster's total. Inside `slmshift loop` a
    worker on a 2-core machine was given one thread (one CPU still counted as taken, most likely by the tasks that
    had just materialised its datasets) and trained at half speed."""
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    free = ray.available_resources().get("CPU", 0)
    deadline = time.monotonic() + settle_s
    while free < total and time.monotonic() < deadline:
        time.sleep(0.5)
        free = max(free, ray.available_resources().get("CPU", 0))
    return max(free, 1)


@contextmanager
def _relay_steps(on_step: Callable[[int, float], None] | None) -> Iterator[Any]:
    """A Ray queue the rank-0 worker puts (step, loss) on, drained into `on_step` by a driver thread; None when
    nobody listens. The queue's actor takes no CPU, so it never competes with the workers' reservation."""
    if on_step is None:
        yield None
        return
    from queue import Empty

    from ray.util.queue import Queue

    steps = Queue(maxsize=1000, actor_options={"num_cpus": 0})
    stop = threading.Event()

    def drain(block: bool) -> None:
        while True:
            try:
                item = steps.get(block=block, timeout=0.5) if block else steps.get_nowait()
            except Empty:
                return
            except Exception:  # the queue's actor is gone (Ray shutting down): no more progress to show
                stop.set()
                return
            on_step(*item)

    def relay() -> None:
        while not stop.is_set():
            drain(block=True)

    thread = threading.Thread(target=relay, name="lora-steps", daemon=True)
    thread.start()
    try:
        yield steps
    finally:
        stop.set()
        thread.join(timeout=5)
        drain(block=False)  # the last steps, put just before fit() returned
        steps.shutdown()


def _fit(curated_path: str, cluster: int, label: str, base_source: str, out_dir: str, options: LoraOptions,
         num_workers: int, cpus_per_worker: int | None, use_gpu: bool | None,
         on_step: Callable[[int, float], None] | None, t_start: float) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from slmshift.serve.sources import resolve_source

    resolve_source(base_source)  # fail fast, and convert a packaged model once here rather than in the worker
    train_ds = _read_split(curated_path, cluster, "train").materialize()
    val_ds = _read_split(curated_path, cluster, "val").materialize()
    n_train, n_val = train_ds.count(), val_ds.count()
    if n_train == 0:
        raise SlmshiftError(f"{curated_path}: cluster {cluster} ({label!r}) has no rows with split 'train'; "
                            "nothing to fine-tune on.")
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if cpus_per_worker is None:
        cpus_per_worker = max(1, int(_free_cpus() // num_workers))
    out = Path(out_dir).resolve()
    checkpoints, adapter_dir = out / "checkpoints", out / "adapters" / label
    shutil.rmtree(checkpoints / label, ignore_errors=True)  # a fresh run, not a resumption of an old one
    loop_config = {"options": options.model_dump(), "base_source": base_source, "label": label,
                   "threads": cpus_per_worker, "use_gpu": use_gpu, "n_val": n_val}
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    try:
        with _relay_steps(on_step) as steps:
            trainer = TorchTrainer(
                _train_loop_per_worker, train_loop_config={**loop_config, "steps_out": steps},
                scaling_config=scaling,
                run_config=RunConfig(name=label, storage_path=str(checkpoints),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2)),
                datasets={"train": train_ds, "val": val_ds}, dataset_config=DataConfig(datasets_to_split=["train"]))
            result = trainer.fit()
    except TrainingFailedError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise SlmshiftError(f"LoRA training of {label!r} failed: {lines[-1] if lines else type(e).__name__}") from e
    if result.checkpoint is None:
        raise SlmshiftError(f"LoRA training of {label!r} finished without a checkpoint under {checkpoints / label}")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    result.checkpoint.to_directory(str(adapter_dir))
    m = result.metrics
    return TrainResult(label=label, cluster=int(cluster), adapter_dir=str(adapter_dir),
                       checkpoint_dir=str(result.checkpoint.path), steps=int(m["step"]), n_train=n_train, n_val=n_val,
                       train_loss_first=m["train_loss_first"], train_loss_last=m["train_loss_last"],
                       val_loss_base=m.get("val_loss_base"), val_loss_adapter=m.get("val_loss_adapter"),
                       tokens=int(m["tokens"]),
                       tokens_per_s=float(m["tokens_per_s"]), wall_s=time.perf_counter() - t_start)
