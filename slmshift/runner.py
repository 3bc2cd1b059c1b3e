"""The experiment runner: Ray up, models on Serve, team actors through every (scenario, policy) arm, log closed,
report written. It sits above platform/, serve/ and agents/ because it drives all three; it finds scenarios
through the platform registry, so it never imports one."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slmshift.platform import report as reports
from slmshift.platform.cluster import cluster_address, cluster_cpus, start_ray
from slmshift.platform.config import ExperimentConfig
from slmshift.platform.log import InteractionLog, read_episodes, read_interactions
from slmshift.platform.scenario import scenario_class


@dataclass
class RunResult:
    run_dir: str
    summary: dict[str, Any]
    log_counts: dict[str, int]
    wall_s: float


def _write_text(uri: str, text: str) -> None:
    from pyarrow import fs

    if "://" not in uri:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_text(text)
        return
    filesystem, path = fs.FileSystem.from_uri(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(text.encode())


def new_run_dir(cfg: ExperimentConfig, storage: str | None = None) -> tuple[str, str]:
    """(experiment id, run dir URI). The id is the name plus a UTC timestamp, unique per launch."""
    exp_id = f"{cfg.experiment.name}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    root = storage or cfg.experiment.storage
    root = root.rstrip("/") if "://" in root else str(Path(root).expanduser().resolve())
    return exp_id, f"{root}/{exp_id}"


def _prepare_sources(cfg: ExperimentConfig, console: Any, local: bool) -> None:
    """Fail fast on a missing model file, and convert packaged models once, here, with visible progress,
    rather than inside a Serve replica. On a cluster, paths are checked by the replicas on their nodes."""
    from slmshift.serve.sources import pull_packaged, resolve_source

    for m in cfg.models:
        if m.backend != "hf" or not m.source:
            continue
        if m.source.startswith("packaged:"):
            with console.status(f"preparing {m.source} (converted once into the local cache)"):
                pull_packaged(m.source.split(":", 1)[1])
        elif local:
            resolve_source(m.source)


def run_experiment(cfg: ExperimentConfig, *, address: str | None = None, storage: str | None = None,
                   console: Any = None, keep_ray: bool = False) -> RunResult:
    import ray
    from ray import serve
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from slmshift.agents.team import TeamActor
    from slmshift.serve.deployment import deploy_models

    console = console or Console()
    t_start = time.perf_counter()
    exp_id, run_dir = new_run_dir(cfg, storage)
    _write_text(f"{run_dir}/config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    console.print(f"[bold]slmshift[/] experiment [cyan]{exp_id}[/] -> {run_dir}", soft_wrap=True)

    _prepare_sources(cfg, console, local=cluster_address(cfg.ray, address) is None)
    info = start_ray(cfg.ray, address)
    where = "embedded local Ray" if info.embedded else f"Ray cluster at {info.address}"
    console.print(f"{where}; dashboard: {info.dashboard_url or 'off'}"
                  + (f"; metrics on 127.0.0.1:{info.metrics_port}/metrics" if info.metrics_port else ""), soft_wrap=True)
    try:
        with console.status(f"deploying {len(cfg.models)} model(s) on Ray Serve"):
            handles = deploy_models(cfg.models, cluster_cpus())
            params = {n: h.info.remote().result(timeout_s=120)["params"] for n, h in handles.items()}
        console.print("models: " + ", ".join(f"{m.name} ({m.tier}, {m.backend})" for m in cfg.models))
        log = InteractionLog.remote(run_dir)
        expected_episodes = 0
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            for spec in cfg.scenarios:
                cls = scenario_class(spec.kind)
                seed = cfg.experiment.seed if spec.seed is None else spec.seed
                if spec.exclude_tasks:  # ask for enough tasks to make up for the excluded ones, then drop them
                    skip = set(spec.exclude_tasks)
                    more = spec.model_copy(update={"episodes": spec.episodes + len(skip)})
                    tasks = [t for t in cls(more, seed).tasks() if str(t.id) not in skip][:spec.episodes]
                else:
                    tasks = cls(spec, seed).tasks()
                for policy in cfg.router.policies:
                    bar = progress.add_task(f"{spec.label} · {policy.label}", total=len(tasks))
                    teams = [TeamActor.options(max_concurrency=spec.concurrency).remote(
                        cls, spec, seed, exp_id, policy, cfg.models, handles, params, log) for _ in range(spec.teams)]
                    pending = [teams[i % len(teams)].run_episode.remote(task, f"{spec.label}/{policy.label}/{i:05d}")
                               for i, task in enumerate(tasks)]
                    t_arm, results = time.perf_counter(), []
                    while pending:
                        done, pending = ray.wait(pending, num_returns=1)
                        results += ray.get(done)
                        progress.advance(bar, len(done))
                    wins = sum(r.success for r in results)
                    progress.console.print(f"{spec.label} · {policy.label}: {len(results)} episodes in "
                                           f"{time.perf_counter() - t_arm:.0f} s, {wins} succeeded")
                    ray.get([t.drain.remote() for t in teams])
                    expected_episodes += len(results)
                    for t in teams:
                        ray.kill(t)
        counts = ray.get(log.close.remote())
        ray.kill(log)
        if counts.get("episodes") != expected_episodes:
            console.print(f"[red]warning:[/] {expected_episodes} episodes ran but {counts.get('episodes')} were logged")
    finally:
        for m in cfg.models:
            try:
                serve.delete(m.name)
            except Exception:
                pass
        if info.embedded and not keep_ray:
            serve.shutdown()
            ray.shutdown()
    summary = reports.summarize(read_interactions(run_dir), read_episodes(run_dir))
    summary["experiment_id"], summary["run_dir"] = exp_id, run_dir
    summary["wall_s"] = time.perf_counter() - t_start
    _write_text(f"{run_dir}/report.json", reports.to_json(summary))
    _write_text(f"{run_dir}/report.md", reports.to_markdown(summary, f"slmshift report: {exp_id}"))
    return RunResult(run_dir, summary, counts, summary["wall_s"])
