"""The experiment runner: Ray up, models on Serve, team actors through every (scenario, policy) arm, log closed,
report written. It sits above platform/, serve/ and agents/ because it drives all three; it finds scenarios
through the platform registry, so it never imports one.

Faults: team actors restart when their process dies, and the episodes they were running are run again with
`attempt + 1` (same episode id, so the same record ids), at most `episode_attempts` times, then recorded as failed
with an 'infra: …' error; the run goes on. SIGINT/SIGTERM stop launching episodes, give running ones `grace_s` to
finish (a second signal cancels them at once), then the log is flushed and the report written for what finished;
`resume=RUN_DIR` runs only the episodes of that run that have no outcome yet."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmshift.platform import report as reports
from slmshift.platform.cluster import cluster_address, cluster_cpus, start_ray
from slmshift.platform.config import ExperimentConfig, ScenarioSpec
from slmshift.platform.errors import SlmshiftError
from slmshift.platform.log import LogClient, ScrubbingLog, read_episodes, read_interactions, start_log_actor
from slmshift.platform.scenario import scenario_class
from slmshift.platform.storage import check as storage_check
from slmshift.platform.storage import is_uri, join, normalize, read_text, storage_error, write_text
from slmshift.platform.types import EpisodeResult


@dataclass
class RunResult:
    run_dir: str
    summary: dict[str, Any]
    log_counts: dict[str, int]
    wall_s: float
    interrupted: bool = False  # stopped by SIGINT/SIGTERM: `remaining` episodes have no outcome yet
    remaining: int = 0
    experiment_id: str = ""
    notes: list[str] = field(default_factory=list)


def new_run_dir(cfg: ExperimentConfig, storage: str | None = None) -> tuple[str, str]:
    """(experiment id, run dir: a local path or URI). The id is the name plus a UTC timestamp, unique per launch.
    A storage location that cannot be written fails here, before Ray starts, naming its flag or field."""
    exp_id = f"{cfg.experiment.name}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    root = storage_check(storage or cfg.experiment.storage, "--storage" if storage else "experiment.storage")
    return exp_id, join(root, exp_id)


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


def episode_id(spec: ScenarioSpec, policy_label: str, i: int) -> str:
    """Deterministic, so a re-run or a resumed run writes the same record ids."""
    return f"{spec.label}/{policy_label}/{i:05d}"


def build_tasks(cls: Any, spec: ScenarioSpec, seed: int) -> list[Any]:
    if spec.exclude_tasks:  # ask for enough tasks to make up for the excluded ones, then drop them
        skip = set(spec.exclude_tasks)
        more = spec.model_copy(update={"episodes": spec.episodes + len(skip)})
        return [t for t in cls(more, seed).tasks() if str(t.id) not in skip][:spec.episodes]
    return cls(spec, seed).tasks()


def read_run_config(run_dir: str, scenario_options: dict | None = None) -> ExperimentConfig:
    """The validated config a run wrote (RUN_DIR/config.yaml), for `--resume`."""
    import tempfile

    from slmshift.platform.config import load_config

    run_dir = normalize(run_dir, "--resume")
    try:
        text = read_text(join(run_dir, "config.yaml"))
    except (OSError, FileNotFoundError) as e:
        if not is_uri(run_dir) or isinstance(e, FileNotFoundError):
            raise SlmshiftError(f"{run_dir}: not a run directory (no config.yaml in it). Fix: pass a run directory "
                                "printed by `slmshift run` (e.g. runs/quickstart-20260101-120000).") from None
        raise storage_error(run_dir, "--resume", e) from None
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.yaml").write_text(text)
        return load_config(Path(d) / "config.yaml", scenario_options)


class _Stop:
    """SIGINT/SIGTERM: the first asks for a graceful stop, the second cancels running episodes, the third raises
    KeyboardInterrupt. Installed (main thread only) after Ray's own SIGTERM handler, restored afterwards."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.requested = threading.Event()
        self.cancel_now = threading.Event()
        self.at: float | None = None
        self._count = 0
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self._count += 1
        if self._count == 1:
            self.at = time.monotonic()
            self.requested.set()
            sys.stderr.write(f"\n{signal.Signals(signum).name}: launching no more episodes; running ones get "
                             f"{self.grace_s:.0f} s to finish (signal again to cancel them now).\n")
        elif self._count == 2:
            self.cancel_now.set()
            sys.stderr.write("\ncancelling running episodes; writing the log and report (signal again to abort).\n")
        else:
            raise KeyboardInterrupt

    def grace_over(self) -> bool:
        return self.cancel_now.is_set() or (self.at is not None and time.monotonic() - self.at >= self.grace_s)

    def __enter__(self) -> "_Stop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _resume_state(run_dir: str) -> tuple[str | None, set[str], dict[str, int]]:
    """(experiment id found in the log, episode ids with an outcome, next attempt for episodes with records but no
    outcome: a re-run must outrank their partial records)."""
    eps = read_episodes(run_dir)
    df = read_interactions(run_dir, include_shadow=True)
    exp = next(iter(eps["experiment_id"]), None) if len(eps) else next(iter(df["experiment_id"]), None)
    done = set(eps["episode_id"])
    partial = df[~df["episode_id"].isin(done)]
    nxt = (partial.groupby("episode_id")["attempt"].max() + 1).astype(int).to_dict() if len(partial) else {}
    return exp, done, nxt


RECOVERY_S = 120.0  # how long a dead team actor may take to come back before its episodes count as lost


def _run_arm(teams: list[Any], todo: list[tuple[str, Any, int]], spec: ScenarioSpec, policy_label: str, exp_id: str,
             log: Any, writer: Any, stop: _Stop, on_done: Any) -> tuple[list[EpisodeResult], int]:
    """Run (episode id, task, first attempt) items on the teams, at most `concurrency` at a time on each, so that a
    stop launches nothing more. Returns (results, episodes left without an outcome).

    When a team actor dies, its episodes go back to the front of the queue with attempt + 1, and the team gets no
    episode until it answers a probe again (Ray restarts it): a call sent to the dead process would fail at once and
    burn an attempt without running anything."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, TaskCancelledError

    queue = list(reversed(todo))  # pop() from the end: first task first
    load = [0] * len(teams)
    running: dict[Any, tuple[str, Any, int, int]] = {}
    down: dict[int, list[Any]] = {}  # team -> [probe ref or None, next probe time, down since, last error]
    dead: set[int] = set()  # did not come back within RECOVERY_S
    results: list[EpisodeResult] = []
    tick, last_tick, cancelled = None, time.monotonic(), False

    def fail(eid: str, task: Any, attempts: int, why: str) -> None:
        # attempt = attempts made, so the partial records of the crashed attempts are all superseded
        res = EpisodeResult(experiment_id=exp_id, episode_id=eid, scenario=spec.label, task_id=str(task.id),
                            policy=policy_label, success=False, reward=0.0, n_calls=0, attempt=attempts,
                            error=f"infra: {why}")
        writer.add_episode(res.model_dump())
        results.append(res)
        on_done()

    def free() -> list[int]:
        return [k for k in range(len(teams)) if k not in down and k not in dead]

    while running or (queue and not stop.requested.is_set()):
        while queue and not stop.requested.is_set() and free() and len(running) < spec.concurrency * len(free()):
            eid, task, attempt = queue.pop()
            k = min(free(), key=load.__getitem__)
            load[k] += 1
            running[teams[k].run_episode.remote(task, eid, attempt)] = (eid, task, attempt, k)
        if not free() and queue and not down:  # every team is gone for good
            while queue:
                eid, task, attempt = queue.pop()
                fail(eid, task, attempt, f"no team actor of this arm came back within {RECOVERY_S:.0f} s")
        if stop.requested.is_set() and running and not cancelled and stop.grace_over():
            for ref in running:
                ray.cancel(ref)  # an async actor's coroutine gets CancelledError: no outcome, resumable
            cancelled = True
        now = time.monotonic()
        for k, d in list(down.items()):
            if d[0] is None and now >= d[1]:
                d[0] = teams[k].__ray_ready__.remote()
        probes = {d[0]: k for k, d in down.items() if d[0] is not None}
        waiting = list(running) + list(probes)
        if waiting:
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5 if down else 1.0)
        else:  # every team is down and between probes
            ready = []
            time.sleep(0.2)
        if time.monotonic() - last_tick >= 1.0:  # the log actor writes outcomes on its interval even when idle
            if tick is not None and ray.wait([tick], timeout=0)[0]:
                try:
                    ray.get(tick)
                except Exception:
                    pass  # a restarting log actor: its clients resend what it lost
                tick = None
            tick = tick or log.tick.remote()
            last_tick = time.monotonic()
        for ref in ready:
            if ref in probes:
                k = probes[ref]
                try:
                    ray.get(ref)
                    del down[k]  # back: it takes episodes again
                except Exception as e:
                    d = down[k]
                    d[0], d[1], d[3] = None, time.monotonic() + 0.5, f"{type(e).__name__}"
                    if time.monotonic() - d[2] > RECOVERY_S:
                        del down[k]
                        dead.add(k)
                continue
            eid, task, attempt, k = running.pop(ref)
            load[k] -= 1
            try:
                results.append(ray.get(ref))
            except TaskCancelledError:
                continue
            except (RayActorError, ActorUnavailableError) as e:
                if stop.requested.is_set():
                    continue  # no outcome: `--resume` runs it
                if k not in dead:
                    down.setdefault(k, [None, time.monotonic() + 0.5, time.monotonic(), ""])
                if attempt + 1 < spec.episode_attempts:
                    queue.append((eid, task, attempt + 1))  # next out of the queue
                    continue
                reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                fail(eid, task, attempt + 1, f"the team actor died under each of {spec.episode_attempts} attempt(s); "
                                             f"last: {type(e).__name__}: {reason}")
                continue
            on_done()
    if tick is not None:
        ray.wait([tick], timeout=5)
    return results, len(queue) + len(running)


def run_experiment(cfg: ExperimentConfig, *, address: str | None = None, storage: str | None = None,
                   console: Any = None, keep_ray: bool = False, resume: str | None = None,
                   grace_s: float = 30.0) -> RunResult:
    """Run every (scenario, policy) arm and write the report. `resume`: a run dir of this config whose episodes
    without an outcome are run (same experiment id, same dir); `grace_s`: how long a stop waits for running
    episodes."""
    import ray
    from ray import serve
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from slmshift.agents.team import TeamActor
    from slmshift.serve.deployment import deploy_models

    console = console or Console()
    t_start = time.perf_counter()
    done_before: set[str] = set()
    next_attempt: dict[str, int] = {}
    if resume:
        run_dir = storage_check(resume, "--resume")
        found, done_before, next_attempt = _resume_state(run_dir)
        exp_id = found or run_dir.rstrip("/").rsplit("/", 1)[-1]
        console.print(f"[bold]slmshift[/] resuming [cyan]{exp_id}[/] in {run_dir}: {len(done_before)} episode(s) "
                      "already have an outcome", soft_wrap=True)
    else:
        exp_id, run_dir = new_run_dir(cfg, storage)
        write_text(join(run_dir, "config.yaml"), yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        console.print(f"[bold]slmshift[/] experiment [cyan]{exp_id}[/] -> {run_dir}", soft_wrap=True)

    _prepare_sources(cfg, console, local=cluster_address(cfg.ray, address) is None)
    info = start_ray(cfg.ray, address)
    where = "embedded local Ray" if info.embedded else f"Ray cluster at {info.address}"
    console.print(f"{where}; dashboard: {info.dashboard_url or 'off'}"
                  + (f"; metrics on 127.0.0.1:{info.metrics_port}/metrics" if info.metrics_port else ""), soft_wrap=True)
    interrupted, remaining, expected_episodes, counts = False, 0, 0, {}
    notes: list[str] = []
    stop = _Stop(grace_s)
    try:
        with stop:
            with console.status(f"deploying {len(cfg.models)} model(s) on Ray Serve"):
                handles = deploy_models(cfg.models, cluster_cpus())
                params = {n: h.info.remote().result(timeout_s=120)["params"] for n, h in handles.items()}
            console.print("models: " + ", ".join(f"{m.name} ({m.tier}, {m.backend})" for m in cfg.models))
            log = start_log_actor(run_dir)
            # The driver's own records: outcomes of episodes lost to dead actors (their error is free text too).
            writer = ScrubbingLog(LogClient(log)) if cfg.log.scrub else LogClient(log)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console) as progress:
                for spec in cfg.scenarios:
                    cls = scenario_class(spec.kind)
                    seed = cfg.experiment.seed if spec.seed is None else spec.seed
                    tasks = build_tasks(cls, spec, seed)
                    for policy in cfg.router.policies:
                        ids = [episode_id(spec, policy.label, i) for i in range(len(tasks))]
                        expected_episodes += len(tasks)
                        todo = [(eid, t, next_attempt.get(eid, 0)) for eid, t in zip(ids, tasks)
                                if eid not in done_before]
                        if stop.requested.is_set():
                            remaining += len(todo)
                            continue
                        if not todo:
                            continue
                        bar = progress.add_task(f"{spec.label} · {policy.label}", total=len(todo))
                        # Restarted when their process dies (OOM kill, lost node). Ray does not retry the calls
                        # itself (max_task_retries=0): the runner re-runs the episode with attempt + 1, so records
                        # of the dead attempt are superseded rather than mixed with the new ones.
                        # Held here for the arm: a restart re-reads its constructor arguments from the object
                        # store, so they must outlive any one actor process (ray#53727).
                        args = [ray.put(a) for a in (cls, spec, seed, exp_id, policy, cfg.models, handles, params,
                                                     log, cfg.log.scrub)]
                        teams = [TeamActor.options(max_concurrency=spec.concurrency, max_restarts=-1,
                                                   max_task_retries=0).remote(*args) for _ in range(spec.teams)]
                        t_arm = time.perf_counter()
                        results, left = _run_arm(teams, todo, spec, policy.label, exp_id, log, writer, stop,
                                                 lambda: progress.advance(bar, 1))
                        remaining += left
                        wins = sum(r.success for r in results)
                        lost = sum(bool(r.error and r.error.startswith("infra:")) for r in results)
                        retried = sum(r.attempt > next_attempt.get(r.episode_id, 0) for r in results)
                        progress.console.print(
                            f"{spec.label} · {policy.label}: {len(results)} episodes in "
                            f"{time.perf_counter() - t_arm:.0f} s, {wins} succeeded"
                            + (f", {retried} re-run after a team actor died" if retried else "")
                            + (f", {lost} lost to dead actors" if lost else "")
                            + (f", {left} not finished" if left else ""))
                        for t, ref in [(t, t.drain.remote()) for t in teams]:
                            try:  # a team that never came back has nothing left to drain
                                ray.get(ref, timeout=300)
                            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                                notes.append(f"{spec.label} · {policy.label}: a team actor could not drain its log "
                                             f"({type(e).__name__}); records it held may be missing")
                                console.print(f"[red]warning:[/] {notes[-1]}")
                        for t in teams:
                            ray.kill(t)
                        del args
            interrupted = stop.requested.is_set()
            asyncio.run(writer.drain())
            counts = ray.get(log.close.remote())
            ray.kill(log)
        if not interrupted and counts.get("episodes") != expected_episodes:
            notes.append(f"{expected_episodes} episodes ran but {counts.get('episodes')} were logged")
            console.print(f"[red]warning:[/] {notes[-1]}")
    finally:
        for m in cfg.models:
            try:
                serve.delete(m.name)
            except Exception:
                pass
        if info.embedded and not keep_ray:
            serve.shutdown()
            ray.shutdown()
    everything = read_interactions(run_dir, include_shadow=True)
    shadow = everything["shadow"].astype(bool)
    summary = reports.summarize(everything[~shadow].reset_index(drop=True), read_episodes(run_dir),
                                shadow=everything[shadow].reset_index(drop=True))
    summary["experiment_id"], summary["run_dir"] = exp_id, run_dir
    summary["wall_s"] = time.perf_counter() - t_start
    if interrupted:
        summary["incomplete"] = {"episodes_without_outcome": remaining,
                                 "resume": f"slmshift run --resume {run_dir}"}
    write_text(join(run_dir, "report.json"), reports.to_json(summary))
    write_text(join(run_dir, "report.md"), reports.to_markdown(summary, f"slmshift report: {exp_id}"))
    return RunResult(run_dir, summary, counts, summary["wall_s"], interrupted, remaining, exp_id, notes)
