"""`slmshift convert RUN_DIR`: the conversion pipeline S2 -> S5 over one run's interaction log.

S2 curate (rule, scrub, dedup), S3 cluster (embeddings + faiss k-means), split by task/episode stratified by
cluster, S4 select an SLM per cluster zero-shot, S5 fine-tune a LoRA adapter per cluster on Ray Train
(C2's `train_adapter`), evaluate base vs adapter on the held-out calls, register every adapter and promote
the ones that win. Writes the conversion layout under `RUN_DIR/convert/` (see docs of `convert`). RUN_DIR and the
output may be storage URIs (`platform/storage.py`): the output is then built in a local mirror and uploaded after
each step.

Promotion rule (PROMOTION_RULE): an adapter is promoted when the 95% bootstrap interval of its held-out accuracy
gain over the base lies above zero. The bootstrap resamples held-out tasks, not calls: the calls of one episode's
task are correlated, and resampling them one by one made the interval too narrow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from slmshift.platform.errors import SlmshiftError
from slmshift.platform.render import md_table
from slmshift.train.cluster import ClusterIndex, ClusterOptions, cluster_tasks, embed_texts, label_clusters, prompt_text
from slmshift.train.curate import CurateOptions, curate, split_by_group
from slmshift.train.finetune import LoraOptions

__all__ = ["ConvertOptions", "ConvertReport", "convert", "promotion", "serve_bases", "serve_snippet"]

PROMOTION_RULE = ("promoted only on evidence: the 95% paired-bootstrap interval of adapter - base accuracy on the "
                  "same held-out calls lies above zero, the bootstrap resampling held-out tasks (all of a task's calls "
                  "together; a call without a task id is its own task), on at least min_promotion_tasks tasks")


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
    constrain: bool = Field(default=True, description="Held-out grading (S4, S5) holds each call to its output "
                            "constraint, as the SLM tier is served under a router arm's `constrain: slm` (the default); "
                            "off for a router that serves the SLM free (`constrain: none`).")
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


@dataclass
class ConvertReport:
    run_dir: str
    out_dir: str
    counts: dict[str, int]
    scrub_counts: dict[str, int]
    clustering: dict[str, Any]
    clusters: list[dict[str, Any]]
    grading: str
    timings: dict[str, float]
    registry: str | None
    promotion_rule: str = PROMOTION_RULE
    selection_rule: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    local_dir: str = ""  # the working copy on this machine when out_dir is a URI (the registry's paths are in it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def promoted(self) -> list[dict[str, Any]]:
        return [c for c in self.clusters if c.get("promoted")]


def paired_interval(before: list[bool], after: list[bool], groups: list[Any] | None = None, *,
                    resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of after - before accuracy over calls: a 95% percentile cluster bootstrap.

    Each resample draws as many groups as there are, with replacement, and takes the mean difference over all their
    paired calls. `groups` (one key per call, e.g. its task id) keeps correlated calls together, so the interval
    reflects how many independent tasks were seen; None makes each call its own group (the plain pair bootstrap).
    """
    import numpy as np

    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if len(d) == 0:
        return 0.0, 0.0, 0.0
    codes = np.arange(len(d))
    if groups is not None:  # groups numbered in order of first appearance: distinct groups draw as calls did
        _, first, inverse = np.unique(np.asarray([str(g) for g in groups]), return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=int)
        rank[np.argsort(first)] = np.arange(len(first))
        codes = rank[inverse.reshape(-1)]
    # per-group sums and sizes: a resample's mean is sum(sums) / sum(sizes) over its drawn groups (no per-call gather)
    sums, sizes = np.bincount(codes, weights=d), np.bincount(codes).astype(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _task_groups(verdicts: list[dict[str, Any]]) -> tuple[list[str], int, int]:
    """(group per call, distinct task ids, calls without one): a call with no task id is its own group."""
    groups = [f"task:{t}" if (t := str(v.get("task_id") or "")) else f"call:{i}" for i, v in enumerate(verdicts)]
    untasked = sum(g.startswith("call:") for g in groups)
    return groups, len(set(groups)) - untasked, untasked


def promotion(before: Any, after: Any, min_tasks: int = 10, seed: int = 0) -> tuple[bool, str, dict[str, Any]]:
    """Apply PROMOTION_RULE to two evaluations of the same held-out calls; returns (promoted, reason, interval).

    The interval dict: diff, low, high, n (tasks resampled, a call without a task id counting as one) and calls.
    """
    b = [bool(v.get("correct")) for v in before.verdicts]
    a = [bool(v.get("correct")) for v in after.verdicts]
    if len(a) != len(b):
        return False, f"base and adapter were judged on different calls ({len(b)} vs {len(a)})", {}
    groups, n_tasks, untasked = _task_groups(before.verdicts)
    if groups != _task_groups(after.verdicts)[0]:
        return False, "base and adapter were judged on different calls (their task ids differ)", {}
    mean, low, high = paired_interval(b, a, groups, seed=seed)
    n = n_tasks + untasked
    ci = {"diff": mean, "low": low, "high": high, "n": n, "calls": len(a)}
    acc = f"held-out {before.measure} {before.correct_rate:.2f} -> {after.correct_rate:.2f}, diff {mean:+.2f} " \
          f"[{low:+.2f}, {high:+.2f}] on {n} tasks / {len(a)} calls (bootstrap over tasks)"
    if untasked:
        acc += f"; {untasked} call(s) without a task id each resampled as its own task"
    if n < min_tasks:
        return False, f"{acc}: fewer than {min_tasks} held-out tasks, not enough evidence to promote", ci
    if low > 0:
        return True, f"{acc}: interval above zero", ci
    return False, f"{acc}: interval includes zero" if high >= 0 else f"{acc}: worse than the base", ci


def challenge(promoted: bool, reason: str, label: str, incumbent: Any, after: Any, min_tasks: int = 10,
              seed: int = 0) -> tuple[bool, str, dict[str, Any]]:
    """The new adapter against the adapter in force for its task (`incumbent`'s evaluation, same held-out calls):
    promoted only if it beats the base (`promoted`, `reason`) and the adapter in force, by the same paired
    task-bootstrap rule. Returns (promoted, reason, the incumbent's figures for the report)."""
    beats, why, interval = promotion(incumbent, after, min_tasks, seed)
    figures = {"label": label, "correct_rate": incumbent.correct_rate, "interval": interval, "beats": beats}
    if not promoted:
        return False, f"{reason}; against the adapter in force {label!r}: {why}", figures
    if not beats:
        return False, f"{reason}; but not over the adapter in force {label!r}, which stays: {why}", figures
    return True, f"{reason}; and over the adapter in force {label!r}: {why}", figures


def serve_bases(clusters: list[dict[str, Any]]) -> list[str]:
    """The base sources the promoted adapters were trained on, in cluster order (S4 chooses per cluster); without a
    promoted adapter, the first chosen base."""
    bases = list(dict.fromkeys(c["chosen_source"] for c in clusters if c.get("promoted") and c.get("chosen_source")))
    return bases or [next((c["chosen_source"] for c in clusters if c.get("chosen_source")), "packaged:smollm2-135m")]


def serve_snippet(registry_path: str, base_source: str | list[str], name: str = "slm-tuned") -> str:
    """The YAML that serves the promoted adapters in the next `slmshift run`: merge into an experiment YAML
    that keeps its LLM, which serves the calls of clusters without a promoted adapter. One model per base (S4 may
    choose a different base per cluster), each with the registry: it serves the adapters trained on its source,
    and the policy sends each cluster's calls to the model of its adapter's base."""
    bases = [base_source] if isinstance(base_source, str) else list(base_source)
    names = [name] + [f"{name}-{b.split(':')[-1].rstrip('/').split('/')[-1]}" for b in bases[1:]]
    models = "".join(
        f"  - name: {n}\n"
        "    tier: slm\n"
        "    backend: hf\n"
        f"    source: {b}\n"
        f"    registry: {registry_path}       # serves the promoted adapters trained on this source, by cluster label\n"
        "    resources: {num_cpus: 1}\n" for n, b in zip(names, bases))
    return (
        "models:                          # add to your experiment's models (keep the LLM)\n"
        + models +
        "router:\n"
        "  policies:\n"
        f"    - {{kind: adapters, name: tuned, registry: {registry_path}, slm_model: {name}, default: llm}}\n"
    )


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
    if o.incumbent:  # fail before S2-S4's minutes, not after them
        from slmshift.train.registry import AdapterRegistry

        AdapterRegistry.load(o.incumbent)
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
    cands = _resolve_candidates(o.candidates)

    # S2 --------------------------------------------------------------------------------------------
    cur = curate(log[~log["shadow"].astype(bool)].reset_index(drop=True), o.curate)
    rows = cur.rows
    timings["curate_s"] = time.perf_counter() - t
    if rows.empty:
        c = cur.counts
        raise SlmshiftError(
            f"{run_dir}: the curated set is empty: of {c['logged']} logged calls, {c['dropped_invalid']} had invalid "
            f"output and {c['dropped_by_rule']} failed the keep rule {o.curate.rule!r}. Fix: run more episodes, use a "
            "stronger teacher, or loosen the rule (e.g. --rule valid).")
    console.print(f"S2 curate: kept {len(rows)} of {cur.counts['logged']} calls; scrubbed "
                  f"{sum(cur.scrub_counts.values())} secrets/PII")
    from slmshift.train.evaluate import grader_for_run, served_max_tokens

    grader = grader_for_run(run_dir)  # the run's scenarios: they grade held-out calls and know each kind's budget
    rows["max_tokens"] = served_max_tokens(rows, grader.scenarios)  # what each call is generated with in S4/S5

    # S3 --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    with _progress(o.progress, console) as prog:
        x = embed_texts([prompt_text(m) for m in rows["messages"]], progress=prog)
        # a sub-task must stay trainable: min_train_rows once its held-out share is set aside
        min_size = max(o.cluster.min_size, math.ceil(o.min_train_rows / (1 - o.curate.val_fraction)))
        clus = cluster_tasks(x, list(zip(rows["role"], rows["call_kind"], rows["expect"])),
                             o.cluster.model_copy(update={"min_size": min_size}), progress=prog)
    rows["cluster"] = clus.labels
    info = label_clusters(clus.labels, rows["role"].tolist(), rows["call_kind"].tolist())
    rows["split"] = split_by_group(rows, o.curate.val_fraction, o.curate.seed, by=o.curate.split_by)
    out.mkdir(parents=True, exist_ok=True)
    ClusterIndex(clus.centroids, info).save(out / "clusters")
    curated_path = out / "curated.parquet"
    rows.to_parquet(curated_path, index=False)
    sync()
    timings["cluster_s"] = time.perf_counter() - t
    console.print(f"S3 cluster: {clus.criterion}; " + ", ".join(f"{c['label']} ({c['size']})" for c in info))

    # S4 --------------------------------------------------------------------------------------------
    from slmshift.train.select import RULE, collected_answers, select_candidates

    t = time.perf_counter()
    answers = collected_answers(log, run_dir)  # collect's graded SLM answers stand for the held-out calls they cover
    threads = o.threads or os.cpu_count() or 1
    per_cluster: list[dict[str, Any]] = []
    selections = {}
    engines: dict[str, Any] = {}
    with _progress(o.progress, console) as prog:
        for c in info:
            mine = rows[rows["cluster"] == c["id"]]
            val, n_train = mine[mine["split"] == "val"], int((mine["split"] == "train").sum())
            entry = {**c, "n_train": n_train, "n_val": len(val), "chosen": None, "before": None, "after": None,
                     "adapter_dir": None, "promoted": False, "status": ""}
            if len(val) >= o.min_val_rows:
                sel = select_candidates(val, c["id"], cands, grader, engines=engines, threads=threads,
                                        batch_size=o.eval_batch_size, max_new_tokens=o.max_new_tokens,
                                        progress=prog, answers=answers, constrained=o.constrain,
                                        licenses=o.licenses, max_memory_mb=o.max_memory_mb)
                selections[c["id"]] = sel
                from_collect = sum(v.get("source") == "collect" for v in sel.before.verdicts)
                groups, _, _ = _task_groups(sel.before.verdicts)
                _, low, high = paired_interval([False] * len(val), [bool(v["correct"]) for v in sel.before.verdicts],
                                               groups, seed=o.lora.seed)  # the accuracy itself, tasks resampled
                entry.update(chosen=sel.chosen.name, chosen_source=sel.chosen.source, selection=sel.table,
                             excluded=sel.excluded,
                             before=sel.before.summary(), before_verdicts=sel.before.verdicts,
                             before_interval={"low": low, "high": high, "n": len(set(groups))},
                             before_source={"collect": from_collect, "generated": len(val) - from_collect})
                if not o.progress:  # without bars (the loop's console) each finished cluster still says so
                    console.print(f"S4 select: cluster {c['id']} {c['label']!r}: {sel.chosen.name} zero-shot "
                                  f"{sel.before.correct_rate:.2f} [{low:.2f}, {high:.2f}] held-out {sel.before.measure} on "
                                  f"{len(set(groups))} tasks / {len(val)} calls "
                                  f"({from_collect} answered in collect, {len(val) - from_collect} generated in "
                                  f"{sel.before.wall_s:.0f} s)")
            else:
                entry["status"] = f"not tuned: {len(val)} validation rows (needs {o.min_val_rows})"
            per_cluster.append(entry)
    engines.clear()  # free the zero-shot models before training
    timings["select_s"] = time.perf_counter() - t

    # S5 --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    registry_path = None
    todo = [e for e in per_cluster if e["id"] in selections and e["n_train"] >= o.min_train_rows]
    for e in per_cluster:
        if e["id"] in selections and e not in todo:
            e["status"] = f"not tuned: {e['n_train']} train rows (needs {o.min_train_rows})"
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
    from slmshift.train.evaluate import evaluate
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
            for job, tr in runs:
                e, sel = by_label[job.label], selections[job.cluster]
                if isinstance(tr, SlmshiftError):  # one cluster's failure never costs the others their adapters
                    console.print(f"S5 result: {job.label!r} not tuned: {tr}")
                    e.update(status=f"not tuned: {tr}")
                    continue
                if tr.resumed_from_step:
                    console.print(f"S5 LoRA {job.label!r}: resumed from its step-{tr.resumed_from_step} checkpoint")
                val = rows[(rows["cluster"] == e["id"]) & (rows["split"] == "val")]
                spec = sel.chosen.model_spec(threads=threads, adapters={e["label"]: tr.adapter_dir})
                after = evaluate(val, spec, e["label"], grader, batch_size=o.eval_batch_size,
                                 max_new_tokens=o.max_new_tokens, progress=prog,
                                 desc=f"held-out {sel.chosen.name} + adapter {e['label']}", constrained=o.constrain)
                promoted, reason, interval = promotion(sel.before, after, o.min_promotion_tasks, o.lora.seed)
                if (inc := incumbents.get(e["id"])) is not None:
                    inc_spec = _resolve_candidates([inc.base_model])[0].model_spec(
                        threads=threads, adapters={inc.label: str(in_force.adapter_path(inc))})
                    held = evaluate(val, inc_spec, inc.label, grader, batch_size=o.eval_batch_size,
                                    max_new_tokens=o.max_new_tokens, progress=prog,
                                    desc=f"held-out adapter in force {inc.label}", constrained=o.constrain)
                    promoted, reason, e["incumbent"] = challenge(promoted, reason, inc.label, held, after,
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


# --- the report -------------------------------------------------------------------------------------


def _pct(d: dict | None, key: str) -> str:
    return "-" if not d or d.get(key) is None else f"{d[key]:.2f}"


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _interval(ci: dict | None) -> str:
    """The accuracy gain's interval with its sample size as tasks and calls (n counts tasks: see PROMOTION_RULE)."""
    if not ci:
        return "-"
    n = f"{ci['n']} tasks / {ci['calls']} calls" if "calls" in ci else f"{ci['n']} calls"  # older reports: calls
    return f"{ci['diff']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}], n={n}"


def _source(src: dict | None) -> str:
    """Where the zero-shot figure came from: collect's graded SLM answers, generated here, or both."""
    if not src:
        return "-"
    return " + ".join(f"{n} {k}" for k, n in (("collect", src.get("collect", 0)), ("generated", src.get("generated", 0)))
                      if n) or "-"


def cluster_rows(report: ConvertReport) -> list[list[str]]:
    """One row per cluster for the Markdown and terminal tables."""
    out = []
    for c in report.clusters:
        tr = c.get("train") or {}
        out.append([str(c["id"]), c["label"], str(c["size"]), c["role"], c["call_kind"],
                    f"{c['n_train']}/{c['n_val']}", c.get("chosen") or "-",
                    _pct(c.get("before"), "correct_rate"), _source(c.get("before_source")),
                    _pct(c.get("after"), "correct_rate"),
                    _interval(c.get("interval")),
                    _pct(c.get("before"), "valid_rate"), _pct(c.get("after"), "valid_rate"),
                    f"{_loss(tr.get('val_loss_base'))} -> {_loss(tr.get('val_loss_adapter'))}" if tr else "-",
                    "yes" if c.get("promoted") else "no", c.get("adapter_dir") or "-", c.get("status", "")])
    return out


CLUSTER_HEADER = ["id", "label", "size", "role", "call kind", "train/val", "SLM", "acc before", "before from",
                  "acc after",
                  "acc diff [95% CI, task bootstrap]", "valid before", "valid after", "val loss", "promoted", "adapter",
                  "why"]


def cluster_header(report: ConvertReport) -> list[str]:
    """CLUSTER_HEADER, its 'acc' columns named 'agreement' where every held-out call was graded by agreement with the
    logged answer (no scenario could grade it: gateway traffic), never as accuracy."""
    if not _by_agreement(report):
        return CLUSTER_HEADER
    return [h.replace("acc ", "agreement ", 1) if h.startswith("acc ") else h for h in CLUSTER_HEADER]


def _by_agreement(report: ConvertReport) -> bool:
    from slmshift.train.evaluate import AGREEMENT

    kinds = {part.split(":")[0].strip() for part in (report.grading or "").split(",") if part.strip()}
    return kinds == {AGREEMENT}


def teacher_note(run_dir: str) -> list[str]:
    """The run's declared teachers (simulated profiles, workload-file teachers), labelled as every report labels
    them."""
    from slmshift.train.routing.report import teacher_lines
    from slmshift.train.routing.tune import teacher_profile

    lines = teacher_lines(teacher_profile(run_dir))
    return ["\n".join(lines).strip()] if lines else []


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(md_table(header, rows))


def to_markdown(report: ConvertReport) -> str:
    base = serve_bases(report.clusters)
    parts = [
        f"# slmshift conversion report: {Path(report.run_dir).name}",
        f"Run: `{report.run_dir}`  Output: `{report.out_dir}`"
        + (f" (working copy on the machine that converted: `{report.local_dir}`; the paths below are in it)"
           if report.local_dir else ""),
        f"Held-out grading: {report.grading} (scenario = the scenario's own checker, correctness; agreement = "
        "agreement with the logged answer where no scenario can grade a call offline, e.g. gateway traffic: tool "
        "calls and JSON compared as parsed values, text by token F1 >= 0.8; see train/evaluate.py). "
        + ("Every figure below is **agreement** with the teacher's logged answers, not correctness."
           if _by_agreement(report) else ""),
        *teacher_note(report.run_dir),
        "## Clusters (S3) and their SLMs (S4, S5)",
        _md_table(cluster_header(report), cluster_rows(report)),
        f"Promotion rule: {report.promotion_rule}. Selection rule: {report.selection_rule}.",
        "## Curation (S2)",
        _md_table(["step", "rows"], [[k, str(v)] for k, v in report.counts.items()]),
        "Scrubbed (replacements per kind):",
        _md_table(["kind", "count"], [[k, str(v)] for k, v in report.scrub_counts.items()]),
        "## Clustering",
        f"{report.clustering['criterion']}. Best cosine silhouette of each group k-means could split: "
        + (", ".join(f"{k}: {v}" for k, v in report.clustering["silhouette"].items()) or "none") + ".",
        "Purity by call kind (share of the cluster's calls of its kind; 1.00 by construction): "
        + ", ".join(f"{c['label']} {c.get('call_kind_share', 1.0):.2f}" for c in report.clusters) + ".",
    ]
    for c in report.clusters:
        if c.get("selection"):
            parts.append(f"### Candidates for cluster {c['id']} ({c['label']})")
            parts.append(_md_table(["candidate", "params", "licence", "memory MB", "context",
                                    "agreement" if _by_agreement(report) else "accuracy", "valid",
                                    "cost USD", "score", "chosen"],
                                   [[r["candidate"], f"{r['params']:.3g}", r["license"], f"{r['memory_mb']:.0f}",
                                     str(r["context_length"]), f"{r['accuracy']:.2f}", f"{r['valid_rate']:.2f}",
                                     f"{r['cost_usd']:.3g}", f"{r['score']:.3g}", "yes" if r["chosen"] else ""]
                                    for r in c["selection"]]))
            if c.get("excluded"):
                parts.append("Not measured (S4's gates): " + "; ".join(f"{n}: {w}" for n, w in c["excluded"].items()))
    parts.append("## Timings (s)")
    parts.append(_md_table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in report.timings.items()]))
    if report.registry:
        parts.append("## Serve the adapters")
        parts.append(f"{len(report.promoted)} adapter(s) promoted in `{report.registry}`. Add to an experiment YAML:")
        parts.append("```yaml\n" + serve_snippet(report.registry, base) + "```")
    return "\n\n".join(parts) + "\n"


def write_report(report: ConvertReport, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    (out / "report.md").write_text(to_markdown(report))
