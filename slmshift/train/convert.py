"""`slmshift convert RUN_DIR`: the conversion pipeline S2 -> S5 over one run's interaction log.

S2 curate (rule, scrub, dedup), S3 cluster (embeddings + faiss k-means), split by task/episode stratified by
cluster, S4 select an SLM per cluster zero-shot, S5 fine-tune a LoRA adapter per cluster on Ray Train
(C2's `train_adapter`), evaluate base vs adapter on the held-out calls, register every adapter and promote
the ones that win. Writes the conversion layout under `RUN_DIR/convert/` (see docs of `convert`). RUN_DIR and the
output may be storage URIs (`platform/storage.py`): the output is then built in a local mirror and uploaded after
each step.

Promotion (`train/promotion.py`): an adapter is promoted when the 95% bootstrap interval of its held-out accuracy
gain over the base (and over the adapter in force) lies above zero, resampling held-out tasks. The report, its data
and how it is shown, is `train/convert_report.py`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.errors import SlmshiftError
from slmshift.train.cluster import (ClusterIndex, ClusterOptions, cluster_tasks, embed_texts, incumbent_tasks,
                                    label_clusters, prompt_text)
from slmshift.train.curate import CurateOptions, curate, split_by_group
from slmshift.train.convert_report import ConvertReport, write_report
from slmshift.train.finetune import LoraOptions
from slmshift.train.promotion import challenge, no_room, paired_interval, promotion, task_groups

__all__ = ["ConvertOptions", "convert"]


_API_ENV = "RAY_API_SERVER_ADDRESS"


def _default_lora() -> LoraOptions:
    # Quickstart prompts run to ~550 tokens (+ ~90 target) with SmolLM2's tokenizer: 768 keeps them whole,
    # so the adapter trains on the same prompt the engine serves. Steps: auto (a quickstart cluster's 12 train rows
    # get the floor of 20 steps of 8, ~13 passes, ~8 min per cluster with SmolLM2-135M on 2 cores).
    return LoraOptions(max_length=768)


class ConvertOptions(BaseModel):
    """Everything `slmshift convert` can be told; CLI flags set the common ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    curate: CurateOptions = Field(default_factory=CurateOptions)
    cluster: ClusterOptions = Field(default_factory=ClusterOptions)
    candidates: list[str] = Field(default=["smollm2-135m"], min_length=1, description=(
        "SLM candidates (registered names, or model sources) measured zero-shot per cluster; each cluster gets its "
        "own choice (select.RULE)."))
    licenses: list[str] | None = Field(default=None, description=(
        "S4's licence gate: only candidates under one of these licences are measured (e.g. ['Apache-2.0'] leaves "
        "out Gemma-3-270M, under the Gemma Terms of Use); None: any."))
    max_memory_mb: float | None = Field(default=None, gt=0, description=(
        "S4's footprint gate: only candidates whose served weights fit in this many MB are measured; None: any."))
    lora: LoraOptions = Field(default_factory=_default_lora)
    min_train_rows: int = Field(default=4, ge=1, description="A cluster needs this many train rows to get an adapter.")
    min_val_rows: int = Field(default=1, ge=1, description="...and this many validation rows to be judged.")
    max_clusters: int | None = Field(default=None, ge=1, description="Train at most this many clusters, the largest "
                                      "first (the rest are reported as not tuned); None: every eligible cluster.")
    # Why 10: below ~10 clusters a percentile cluster bootstrap under-covers (its resamples take few distinct values,
    # and one task moves accuracy by over 10 points), while the shipped profiles still qualify: the small profile's
    # planner-intent cluster holds out ~37 tasks (one intent call an episode: 37 held-out calls in BENCHMARKS.md),
    # paper-table's largest clusters 40+ (a multi-turn-only cluster, ~10 tasks of ~17 calls, is at the edge).
    min_promotion_tasks: int = Field(default=10, ge=1, description="Distinct held-out tasks an adapter needs before "
                                     "its accuracy gain can promote it (the task-bootstrap interval must exclude zero; "
                                     "below ~10 tasks a cluster bootstrap's interval is too unreliable to act on).")
    incumbent: str | None = Field(default=None, description=(
        "The adapter registry in force (an earlier iteration's): where one of its promoted adapters serves a task "
        "this convert trains, the new adapter is promoted only if it also beats that one, paired by task on the "
        "same held-out calls (the rule that promotes over the base)."))
    train_also: list[str] = Field(default_factory=list, description=(
        "Earlier runs (a flywheel's earlier turns) whose calls are training rows only: curated and clustered with "
        "RUN_DIR's, never held out, and dropped for any task RUN_DIR holds out, so no held-out call's task was trained "
        "on. S4's reused answers and every held-out call come from RUN_DIR alone."))
    constrain: bool = Field(default=True, description="Held-out grading (S4, S5) holds each call to its output "
                            "constraint, as the SLM tier is served under a router arm's `constrain: slm` (the default); "
                            "off for a router that serves the SLM free (`constrain: none`).")
    reuse_collected: bool = Field(default=True, description="S4 takes a candidate's own graded answers from collect "
                                  "(shadows, cascade attempts) for the held-out calls they cover and generates only the "
                                  "rest; off: generate every one (the older, slower way, kept for bench/convert_cost.py).")
    eval_scheduler: Literal["continuous", "static"] = Field(default="continuous", description="The hf scheduler that "
                                                             "grades held-out calls: continuous (all submitted at once, "
                                                             "rows refilled as they finish) or static (batches of "
                                                             "eval_batch_size, each waiting for its slowest row: the "
                                                             "older way, for comparison).")
    eval_batch_size: int = Field(default=16, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1, description=(
        "Optional cap on a held-out call's generation budget, for a quicker but less faithful check; None: each call "
        "gets the budget it was served with (evaluate.served_max_tokens)."))
    threads: int | None = Field(default=None, ge=1, description="torch threads for evaluation (default: all cores).")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers per adapter.")
    cpus_per_worker: int | None = Field(default=None, ge=1, description="Default: Ray's free CPUs / workers.")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the embedded Ray cluster (default: all).")
    progress: bool = Field(default=True, description="Progress bars for embedding, clustering, evaluation, training.")
    verbose: bool = Field(default=False, description="Show Ray Train / Ray Data workers' own output on the console "
                          "(default: it stays in Ray's session log files).")


def _progress(enabled: bool, console: Any):
    from contextlib import nullcontext

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        return nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _lora_steps(prog: Any, console: Any, label: str, steps: int) -> Callable[[int, float], None]:
    """One cluster's LoRA steps as a bar of the shared `prog`, or (on a bar-less console: the loop's) as a line at
    every tenth of the steps. Several clusters train at once, so they share one live display."""
    t0 = time.perf_counter()
    if prog is None:
        every = max(1, steps // 10)

        def say(step: int, loss: float) -> None:
            if step % every == 0 or step == steps:
                console.print(f"S5 LoRA {label!r}: step {step}/{steps}, loss {loss:.3f} "
                              f"({time.perf_counter() - t0:.0f} s)")

        return say
    task = prog.add_task(f"LoRA {label}", total=steps)
    return lambda step, loss: prog.update(task, completed=step, description=f"LoRA {label} (loss {loss:.3f})")


def _read_log(run_dir: str) -> pd.DataFrame:
    from slmshift.platform.log import read_interactions

    p = Path(run_dir)
    if "://" not in run_dir and not p.is_dir():
        raise SlmshiftError(f"{run_dir}: no such run directory. Fix: pass a directory printed by `slmshift run` "
                            "(e.g. runs/quickstart-YYYYMMDD-HHMMSS).")
    try:
        df = read_interactions(run_dir, include_shadow=True)  # shadows too: S4 reuses them (`collected_answers`)
    except SlmshiftError:
        raise
    except Exception as e:  # unreadable Parquet, wrong schema
        raise SlmshiftError(f"{run_dir}/interactions: cannot read the interaction log ({type(e).__name__}: "
                            f"{str(e)[:200]}). Fix: pass a run directory written by `slmshift run`.") from None
    if df.empty:
        raise SlmshiftError(f"{run_dir}: no interaction log found (interactions/ is missing or empty). Fix: pass a run "
                            "directory printed by `slmshift run`, after the run has logged some calls.")
    return df


def _resolve_candidates(names: list[str]):
    from slmshift.train.candidates import candidate_for_source

    return [candidate_for_source(n) for n in names]


def convert(run_dir: str, out_dir: str | None = None, options: ConvertOptions | None = None, *,
            console: Any = None) -> ConvertReport:
    """Run S2 -> S5 on `run_dir`'s log and write the conversion layout to `out_dir` (default RUN_DIR/convert).

    Starts an embedded Ray (and stops it) unless Ray is already initialised. Raises SlmshiftError for a bad
    run directory or an empty curated set.
    """
    from rich.console import Console

    o = options or ConvertOptions()
    console = console or Console()
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()
    from slmshift.platform.storage import check, is_uri, join, mirror_dir, normalize, upload

    run_dir = check(str(run_dir), "RUN_DIR", write=False)
    from slmshift.train.registry import AdapterRegistry

    in_force = AdapterRegistry.load(o.incumbent) if o.incumbent else None  # fail before S2-S4's minutes, not after
    out_uri = normalize(out_dir, "--out") if out_dir else join(run_dir, "convert")
    out = Path(out_uri)
    if is_uri(out_uri):
        check(out_uri, "--out" if out_dir else "RUN_DIR (its convert/ dir; or pass --out)")
        out = mirror_dir(out_uri)
        console.print(f"output: {out_uri} (built in {out}, uploaded after each step)", soft_wrap=True)

    def sync() -> None:
        if is_uri(out_uri):
            upload(out, out_uri)

    log = _read_log(run_dir)  # read once: S2 curates the episodes' own calls, S4 reuses the shadows as well
    earlier = [_read_log(check(str(r), "--train-also", write=False)) for r in o.train_also]
    earlier_ids: set[str] = set()
    for r, e in zip(o.train_also, earlier):
        ids = set(e["id"])
        earlier_ids |= ids
        if ids & set(log["id"]):
            raise SlmshiftError(f"--train-also {r}: holds calls of RUN_DIR {run_dir} itself, whose calls are held out. "
                                "Fix: name only earlier runs (a flywheel's earlier turns).")
    cands = _resolve_candidates(o.candidates)

    # S2 --------------------------------------------------------------------------------------------
    # RUN_DIR's calls first: a near-duplicate keeps the first, so an earlier turn's copy never displaces a new call
    calls = pd.concat([log, *earlier], ignore_index=True) if earlier else log
    cur = curate(calls[~calls["shadow"].astype(bool)].reset_index(drop=True), o.curate)
    rows = cur.rows
    timings["curate_s"] = time.perf_counter() - t
    if rows.empty:
        c = cur.counts
        raise SlmshiftError(
            f"{run_dir}: the curated set is empty: of {c['logged']} logged calls, {c['dropped_invalid']} had invalid "
            f"output and {c['dropped_by_rule']} failed the keep rule {o.curate.rule!r}. Fix: run more episodes, use a "
            "stronger teacher, or loosen the rule (e.g. --rule valid).")
    from_earlier = rows["record_id"].isin(earlier_ids)
    console.print(f"S2 curate: kept {len(rows)} of {cur.counts['logged']} calls"
                  + (f" ({int(from_earlier.sum())} from {len(earlier)} earlier run(s), training only)"
                     if earlier else "")
                  + f"; scrubbed {sum(cur.scrub_counts.values())} secrets/PII")
    from slmshift.train.evaluate import grader_for_run, served_max_tokens

    grader = grader_for_run(run_dir)  # the run's scenarios: they grade held-out calls and know each kind's budget
    rows["max_tokens"] = served_max_tokens(rows, grader.scenarios)  # what each call is generated with in S4/S5

    # S3 --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    with _progress(o.progress, console) as prog:
        x = embed_texts([prompt_text(m) for m in rows["messages"]], progress=prog)
        # a sub-task must stay trainable: min_train_rows once its held-out share is set aside
        min_size = max(o.cluster.min_size, math.ceil(o.min_train_rows / (1 - o.curate.val_fraction)))
        keys = list(zip(rows["role"], rows["call_kind"], rows["expect"]))
        task_of = incumbent_tasks(x, rows["call_kind"].tolist(), in_force) if in_force else [None] * len(rows)
        keys = [k + (f"task of {t}",) if t else k for k, t in zip(keys, task_of)]
        clus = cluster_tasks(x, keys, o.cluster.model_copy(update={"min_size": min_size}), progress=prog,
                             whole=frozenset(k for k, t in zip(keys, task_of) if t))
    rows["cluster"] = clus.labels
    info = label_clusters(clus.labels, rows["role"].tolist(), rows["call_kind"].tolist())
    for c in info:  # the adapter in force whose task S3 kept: it is this cluster's incumbent in S5
        kept = {t for t, lab in zip(task_of, clus.labels) if lab == c["id"]}
        if len(kept) == 1 and None not in kept:
            c["task_of"] = kept.pop()
    from slmshift.train.select import answered_calls, collected_answers

    # collect's graded SLM answers stand for the held-out calls they cover (S4), so the tasks they answer are held out
    # first: S4 then generates fewer answers (`split_by_group`'s `prefer` says why the sample stays random)
    answers = collected_answers(log, run_dir) if o.reuse_collected else None
    answered = rows["record_id"].astype(str).isin(answered_calls(answers, cands))
    rows["split"] = "train"
    rows.loc[~from_earlier, "split"] = split_by_group(rows[~from_earlier], o.curate.val_fraction, o.curate.seed,
                                                      by=o.curate.split_by, min_val=o.min_promotion_tasks,
                                                      prefer=answered[~from_earlier])
    if from_earlier.any():  # an earlier turn's rows of a task held out now would train on what S5 judges
        held = set(rows.loc[rows["split"] == "val", "task_id"]) - {""}
        leak = from_earlier & rows["task_id"].isin(held)
        rows = rows[~leak].reset_index(drop=True)
        console.print(f"S2 curate: {int(from_earlier.sum() - leak.sum())} earlier rows train; {int(leak.sum())} "
                      "dropped (their task is held out in this run)")
    out.mkdir(parents=True, exist_ok=True)
    ClusterIndex(clus.centroids, info).save(out / "clusters")
    curated_path = out / "curated.parquet"
    rows.to_parquet(curated_path, index=False)
    sync()
    timings["cluster_s"] = time.perf_counter() - t
    console.print(f"S3 cluster: {clus.criterion}; " + ", ".join(f"{c['label']} ({c['size']})" for c in info))

    # S4 --------------------------------------------------------------------------------------------
    from slmshift.train.select import RULE, select_clusters

    t = time.perf_counter()
    threads = o.threads or os.cpu_count() or 1
    per_cluster: list[dict[str, Any]] = []
    vals: dict[int, pd.DataFrame] = {}
    for c in info:
        mine = rows[rows["cluster"] == c["id"]]
        val, n_train = mine[mine["split"] == "val"], int((mine["split"] == "train").sum())
        per_cluster.append({**c, "n_train": n_train, "n_val": len(val), "chosen": None, "before": None,
                            "after": None, "adapter_dir": None, "promoted": False, "status": ""})
        if len(val) >= o.min_val_rows:
            vals[c["id"]] = val
        else:
            per_cluster[-1]["status"] = f"not tuned: {len(val)} validation rows (needs {o.min_val_rows})"
    engines: dict[str, Any] = {}
    with _progress(o.progress, console) as prog:  # every cluster's held-out calls in one pass per candidate
        selections = select_clusters(vals, cands, grader, engines=engines, threads=threads,
                                     batch_size=o.eval_batch_size, max_new_tokens=o.max_new_tokens, progress=prog,
                                     answers=answers, constrained=o.constrain, licenses=o.licenses,
                                     max_memory_mb=o.max_memory_mb, scheduler=o.eval_scheduler)
    for entry in per_cluster:
        if entry["id"] not in selections:
            continue
        sel, val = selections[entry["id"]], vals[entry["id"]]
        from_collect = sum(v.get("source") == "collect" for v in sel.before.verdicts)
        groups, _, _ = task_groups(sel.before.verdicts)
        _, low, high = paired_interval([False] * len(val), [bool(v["correct"]) for v in sel.before.verdicts],
                                       groups, seed=o.lora.seed)  # the accuracy itself, tasks resampled
        entry.update(chosen=sel.chosen.name, chosen_source=sel.chosen.source, selection=sel.table,
                     excluded=sel.excluded, before=sel.before.summary(), before_verdicts=sel.before.verdicts,
                     before_interval={"low": low, "high": high, "n": len(set(groups))},
                     before_source={"collect": from_collect, "generated": len(val) - from_collect})
        console.print(f"S4 select: cluster {entry['id']} {entry['label']!r}: {sel.chosen.name} zero-shot "
                      f"{sel.before.correct_rate:.2f} [{low:.2f}, {high:.2f}] held-out {sel.before.measure} on "
                      f"{len(set(groups))} tasks / {len(val)} calls ({from_collect} answered in collect, "
                      f"{len(val) - from_collect} generated)")
    if selections:
        console.print(f"S4 select: {len(selections)} cluster(s), "
                      f"{sum(e['before_source']['generated'] for e in per_cluster if e['id'] in selections)} held-out "
                      f"call(s) generated in one pass per candidate, {time.perf_counter() - t:.0f} s")
    engines.clear()  # free the zero-shot models before training
    timings["select_s"] = time.perf_counter() - t

    # S5 --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    registry_path = None
    todo = []
    for e in per_cluster:
        if e["id"] not in selections:
            continue
        if e["n_train"] < o.min_train_rows:
            e["status"] = f"not tuned: {e['n_train']} train rows (needs {o.min_train_rows})"
        elif why := no_room(selections[e["id"]].before):
            e["status"] = f"not tuned: {why}"
            console.print(f"S5 skip: {e['label']!r}: {why}")
        else:
            todo.append(e)
    if o.max_clusters is not None and len(todo) > o.max_clusters:
        todo = sorted(todo, key=lambda e: -e["n_train"])
        for e in todo[o.max_clusters:]:
            e["status"] = f"not tuned: max_clusters={o.max_clusters} (larger clusters went first)"
        todo = todo[:o.max_clusters]
    if todo:
        registry_path = _train_and_register(todo, selections, rows, curated_path, out, o, grader, threads, console,
                                            sync)
    timings["train_eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    report = ConvertReport(
        run_dir=run_dir, out_dir=str(out_uri), local_dir=str(out) if is_uri(out_uri) else "", counts=cur.counts, scrub_counts=cur.scrub_counts,
        clustering={"k": clus.k, "criterion": clus.criterion, "silhouette": clus.scores},
        clusters=per_cluster, grading=grader.method, timings={k: round(v, 2) for k, v in timings.items()},
        registry=registry_path, selection_rule=RULE, options=o.model_dump(mode="json"))
    write_report(report, out)
    sync()
    return report


def _train_and_register(todo: list[dict[str, Any]], selections: dict, rows: pd.DataFrame, curated_path: Path,
                        out: Path, o: ConvertOptions, grader: Any, threads: int, console: Any,
                        sync: Any = lambda: None) -> str:
    from slmshift.platform.cluster import start_ray
    from slmshift.platform.config import RaySection
    from slmshift.platform.artifacts import AdapterEntry, AdapterMetrics
    from slmshift.train.lora_run import AdapterJob, step_plan, train_adapters
    from slmshift.train.registry import AdapterRegistry, same_task_adapters

    import ray

    started = not ray.is_initialized()
    saved_api = os.environ.get(_API_ENV)
    if started:
        # Ray Train's PlacementGroupCleaner asks the state API, with no address, whether the controller lives. On a
        # host running several Ray clusters it can reach another cluster's dashboard, hear "not found", and remove
        # our live placement group (seen here: an adapter's training killed at step 18 of 60). Our embedded cluster
        # has no dashboard, so its processes (which inherit this env) get an address where nothing answers: the
        # cleaner then just keeps waiting, and the run is never torn down by mistake.
        os.environ.setdefault(_API_ENV, "http://127.0.0.1:9")
        start_ray(RaySection(num_cpus=o.num_cpus, dashboard=False), log_to_driver=o.verbose)
    if not o.verbose:  # also when a caller (the loop) started Ray: its plans and per-dataset lines are noise here
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # our own bar reports the training steps
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we did that
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    registry = AdapterRegistry.create(out / "registry.json", out / "clusters")
    in_force = AdapterRegistry.load(o.incumbent) if o.incumbent else None
    incumbents = same_task_adapters(in_force, out / "clusters") if in_force else {}
    by_label = {e["label"]: e for e in todo}
    jobs = []
    for e in todo:
        sel, train = selections[e["id"]], rows[(rows["cluster"] == e["id"]) & (rows["split"] == "train")]
        plan = step_plan(sel.chosen.source, train["messages"], train["target"], o.lora)
        e["lora_steps"] = {"steps": plan.steps, "why": plan.why}
        jobs.append(AdapterJob(e["id"], e["label"], sel.chosen.source, plan.steps))
        console.print(f"S5 fine-tune: cluster {e['id']} {e['label']!r} on {sel.chosen.name} "
                      f"({e['n_train']} train / {e['n_val']} val rows, {plan.steps} steps"
                      f"{'' if plan.why == 'fixed' else ': ' + plan.why})")
    try:
        with _progress(o.progress, console) as prog:
            # every cluster's run starts at once; Ray places them (in turn on one small machine)
            runs = train_adapters(str(curated_path), jobs, str(out), o.lora, num_workers=o.num_workers,
                                  cpus_per_worker=o.cpus_per_worker,
                                  on_step=lambda label: _lora_steps(prog, console, label,
                                                                    by_label[label]["lora_steps"]["steps"]))
            done = []
            for job, tr in runs:
                e, sel = by_label[job.label], selections[job.cluster]
                if isinstance(tr, SlmshiftError):  # one cluster's failure never costs the others their adapters
                    console.print(f"S5 result: {job.label!r} not tuned: {tr}")
                    e.update(status=f"not tuned: {tr}")
                    continue
                if tr.resumed_from_step:
                    console.print(f"S5 LoRA {job.label!r}: resumed from its step-{tr.resumed_from_step} checkpoint")
                console.print(f"S5 LoRA {job.label!r}: {tr.steps} steps in {tr.wall_s:.0f} s, {tr.precision}"
                              f"{', activations recomputed' if tr.activation_checkpointing else ''} (start-up, waiting "
                              f"for CPUs included, {tr.start_s:.0f} s, worker set-up {tr.setup_s:.0f} s, steps "
                              f"{tr.train_s:.0f} s at {tr.target_tokens_per_s:.0f} completion tok/s, val loss "
                              f"{tr.val_loss_s:.0f} s on {tr.val_loss_rows} rows)")
                done.append((e, sel, tr))
            graded = _grade_adapters(done, rows, incumbents, in_force, o, grader, threads, prog)
            for e, sel, tr in done:
                after = graded[(e["id"], "new")]
                promoted, reason, interval = promotion(sel.before, after, o.min_promotion_tasks, o.lora.seed)
                if (e["id"], "in force") in graded:
                    inc = incumbents[e["id"]]
                    promoted, reason, e["incumbent"] = challenge(promoted, reason, inc.label,
                                                                 graded[(e["id"], "in force")], after,
                                                                 o.min_promotion_tasks, o.lora.seed)
                console.print(f"S5 result: {e['label']!r} {'promoted' if promoted else 'not promoted'}: {reason}")
                e.update(after=after.summary(), after_verdicts=after.verdicts, adapter_dir=tr.adapter_dir,
                         promoted=promoted, status=reason, train=tr.model_dump(), interval=interval)
                registry.add(AdapterEntry(
                    cluster=e["id"], label=e["label"], role=e["role"], call_kind=e["call_kind"],
                    base_model=sel.chosen.source, adapter_dir=tr.adapter_dir, promoted=promoted, reason=reason,
                    metrics=AdapterMetrics(val_accuracy_before=sel.before.correct_rate,
                                           val_accuracy_after=after.correct_rate, val_loss_before=tr.val_loss_base,
                                           val_loss_after=tr.val_loss_adapter, n_train=tr.n_train, n_val=tr.n_val,
                                           val_valid_before=sel.before.valid_rate, val_valid_after=after.valid_rate,
                                           accuracy_diff_interval=interval)))
                registry.save()  # after each cluster: an interrupted convert keeps what finished
                sync()
    finally:
        if started:
            ray.shutdown()
            if saved_api is None:
                os.environ.pop(_API_ENV, None)
    return str(registry.save())


def _grade_adapters(done: list[tuple[dict, Any, Any]], rows: pd.DataFrame, incumbents: dict, in_force: Any,
                    o: "ConvertOptions", grader: Any, threads: int, prog: Any) -> dict[tuple[int, str], Any]:
    """Every new adapter, and the adapter in force for its task, on its cluster's held-out calls: one engine per
    base model with all of them loaded, every call in one pass (`evaluate_parts`). Keys: (cluster, 'new' | 'in
    force')."""
    from slmshift.train.evaluate import evaluate_parts

    by_base: dict[str, dict[str, Any]] = {}

    def part(cand: Any, key: tuple[int, str], val: pd.DataFrame, name: str, adapter_dir: str) -> None:
        b = by_base.setdefault(cand.source, {"cand": cand, "adapters": {}, "parts": []})
        b["adapters"][name] = adapter_dir
        b["parts"].append((key, val, name))

    for e, sel, tr in done:
        val = rows[(rows["cluster"] == e["id"]) & (rows["split"] == "val")]
        part(sel.chosen, (e["id"], "new"), val, e["label"], tr.adapter_dir)
        if (inc := incumbents.get(e["id"])) is not None:  # its own name: a task's label recurs across iterations
            part(_resolve_candidates([inc.base_model])[0], (e["id"], "in force"), val, f"in-force:{inc.label}",
                 str(in_force.adapter_path(inc)))
    out: dict[tuple[int, str], Any] = {}
    for b in by_base.values():
        spec = b["cand"].model_spec(threads=threads, adapters=b["adapters"], scheduler=o.eval_scheduler)
        out.update(evaluate_parts(b["parts"], spec, grader, batch_size=o.eval_batch_size,
                                  max_new_tokens=o.max_new_tokens, progress=prog, constrained=o.constrain,
                                  desc=f"held-out {b['cand'].name} + {len(b['adapters'])} adapter(s)"))
    return out


# --- the report -------------------------------------------------------------------------------------
