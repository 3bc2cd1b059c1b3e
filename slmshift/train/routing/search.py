"""The Ray Tune search over router policies: Optuna with two objectives (quality max, cost min), a define-by-run
space (the policy kind, then only that kind's settings). A trial fits its scorer on the fit split and replays a whole
grid of thresholds on the choose split: a Tune trial costs seconds of overhead here, a replay microseconds."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
from ray.tune import Callback

from slmshift.platform.errors import SlmshiftError
from slmshift.train.routing import metrics
from slmshift.train.routing.pairs import PairedTable
from slmshift.train.routing.replay import Replay
from slmshift.train.routing.scorers import fit_scorer


def _trial(config: dict[str, Any], table: PairedTable = None, fit: np.ndarray = None, choose: np.ndarray = None,
           emb: Any = None, grid: int = 40, seed: int = 0, primary: str = "quality_call") -> None:
    """One Tune trial: fit the sampled scorer on the fit split, replay a whole threshold grid on the choose split,
    report the sampled operating point (at its LLM share) as the two objectives and every grid point for the front."""
    from ray import tune

    kind = config["kind"]
    params = {k: v for k, v in config.items() if k not in ("kind", "llm_share")}
    table = table.at_attempts(int(params.get("slm_attempts", 1)))  # the SLM answering up to k times
    fitted = fit_scorer(kind, params, table, fit, emb, seed)
    replay = Replay(table.df.iloc[choose])
    eff = fitted.effective(choose)
    taus = metrics.threshold_grid(eff, grid)
    star = metrics.calibrate_tau(eff, float(config["llm_share"]))
    taus = np.concatenate([taus, [star]])
    res = replay.evaluate(fitted.mask(choose, taus), cascade=kind == "cascade")
    points = [{"tau": float(t), **{k: float(v[i]) for k, v in res.items()}} for i, t in enumerate(taus[:-1])]
    x, q = res["llm_share"][:-1], res[primary][:-1]
    all_llm = replay.evaluate(np.zeros((replay.n, 1), bool))[primary][0]
    all_slm = replay.evaluate(np.ones((replay.n, 1), bool))[primary][0]
    tune.report({"quality": float(res[primary][-1]), "cost": float(res["cost"][-1]),
                 "llm_share_at": float(res["llm_share"][-1]), "tau_at": float(star),
                 "apgr_search": float(metrics.apgr(x, q, all_slm, all_llm)), "points": json.dumps(points)})


class _Space:
    """Define-by-run search space (Optuna): the policy kind, then only that kind's settings. A class, not a closure,
    because Tune pickles its searcher when it checkpoints."""

    def __init__(self, kinds: list[str], clusters: list[int], max_attempts: int = 1):
        self.kinds, self.clusters, self.max_attempts = list(kinds), list(clusters), max_attempts

    def __call__(self, trial: Any) -> None:
        kind = trial.suggest_categorical("kind", self.kinds)
        trial.suggest_float("llm_share", 0.0, 1.0)
        if self.max_attempts > 1:  # the collect logged retries up to k_max: search k with the rest
            trial.suggest_int("slm_attempts", 1, self.max_attempts)
        if kind in ("threshold", "threshold_cluster"):
            trial.suggest_float("prior_strength", 0.5, 20.0, log=True)
        if kind == "threshold_cluster":
            for c in self.clusters:
                trial.suggest_float(f"off_{c}", -0.3, 0.3)
        if kind == "learned":
            trial.suggest_float("C", 1e-2, 1e2, log=True)


def run_search(table: PairedTable, fit: np.ndarray, choose: np.ndarray, kinds: list[str], opts: Any, primary: str,
               console: Any = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The Ray Tune search: scorers fitted on `fit`, thresholds replayed on `choose`. Returns one row per (trial,
    replayed threshold) and search stats."""
    import logging

    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    started_here = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # RAY_ADDRESS joins a cluster; otherwise always a fresh embedded one ("local"), never a stray `ray start`
        where = {"address": os.environ["RAY_ADDRESS"]} if os.environ.get("RAY_ADDRESS") else \
            {"address": "local", "num_cpus": opts.num_cpus}
        ray.init(**where, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        started_here = True
    for name in ("ray", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # trials cut by the time budget are counted below
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter honours verbose=0; the new one prints tables
    # no TensorBoard logger: it printed "NaN or Inf found in input tensor." on the loop's console whenever a trial
    # reported a NaN metric, and nothing here reads its files; the CSV and JSON results stay
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    emb = table.embeddings() if "learned" in kinds else None
    clusters = sorted({int(c) for c in table.df["cluster"].iloc[fit].dropna()}) if "threshold_cluster" in kinds else []
    searcher = OptunaSearch(space=_Space(kinds, clusters, table.max_attempts), metric=["quality", "cost"], mode=["max", "min"],
                            seed=opts.seed)
    storage = tempfile.mkdtemp(prefix="slmshift-tune-")
    progress = _progress_callback(console, opts) if opts.progress and console is not None else None
    trainable = tune.with_parameters(_trial, table=table, fit=fit, choose=choose, emb=emb, grid=opts.grid,
                                     seed=opts.seed, primary=primary)
    t0 = time.perf_counter()
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=opts.trials, time_budget_s=opts.time_budget_s,
                                        max_concurrent_trials=max(1, int(ray.available_resources().get("CPU", 1)))),
            run_config=tune.RunConfig(name="routing", storage_path=storage, verbose=0,
                                      callbacks=[*([progress] if progress else []), CSVLoggerCallback(),
                                                 JsonLoggerCallback()]))
        if progress:
            progress.start()
        grid = tuner.fit()
    finally:
        if progress:
            progress.stop()
        wall = time.perf_counter() - t0
        shutil.rmtree(storage, ignore_errors=True)
        if started_here:
            ray.shutdown()
    rows, errors = [], 0
    for i, r in enumerate(grid):
        if r.error is not None or not r.metrics or "points" not in r.metrics:
            errors += 1
            continue
        cfg = dict(r.config)
        params = {k: v for k, v in cfg.items() if k not in ("kind", "llm_share")}
        for p in json.loads(r.metrics["points"]):
            rows.append({"trial": i, "kind": cfg["kind"], "params": json.dumps(params, sort_keys=True),
                         "sampled_llm_share": cfg["llm_share"], "apgr_search": r.metrics["apgr_search"], **p})
    if errors and not rows:
        first = next((r.error for r in grid if r.error is not None), None)
        raise SlmshiftError(f"slmshift tune: every Tune trial failed; first error: {first}")
    n_trials = len(grid) - errors
    stats = {"trials": n_trials, "failed_trials": errors, "wall_s": wall,
             "trials_per_s": n_trials / wall if wall else float("nan"),
             "replayed_points": len(rows), "points_per_s": len(rows) / wall if wall else float("nan")}
    return pd.DataFrame(rows), stats


_BARS: dict[int, Any] = {}  # live progress bars by id: Tune pickles its callbacks, a bar stays in the driver


class TuneProgress(Callback):
    """Drives a rich progress bar in the driver (trials finished out of the most allowed); holds only the bar's key,
    so pickling it never pickles the live bar."""

    def __init__(self, key: int):
        self.key = key

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.key in _BARS:
            bar, task = _BARS[self.key]
            bar.advance(task)

    def start(self) -> None:
        _BARS[self.key][0].start()

    def stop(self) -> None:
        _BARS.pop(self.key)[0].stop()


def _progress_callback(console: Any, opts: Any) -> TuneProgress:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f} trials"),
                   TimeElapsedColumn(), console=console)
    task = bar.add_task(f"tune: searching (budget {opts.time_budget_s:.0f} s)", total=opts.trials)
    _BARS[id(bar)] = (bar, task)
    return TuneProgress(id(bar))
