"""S5 on Ray Train: each task cluster's LoRA run, resumable, and several clusters' runs at once.

`train_adapter` reads `curated.parquet` with Ray Data, keeps the cluster's train (and val) rows, materialises them
(a lazy dataset would be re-read and re-filtered every epoch) and runs `finetune.lora_loop` inside a Ray Train
`TorchTrainer` worker. Checkpoints (adapter, optimiser, schedule, step) land in
`<out_dir>/checkpoints/<label>-<key>/`, the final adapter in `<out_dir>/adapters/<label>/`.

Resuming. The run's name carries a key of everything that decides its result (rows, base, options), and Ray Train
restores a run of the same name from its latest checkpoint. So a worker or a node that dies mid-run restarts the
worker group from the checkpoint (`FailureConfig.max_failures`), and a convert killed and run again continues each
cluster where it stopped; a run on other rows or options starts afresh.

Several clusters. `train_adapters` starts as many clusters' runs as the alive nodes can place at once
(`concurrent_runs`), each from its own driver thread; each worker asks for the CPUs of one node. On a multi-node
cluster they train at the same time on different nodes; on one small machine they train one after another, and a
run started before it can be placed is not started at all (it would only poll). A run whose node is lost waits for
a free node (Train retries the placement, it does not fail).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from slmshift.platform.errors import SlmshiftError
from slmshift.train.finetune import (
    BUCKET_POOL, LoopState, LoraOptions, StepPlan, bucket_by_length, eval_loss, lora_loop, plan_steps, repeat_batches,
    setup_peft,
)
from slmshift.train.precision import resolved_precision

MAX_FAILURES = 3  # worker-group restarts from the latest checkpoint (an OOM-killed worker, a lost node)


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
    target_tokens: int = Field(default=0, description="Completion tokens the loss was on: what the run learns from.")
    target_tokens_per_s: float = Field(default=0.0, description="Completion tokens per second of training loop.")
    pad_share: float = Field(default=0.0, description="Share of batch positions that were padding.")
    wall_s: float = Field(description="Whole call: Ray Data read, Ray Train start-up, training, evaluation, save.")
    # where wall_s goes (the last attempt's, for a resumed run); the rest is checkpoints and the driver's own work
    start_s: float = Field(default=0.0, description="From the call to its worker's first line: Ray Data's read and "
                           "materialise, Ray Train's controller and worker start, and any wait for CPUs (clusters "
                           "started together on one small machine train in turn).")
    setup_s: float = Field(default=0.0, description="In the worker: model load, checkpoint restore, data shards.")
    train_s: float = Field(default=0.0, description="The training steps (batch fetch included).")
    val_loss_s: float = Field(default=0.0, description="The val loss, base and adapter, on `val_loss_rows` rows.")
    val_loss_rows: int = Field(default=0, description="Held-out rows the val loss was measured on.")
    resumed_from_step: int = Field(default=0, description="The checkpoint's step the last attempt started from "
                                   "(0: it ran from the start).")
    node_id: str = Field(default="", description="Ray node of the rank-0 worker that finished the run.")
    precision: str = Field(default="", description="The forward pass's compute precision (`lora.precision`, resolved "
                           "on the worker's device).")
    activation_checkpointing: bool | None = Field(default=None, description="Whether activations were recomputed "
                                                  "(`lora.activation_checkpointing`, resolved on the worker).")


@dataclass(frozen=True)
class AdapterJob:
    """One cluster to train: its S3 id, its slug (names the adapter), the base SLM's source and, when the caller
    planned them (`step_plan`), its steps."""

    cluster: int
    label: str
    base_source: str
    steps: int | None = None


def step_plan(base_source: str, messages: Any, targets: Any, options: LoraOptions) -> StepPlan:
    """`plan_steps` with the base model's tokenizer (rows are sized as they will be encoded)."""
    if options.steps != "auto":
        return StepPlan(int(options.steps), "fixed")
    from slmshift.serve.sources import load_tokenizer

    return plan_steps(load_tokenizer(base_source), messages, targets, options)


# --- the worker ---------------------------------------------------------------------------------------


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker; resumes from `ray.train.get_checkpoint()` when Train hands it one."""
    import ray.train
    import torch

    entered = time.time()  # wall clock, as the driver's `started` (one node's clock, or synced ones)
    options = LoraOptions.model_validate(config["options"])
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if config["use_gpu"] else "cpu"
    model, tokenizer, dev = setup_peft(config["base_source"], options, device)
    how = {"precision": resolved_precision(options.precision, dev),
           "activation_checkpointing": bool(model.get_base_model().is_activation_checkpointing)}
    state = LoopState()
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = LoopState.restore(model, d)
    resumed_from = state.step
    trained = model
    if world > 1:
        import ray.train.torch

        trained = ray.train.torch.prepare_model(model, move_to_device=False)
    # the val loss is a diagnostic beside S5's held-out grading: a sample of the rows says it, and the whole split
    # cost two forward passes over every held-out call per cluster
    val_rows = list(itertools.islice(ray.train.get_dataset_shard("val").iter_rows(), options.val_loss_rows)) \
        if config["n_val"] and options.val_loss_rows else []
    shard = ray.train.get_dataset_shard("train")
    pool = options.batch_size * (BUCKET_POOL if options.bucket_by_length else 1)

    def epoch_batches(epoch: int) -> Iterator[dict[str, Any]]:
        rows = shard.iter_batches(batch_size=pool, batch_format="numpy", local_shuffle_seed=options.seed + epoch,
                                  local_shuffle_buffer_size=max(pool, 64))
        return bucket_by_length(rows, tokenizer, options, options.seed + epoch) if options.bucket_by_length else rows

    batches = repeat_batches(epoch_batches)
    steps_out = config.get("steps_out") if rank == 0 else None
    node = ray.get_runtime_context().get_node_id()

    phases = {"start_s": entered - config["started"], "setup_s": time.time() - entered}

    def metrics(step: int, loss: float, stats: dict[str, float]) -> dict[str, Any]:
        return {"step": step, "loss": loss, "resumed_from_step": resumed_from, "node_id": node, **how, **phases,
                **stats}

    def on_step(step: int, loss: float, stats: dict[str, float]) -> None:
        if steps_out is not None:
            try:
                steps_out.put_nowait((step, loss))
            except Exception:  # progress is a courtesy: a lost update must never stop training
                pass
        if step % options.report_every == 0 and step % options.checkpoint_every and step != options.steps:
            ray.train.report(metrics(step, loss, stats))

    def checkpoint(step: int, opt: Any, sched: Any) -> None:
        m = metrics(step, state.losses[-1], state.stats())
        if step == options.steps:
            tail = state.losses[-max(1, len(state.losses) // 10):]  # as lora_loop's own summary
            t = time.perf_counter()
            m.update(val_loss_base=eval_loss(model, tokenizer, val_rows, options, dev, base=True),
                     val_loss_adapter=eval_loss(model, tokenizer, val_rows, options, dev),
                     train_loss_first=state.losses[0], train_loss_last=sum(tail) / len(tail),
                     val_loss_rows=len(val_rows))
            m["val_loss_s"] = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                model.save_pretrained(tmp)
                state.save(tmp, opt, sched)
            ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    lora_loop(trained, tokenizer, batches, options, dev, on_step, state=state, checkpoint=checkpoint)


# --- one cluster --------------------------------------------------------------------------------------


def _read_split(curated_path: str, cluster: int, split: str) -> Any:
    import ray.data

    columns = ["messages", "target", "cluster", "split"]
    ds = ray.data.read_parquet(curated_path, columns=columns)
    return ds.filter(expr=f"cluster == {int(cluster)} and split == '{split}'").select_columns(["messages", "target"])


def run_key(train_ds: Any, val_ds: Any, base_source: str, options: LoraOptions, num_workers: int) -> str:
    """What decides a run's result: a checkpoint resumes only a run with the same rows, base and options."""
    h = hashlib.sha256(json.dumps([base_source, options.model_dump(), num_workers], sort_keys=True).encode())
    for ds in (train_ds, val_ds):
        for row in ds.iter_rows():
            h.update(str(row["messages"]).encode() + b"\0" + str(row["target"]).encode() + b"\1")
        h.update(b"\2")
    return h.hexdigest()[:12]


def node_cpus(settle_s: float = 10.0) -> int:
    """CPUs for one run's worker: a whole node (the largest alive one), or the cluster's free CPUs if fewer. The
    free count can lag just after Ray Data materialised the rows (seen in `slmshift loop`: one of two cores still
    counted taken, and the worker trained at half speed), so wait up to `settle_s` for it to reach the total."""
    import ray

    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    total = ray.cluster_resources().get("CPU", 1)
    free = ray.available_resources().get("CPU", 0)
    deadline = time.monotonic() + settle_s
    while free < min(total, largest) and time.monotonic() < deadline:
        time.sleep(0.5)
        free = max(free, ray.available_resources().get("CPU", 0))
    return max(1, int(min(largest, free)))


def concurrent_runs(cpus_per_worker: int, num_workers: int = 1) -> int:
    """How many runs of `num_workers` workers the alive nodes can hold at once, by CPUs (and GPUs where there are):
    a run started beyond that only waits, and on a 2-core machine 11 waiting runs (a controller, a queue and a
    placement-group actor each, polling) left the one training at a third of its speed and took 4 GB (BENCHMARKS.md
    2026-12-06 night). Counted from the nodes alive now: an autoscaler's future nodes are not waited for."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    slots = sum(int(r.get("CPU", 0) // cpus_per_worker) for r in nodes)
    if any(r.get("GPU", 0) >= 1 for r in nodes):
        slots = min(slots, sum(int(r.get("GPU", 0)) for r in nodes))
    return max(1, slots // num_workers)


@contextmanager
def _relay_steps(on_step: Callable[[int, float], None] | None) -> Iterator[Any]:
    """A Ray queue the rank-0 worker puts (step, loss) on, drained into `on_step` by a driver thread; None when
    nobody listens. The queue's actor takes no CPU, so it never competes with the workers' reservation, and lives on
    the driver's node: on a worker node, losing that node silenced another cluster's progress (seen in the
    multi-node test)."""
    if on_step is None:
        yield None
        return
    from queue import Empty

    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    steps = Queue(maxsize=1000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
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
        if ray.is_initialized():  # after Ctrl-C the caller's Ray is gone: a call here would start a new one
            drain(block=False)  # the last steps, put just before fit() returned
            steps.shutdown()


def train_adapter(curated_path: str, cluster: int, label: str, base_source: str, out_dir: str,
                  options: LoraOptions, *, num_workers: int = 1, cpus_per_worker: int | None = None,
                  use_gpu: bool | None = None, on_step: Callable[[int, float], None] | None = None
                  ) -> TrainResult:
    """Train (or resume) one cluster's LoRA adapter with Ray Train (Ray must be initialised by the caller).

    Args:
        curated_path: S2's `curated.parquet` (columns messages, target, split, cluster; see the conversion layout).
        cluster: S3 cluster id whose `split == "train"` rows are trained on (and `"val"` rows evaluated).
        label: the cluster's slug; names the adapter and checkpoint dirs.
        base_source: the base SLM, as a `ModelSpec.source` (`packaged:smollm2-135m`, a local dir, ...).
        out_dir: the convert dir; writes `checkpoints/<label>-<key>/` and `adapters/<label>/` under it.
        options: LoRA hyper-parameters.
        num_workers: Ray Train workers (data-parallel through DDP when > 1).
        cpus_per_worker: CPUs each worker reserves (and torch threads it runs); default: one node's CPUs
            (`node_cpus`) split between the workers.
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
    started = time.time()
    # The split coordinator would draw a Ray Data bar per epoch; the caller's step progress says more.
    data_ctx = ray.data.DataContext.get_current()
    bars, data_ctx.enable_progress_bars = data_ctx.enable_progress_bars, False
    try:
        return _fit(curated_path, cluster, label, base_source, out_dir, options, num_workers, cpus_per_worker,
                    use_gpu, on_step, t_start, started)
    finally:
        data_ctx.enable_progress_bars = bars


def _fit(curated_path: str, cluster: int, label: str, base_source: str, out_dir: str, options: LoraOptions,
         num_workers: int, cpus_per_worker: int | None, use_gpu: bool | None,
         on_step: Callable[[int, float], None] | None, t_start: float, started: float) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from slmshift.serve.sources import resolve_source

    resolve_source(base_source)  # fail fast, and convert a packaged model once here rather than in the worker
    train_ds = _read_split(curated_path, cluster, "train").materialize()
    val_ds = _read_split(curated_path, cluster, "val").materialize()
    n_train, n_val = train_ds.count(), val_ds.count()
    if n_train == 0:
        raise SlmshiftError(f"{curated_path}: cluster {cluster} ({label!r}) has no rows with split 'train'; "
                            "nothing to fine-tune on.")
    if options.steps == "auto":  # a caller that did not plan (train_adapters' callers do, to show the steps first)
        rows = train_ds.take_all()
        plan = step_plan(base_source, [r["messages"] for r in rows], [r["target"] for r in rows], options)
        options = options.model_copy(update={"steps": plan.steps})
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if cpus_per_worker is None:
        cpus_per_worker = max(1, node_cpus() // num_workers)
    out = Path(out_dir).resolve()
    checkpoints, adapter_dir = out / "checkpoints", out / "adapters" / label
    name = f"{label}-{run_key(train_ds, val_ds, base_source, options, num_workers)}"
    for stale in checkpoints.glob(f"{label}-*"):  # this cluster's runs on other rows or options: never resumed
        if stale.name != name and stale.name[len(label) + 1:].isalnum():
            shutil.rmtree(stale, ignore_errors=True)
    loop_config = {"options": options.model_dump(), "base_source": base_source, "label": label,
                   "threads": cpus_per_worker, "use_gpu": use_gpu, "n_val": n_val, "started": started}
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})})
    try:
        with _relay_steps(on_step) as steps:
            trainer = TorchTrainer(
                _train_loop_per_worker, train_loop_config={**loop_config, "steps_out": steps},
                scaling_config=scaling,
                run_config=RunConfig(name=name, storage_path=str(checkpoints),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2),
                                     failure_config=FailureConfig(max_failures=MAX_FAILURES)),
                datasets={"train": train_ds, "val": val_ds}, dataset_config=DataConfig(datasets_to_split=["train"]))
            result = trainer.fit()
    except TrainingFailedError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise SlmshiftError(f"LoRA training of {label!r} failed: {lines[-1] if lines else type(e).__name__}") from e
    if result.checkpoint is None:
        raise SlmshiftError(f"LoRA training of {label!r} finished without a checkpoint under {checkpoints / name}")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    result.checkpoint.to_directory(str(adapter_dir))
    (adapter_dir / "trainer_state.pt").unlink(missing_ok=True)  # the adapter dir holds the adapter only
    m = result.metrics
    return TrainResult(label=label, cluster=int(cluster), adapter_dir=str(adapter_dir),
                       checkpoint_dir=str(result.checkpoint.path), steps=int(m["step"]), n_train=n_train, n_val=n_val,
                       train_loss_first=m["train_loss_first"], train_loss_last=m["train_loss_last"],
                       val_loss_base=m.get("val_loss_base"), val_loss_adapter=m.get("val_loss_adapter"),
                       tokens=int(m["tokens"]), tokens_per_s=float(m["tokens_per_s"]),
                       target_tokens=int(m["target_tokens"]), target_tokens_per_s=float(m["target_tokens_per_s"]),
                       pad_share=float(m["pad_share"]),
                       wall_s=time.perf_counter() - t_start, train_s=float(m.get("train_s", 0.0)),
                       start_s=float(m.get("start_s", 0.0)), setup_s=float(m.get("setup_s", 0.0)),
                       val_loss_s=float(m.get("val_loss_s", 0.0)), val_loss_rows=int(m.get("val_loss_rows", 0)),
                       resumed_from_step=int(m.get("resumed_from_step", 0)),
                       node_id=str(m.get("node_id", "")), precision=str(m.get("precision", "")),
                       activation_checkpointing=m.get("activation_checkpointing"))


# --- several clusters ---------------------------------------------------------------------------------


def train_adapters(curated_path: str, jobs: list[AdapterJob], out_dir: str, options: LoraOptions, *,
                   num_workers: int = 1, cpus_per_worker: int | None = None,
                   on_step: Callable[[str], Callable[[int, float], None] | None] = lambda label: None,
                   ) -> Iterator[tuple[AdapterJob, TrainResult | SlmshiftError]]:
    """Run the jobs, as many at once as the cluster's nodes can place (`concurrent_runs`), and yield (job, result
    or error) as each finishes. A failed cluster is yielded as its error, never stops the others. `on_step(label)`
    gives that cluster's step callback."""
    from concurrent.futures import as_completed

    if not jobs:
        return
    cpus = cpus_per_worker or max(1, node_cpus() // num_workers)  # measured once, before any run takes a node
    pool = ThreadPoolExecutor(max_workers=min(len(jobs), concurrent_runs(cpus, num_workers)),
                              thread_name_prefix="lora")
    try:
        futures = {pool.submit(train_adapter, curated_path, j.cluster, j.label, j.base_source, out_dir,
                               options if j.steps is None else options.model_copy(update={"steps": j.steps}),
                               num_workers=num_workers, cpus_per_worker=cpus, on_step=on_step(j.label)): j
                   for j in jobs}
        for fut in as_completed(futures):
            try:
                yield futures[fut], fut.result()
            except SlmshiftError as e:
                yield futures[fut], e
    except BaseException:
        # Ctrl-C, or the caller stopped early: no waiting cluster starts, and nothing waits for the running ones,
        # which end with the caller's Ray (their checkpoints resume them). A `with` block would have waited for
        # every cluster to finish training first (seen: a SIGINT during S5 went on training for minutes).
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
